"""LoadRecorder: the per-forward counts of both handles, folded on read (pure torch, no process group)."""

import torch

from megatron_eplb.load_recorder import MAX_ACC_SHAPES, MAX_PENDING_SLOT_COUNTS, LoadRecorder


def test_routed_maps_of_any_token_count_sum_into_the_logical_loads():
    rec = LoadRecorder(2, 3, 2, torch.device("cpu"))
    expected = torch.zeros(2, 3, dtype=torch.int64)
    for tokens in range(1, MAX_ACC_SHAPES + 3):  # more shapes than accumulators: the rest counted directly
        routed = torch.rand(tokens, 3) > 0.5
        rec.count_routed(1, routed)
        expected[1] += routed.sum(dim=0)
    rec.logical_rows[0].add_(torch.tensor([1, 2, 3]))  # a direct add (DeepSpeed's gate counts)
    expected[0] += torch.tensor([1, 2, 3])
    assert torch.equal(rec.loads(), expected)
    assert torch.equal(rec.loads(), expected)  # a second read adds nothing
    rec.reset()
    assert int(rec.loads().sum()) == 0


def test_slot_counts_from_host_and_tensors_are_kept_bounded_and_folded_on_read():
    rec = LoadRecorder(2, 3, 2, torch.device("cpu"))
    rec.keep_slot_counts(0, [1, 2])  # a host list, as a dispatcher may hand it
    rec.keep_slot_counts(1, torch.tensor([3, 4], dtype=torch.int32))
    assert torch.equal(rec.slot_loads(), torch.tensor([[1, 2], [3, 4]]))
    assert all(not pending for pending in rec.slot_pending)
    for _ in range(MAX_PENDING_SLOT_COUNTS + 3):  # never read: what is kept stays bounded
        rec.keep_slot_counts(0, torch.tensor([1, 0]))
    assert max(len(p) for p in rec.slot_pending) < MAX_PENDING_SLOT_COUNTS
    assert rec.slot_loads()[0].tolist() == [1 + MAX_PENDING_SLOT_COUNTS + 3, 2]
    rec.reset()
    assert int(rec.slot_loads().sum()) == 0 and all(not p for p in rec.slot_pending)
