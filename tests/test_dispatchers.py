"""patches/megatron/dispatchers.py: the pure routing of (token, logical expert) pairs to physical slots."""

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_eplb.patches.megatron.dispatchers import route_to_slots  # noqa: E402

from megatron_eplb.placement import ExpertPlacement  # noqa: E402


def test_route_to_slots_even_split():
    placement = ExpertPlacement(np.array([[0, 1, 2, 0, 3, 0]]), 3, 4)
    routing_map = torch.zeros(7, 4, dtype=torch.bool)
    routing_map[:, 0] = True
    routing_map[::2, 2] = True
    probs = torch.rand(7, 4) * routing_map
    log2phy = torch.tensor(placement.log2phy[0])
    count = torch.tensor(placement.replica_count[0])
    phys_probs, phys_map = route_to_slots(probs, routing_map, log2phy, count, 6)
    assert phys_map.shape == (7, 6)
    assert phys_map[:, [0, 3, 5]].sum(0).tolist() == [3, 2, 2]  # 7 pairs of expert 0 over 3 copies
    assert phys_map[:, 2].sum() == 4 and phys_map[:, [1, 4]].sum() == 0
    # each pair lands in exactly one copy with its probability
    logical = torch.zeros(7, 4).index_add_(1, torch.as_tensor(placement.phy2log[0]), phys_probs)
    torch.testing.assert_close(logical, probs)
    # local_first: rank 1 holds slots 2, 3 -> expert 0 stays on slot 3
    local = torch.tensor([3, -1, 2, -1])
    _, lf_map = route_to_slots(probs, routing_map, log2phy, count, 6, local_slot=local)
    assert lf_map[:, 3].sum() == 7


def test_route_to_slots_per_batch_shares_over_source_ranks():
    """``split``: each source rank routes its pairs by the shared bounds; together the copies get their shares."""
    from megatron_eplb.replica_split import balanced_shares, copy_bounds, replica_tables, source_offsets

    placement = ExpertPlacement(np.array([[0, 1, 2, 0, 3, 1, 0, 2, 3]]), 3, 4)  # 3 ranks x 3 slots
    gen = torch.Generator().manual_seed(0)
    maps = [torch.rand(11, 4, generator=gen) < torch.tensor([0.9, 0.5, 0.3, 0.2]) for _ in range(3)]
    counts = torch.stack([m.sum(0) for m in maps])  # [N_src, E]
    tables = replica_tables(placement.phy2log[0], 3, 4)
    shares = balanced_shares(counts.sum(0), tables)
    bounds, first = copy_bounds(shares), source_offsets(counts)
    log2phy = torch.tensor(placement.log2phy[0])
    count = torch.tensor(placement.replica_count[0])
    per_slot = torch.zeros(9, dtype=torch.int64)
    for src, routing_map in enumerate(maps):
        probs = torch.rand(11, 4, generator=gen) * routing_map
        phys_probs, phys_map = route_to_slots(
            probs, routing_map, log2phy, count, 9, split=(first[src], bounds)
        )
        logical = torch.zeros(11, 4).index_add_(1, torch.as_tensor(placement.phy2log[0]), phys_probs)
        torch.testing.assert_close(logical, probs)  # every pair in exactly one copy, with its probability
        assert torch.equal(phys_map.sum(1), routing_map.sum(1))
        per_slot += phys_map.sum(0)
    valid = log2phy >= 0
    assert torch.equal(per_slot[log2phy[valid]], shares[valid])
