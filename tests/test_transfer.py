"""Tests for megatron_eplb.transfer: the pure plan (hypothesis) and the executor on 2 and 4 gloo processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist import run_distributed
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_eplb.placement import ExpertPlacement
from megatron_eplb.stats import moved_slots
from megatron_eplb.transfer import (
    LayerTransfer,
    TransferError,
    TransferExecutor,
    fold_checksum,
    plan_transfer,
    slot_checksum,
    slot_nbytes,
    slot_sums,
)


# ------------------------------------------------------------------------------------------ helpers
def random_placement(rng: np.random.Generator, num_layers: int, num_ranks: int, spr: int, num_experts: int):
    """Every expert at least once per layer, the rest random copies, slots shuffled."""
    rows = []
    for _ in range(num_layers):
        extra = rng.integers(0, num_experts, size=num_ranks * spr - num_experts)
        rows.append(rng.permutation(np.concatenate([np.arange(num_experts), extra])))
    return ExpertPlacement(np.array(rows), num_ranks, num_experts, allow_same_rank_copies=True)


def apply_plan(plan, old_phy2log: np.ndarray) -> np.ndarray:
    """Simulate a plan on the expert ids (reads from the old snapshot); checks every slot is written once."""
    out = old_phy2log.copy()
    spr = plan.slots_per_rank
    for t in plan.transfers:
        written = set()
        for src_rank, src, dst_rank, dst in t.sends.tolist():
            slot = dst_rank * spr + dst
            assert slot not in written, f"slot {slot} written twice"
            written.add(slot)
            out[t.layer, slot] = old_phy2log[t.layer, src_rank * spr + src]
        for rank, src, dst in t.local_copies.tolist():
            slot = rank * spr + dst
            assert slot not in written, f"slot {slot} written twice"
            written.add(slot)
            out[t.layer, slot] = old_phy2log[t.layer, rank * spr + src]
    return out


@st.composite
def placement_pairs(draw):
    num_ranks = draw(st.integers(1, 4))
    spr = draw(st.integers(1, 4))
    num_experts = draw(st.integers(1, num_ranks * spr))
    num_layers = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    old = random_placement(rng, num_layers, num_ranks, spr, num_experts)
    new = random_placement(rng, num_layers, num_ranks, spr, num_experts)
    if draw(st.booleans()):  # keep some slots so that "unchanged" really happens
        keep = rng.random(new.phy2log.shape) < 0.5
        mixed = np.where(keep, old.phy2log, new.phy2log)
        counts = [np.bincount(r, minlength=num_experts).min() for r in mixed]
        if min(counts) > 0:
            new = ExpertPlacement(mixed, num_ranks, num_experts, allow_same_rank_copies=True)
    return old, new


# ------------------------------------------------------------------------------------------ the plan
@settings(max_examples=150, deadline=None)
@given(placement_pairs())
def test_plan_properties(pair):
    old, new = pair
    plan = plan_transfer(old, new)
    spr = old.slots_per_rank
    # Every new slot ends with its new expert; each is written at most once.
    np.testing.assert_array_equal(apply_plan(plan, old.phy2log), new.phy2log)
    # Churn equals stats.moved_slots; bytes follow.
    np.testing.assert_array_equal(plan.moved_slots(), moved_slots(old, new))
    assert plan.bytes(10) == 10 * int(moved_slots(old, new).sum())
    for t in plan.transfers:
        o, n = old.phy2log[t.layer], new.phy2log[t.layer]
        for src_rank, src, dst_rank, dst in t.sends.tolist():
            expert = n[dst_rank * spr + dst]
            assert src_rank != dst_rank
            assert expert not in o[dst_rank * spr : (dst_rank + 1) * spr], "sent an expert the rank holds"
            assert o[src_rank * spr + src] == expert
        for rank, src, dst in t.local_copies.tolist():
            assert o[rank * spr + src] == n[rank * spr + dst]
        # Unchanged slots are skipped.
        touched = {d * spr + s for _, _, d, s in t.sends.tolist()} | {
            r * spr + d for r, _, d in t.local_copies.tolist()
        }
        assert not any(o[s] == n[s] for s in touched)
    # Deterministic, and the per-rank views partition the sends.
    again = plan_transfer(old, new)
    for a, b in zip(plan.transfers, again.transfers):
        np.testing.assert_array_equal(a.sends, b.sends)
        np.testing.assert_array_equal(a.local_copies, b.local_copies)
    assert plan.layers_changed == tuple(
        layer for layer in range(old.num_layers) if (old.phy2log[layer] != new.phy2log[layer]).any()
    )
    for layer in range(old.num_layers):
        views = [plan.for_rank(r).layer(layer) for r in range(old.num_ranks)]
        assert sum(v.sends_from(r).shape[0] for r, v in enumerate(views)) == plan.layer(layer).num_sends
        assert sum(v.num_local_copies for v in views) == plan.layer(layer).num_local_copies
    # Senders are least-loaded among holders: no send goes to a holder that had more sends than another
    # holder of that expert at the end (a necessary consequence of greedy least-sends-first).
    per_rank = plan.sends_per_rank()
    np.testing.assert_array_equal(per_rank.sum(axis=1), plan.moved_slots())
    np.testing.assert_array_equal(plan.recvs_per_rank().sum(axis=1), plan.moved_slots())
    staged = sum(plan.staging_slots(r) for r in range(old.num_ranks))
    assert (staged >= 2 * plan.moved_slots()).all() and (
        staged <= 2 * plan.moved_slots() + plan.local_copy_count()
    ).all()


def test_senders_spread_over_holders():
    # Expert 0 on ranks 0..3; one slot on each of ranks 4..7 needs it: one send per holder.
    old = np.array([[0, 1, 2] * 4 + [3, 4, 5] * 4])
    new = np.array([[0, 1, 2] * 4 + [0, 4, 5, 0, 4, 5, 3, 0, 5, 3, 0, 5]])
    old_p, new_p = ExpertPlacement(old, 8, 6), ExpertPlacement(new, 8, 6)
    plan = plan_transfer(old_p, new_p)
    assert sorted(plan.layer(0).sends[:, 0].tolist()) == [0, 1, 2, 3]
    assert plan.sends_per_rank()[0].max() == 1
    # Node preference: with 4 ranks per node every receiver is on node 1, holders on node 0: still spread.
    plan_node = plan_transfer(old_p, new_p, ranks_per_node=4)
    assert plan_node.sends_per_rank()[0].max() == 1


def test_node_preference():
    # Expert 0 on rank 0 (node 0) and rank 2 (node 1); rank 3 (node 1) needs it -> sent by rank 2.
    old = ExpertPlacement(np.array([[0, 1, 7, 2, 3, 7, 0, 4, 7, 5, 6, 7]]), 4, 8)
    new = ExpertPlacement(np.array([[0, 1, 7, 2, 3, 7, 0, 4, 7, 5, 6, 0]]), 4, 8)
    assert plan_transfer(old, new).layer(0).sends[0, 0] == 0  # least sends, then rank order
    assert plan_transfer(old, new, ranks_per_node=2).layer(0).sends[0, 0] == 2


def test_layers_subset_and_errors():
    rng = np.random.default_rng(0)
    old = random_placement(rng, 3, 2, 3, 5)
    new = random_placement(rng, 3, 2, 3, 5)
    plan = plan_transfer(old, new, layers=[1])
    assert plan.layer(0).is_empty and plan.layer(2).is_empty
    assert plan.moved_slots()[1] == moved_slots(old, new)[1]
    with pytest.raises(ValueError, match="out of range"):
        plan_transfer(old, new, layers=[3])
    with pytest.raises(ValueError, match="differ in shape"):
        plan_transfer(old, random_placement(rng, 3, 3, 2, 5))
    with pytest.raises(ValueError, match="out of range"):
        plan.for_rank(2)
    assert isinstance(plan.for_rank(1).layer(1), LayerTransfer)


def test_excluded_rank_refilled_and_emptied():
    # Rank 1 excluded (all -1) in old, holds experts in new; and the reverse.
    a = ExpertPlacement(np.array([[0, 1, 2, -1, -1, -1]]), 2, 3)
    b = ExpertPlacement(np.array([[0, 1, 2, 2, 0, 1]]), 2, 3)
    plan = plan_transfer(a, b)
    assert plan.moved_slots()[0] == 3 and set(plan.layer(0).sends[:, 0].tolist()) == {0}
    np.testing.assert_array_equal(apply_plan(plan, a.phy2log)[b.phy2log >= 0], b.phy2log[b.phy2log >= 0])
    back = plan_transfer(b, a)
    assert back.moved_slots()[0] == 0 and back.layers_changed == ()


def test_slot_checksum_bit_level():
    a = [torch.arange(12, dtype=torch.float32).reshape(3, 4), torch.ones(3, dtype=torch.bfloat16)]
    b = [t.clone() for t in a]
    assert int(slot_checksum(a)) == int(slot_checksum(b))
    b[0][1, 2] = torch.nextafter(b[0][1, 2], torch.tensor(100.0))
    assert int(slot_checksum(a)) != int(slot_checksum(b))
    swapped = [a[0].flatten().flip(0).reshape(3, 4), a[1]]
    assert int(slot_checksum(a)) != int(slot_checksum(swapped))
    assert int(slot_checksum([torch.zeros(3, dtype=torch.uint8)])) != int(
        slot_checksum([torch.zeros(5, dtype=torch.uint8)])
    )
    assert slot_checksum(a).dtype == torch.int64


def _reference_sums(t: torch.Tensor, max_words=None) -> tuple[int, int]:
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    x = raw.view(np.int16) if raw.size % 2 == 0 else raw
    if max_words is not None and x.size > max_words:
        x = x[:: -(-x.size // max_words)]
    x = x.astype(np.int64)
    w = np.arange(x.size, dtype=np.int64) % 65521 + 1
    return int((x * w).sum()), int(x.sum())


@pytest.mark.parametrize("max_words", [None, 7])
def test_slot_sums_batched_exact(monkeypatch, max_words):
    from megatron_eplb import transfer as tr

    gen = torch.Generator().manual_seed(3)
    slots = [
        [
            torch.randn(5, 9, generator=gen),
            torch.randn(11, generator=gen).bfloat16(),
            torch.randint(0, 2, (3,), generator=gen).bool(),  # odd byte count: hashed bytewise
            torch.zeros(0),
        ]
        for _ in range(4)
    ]
    sums = slot_sums(slots, max_words)
    assert sums.shape == (4, 4, 2) and sums.dtype == torch.int64
    for n, slot in enumerate(slots):
        for j, t in enumerate(slot):
            assert tuple(sums[n, j].tolist()) == (_reference_sums(t, max_words) if t.numel() else (0, 0))
        nbytes = [t.numel() * t.element_size() for t in slot]
        assert int(slot_checksum(slot, max_words)) == fold_checksum(sums[n], nbytes)
    # Tiny passes (several slots and column pieces per tensor): the same exact sums.
    monkeypatch.setattr(tr, "_PASS_WORDS", 8)
    monkeypatch.setattr(tr, "_WEIGHTS", {})
    assert torch.equal(slot_sums(slots, max_words), sums)
    # Extreme words: |x * w| stays below 2**31 (int32 products), the int64 sums stay exact.
    big = [[torch.full((70000,), -32768, dtype=torch.int16)]]
    assert tuple(slot_sums(big)[0, 0].tolist()) == _reference_sums(big[0][0])


# ------------------------------------------------------------------------------ multi-process executor
SHAPES = [((3, 4), torch.float32), ((5,), torch.bfloat16), ((2, 2), torch.int64), ((3,), torch.bool)]


def logical_tensors(layer: int, expert: int) -> list[torch.Tensor]:
    """The reference tensors of a logical expert: distinct per (layer, expert, tensor)."""
    g = torch.Generator().manual_seed(1000 * layer + expert)
    out = []
    for shape, dtype in SHAPES:
        if dtype == torch.bool:
            out.append(torch.rand(shape, generator=g) > 0.5)
        elif dtype == torch.int64:
            out.append(torch.randint(-(2**40), 2**40, shape, generator=g))
        else:
            out.append(torch.randn(shape, generator=g).to(dtype))
    return out


class Model:
    """Per-rank slot storage: ``store[layer][local_slot]`` is that slot's list of tensors."""

    def __init__(self, placement: ExpertPlacement, rank: int) -> None:
        local = placement.local_phy2log(rank)
        self.store = [
            [
                logical_tensors(layer, int(e)) if e >= 0 else [torch.zeros(s, dtype=d) for s, d in SHAPES]
                for e in local[layer]
            ]
            for layer in range(placement.num_layers)
        ]
        # A parameter-like tensor that requires grad must be writable too.
        self.store[0][0][0].requires_grad_(True)

    def slot_tensors(self, layer: int, local_slot: int) -> list[torch.Tensor]:
        return self.store[layer][local_slot]

    def snapshot(self):
        return [[[t.detach().clone() for t in slot] for slot in layer] for layer in self.store]

    def assert_holds(self, placement: ExpertPlacement, rank: int, layers=None) -> None:
        local = placement.local_phy2log(rank)
        for layer in range(placement.num_layers) if layers is None else layers:
            for k, e in enumerate(local[layer].tolist()):
                if e < 0:
                    continue
                for got, want in zip(self.store[layer][k], logical_tensors(layer, e)):
                    assert got.dtype == want.dtype and torch.equal(got.detach(), want), (
                        f"rank {rank} layer {layer} slot {k}: does not hold expert {e}"
                    )


def _scenarios(rank: int, world: int) -> None:
    import torch.distributed as dist

    spr, num_experts, num_layers = 3, 3 * world - 2, 3

    # 1. random placements, several tensors of different dtypes per slot, all layers.
    for seed in range(3):
        rng = np.random.default_rng(seed + 10 * world)
        old = random_placement(rng, num_layers, world, spr, num_experts)
        new = random_placement(rng, num_layers, world, spr, num_experts)
        new = ExpertPlacement(
            np.where(np.arange(num_layers)[:, None] == 2, old.phy2log, new.phy2log),
            world,
            num_experts,
            allow_same_rank_copies=True,
        )
        model = Model(old, rank)
        group = dist.new_group(backend="gloo")
        plan = plan_transfer(old, new)
        assert 2 not in plan.layers_changed
        ex = TransferExecutor(plan, model.slot_tensors, group)
        written = ex.run(timeout=30)
        model.assert_holds(new, rank)
        assert (
            written
            == plan.for_rank(rank).recvs_per_rank()[:, rank].sum()
            + plan.for_rank(rank).local_copy_count().sum()
        )
        assert ex.staging_bytes > 0 or written == 0

    # 2. swap chains: sources overwritten in the same layer (cross-rank cycle + local permutation);
    #    two layers in flight at once.
    num_experts = world * spr
    base = np.arange(world * spr)
    old = ExpertPlacement(np.stack([base, base]), world, num_experts)
    cyc = base.reshape(world, spr).copy()
    cyc[:, 0] = np.roll(cyc[:, 0], 1)  # slot 0 rotates around the ranks
    cyc[:, 1], cyc[:, 2] = cyc[:, 2].copy(), cyc[:, 1].copy()  # local swap on every rank
    new = ExpertPlacement(np.stack([cyc.reshape(-1), np.roll(base, spr)]), world, num_experts)
    model = Model(old, rank)
    group = dist.new_group(backend="gloo")
    plan = plan_transfer(old, new)
    assert plan.layer(0).num_local_copies == 2 * world and plan.layer(0).num_sends == world
    ex = TransferExecutor(plan, model.slot_tensors, group, checksums=True)
    h0, h1 = ex.start_layer(0), ex.start_layer(1)
    assert ex.staging_bytes == h0.staging_bytes + h1.staging_bytes
    assert h0.staging_bytes >= plan.staging_slots(rank)[0] * slot_nbytes(model.slot_tensors(0, 0)) > 0
    ex.finish_layer(h1, timeout=30)
    ex.finish_layer(h0, timeout=30)
    model.assert_holds(new, rank)
    peak = ex.peak_staging_bytes
    assert peak >= h0.staging_bytes + h1.staging_bytes

    # 3. checksum canary: clean after the transfer; a corrupted slot is found by every rank.
    assert ex.verify_layer(h0, timeout=30) == []
    assert ex.verify_layer(h1, timeout=30) == []
    victim = tuple(int(v) for v in plan.layer(1).sends[0, 2:])
    if rank == victim[0]:
        with torch.no_grad():
            model.store[1][victim[1]][1][0] += 1
    assert ex.verify_layer(h1, timeout=30) == [victim]

    # 4. clean failure (all messages posted, the failure hook fires on the last rank): every rank raises,
    #    nothing written, and the group stays usable.
    num_experts = 3 * world - 2
    rng = np.random.default_rng(99)
    old = random_placement(rng, 1, world, spr, num_experts)
    new = random_placement(rng, 1, world, spr, num_experts)
    model = Model(old, rank)
    before = model.snapshot()
    group = dist.new_group(backend="gloo")
    plan = plan_transfer(old, new)
    fail = 10**6 if rank == world - 1 else None
    ex = TransferExecutor(plan, model.slot_tensors, group, fail_after_sends=fail)
    with pytest.raises(TransferError) as err:
        ex.run(timeout=30)
    assert err.value.layer == 0 and err.value.rank == rank and not err.value.group_broken
    _assert_same(before, model.snapshot())
    ex.fail_after_sends = None
    ex.run(timeout=30)
    model.assert_holds(new, rank)

    # 5. half-way failure: one rank posts only its first send message; receivers time out; every rank
    #    raises TransferError and keeps its old tensors.
    model = Model(old, rank)
    before = model.snapshot()
    group = dist.new_group(backend="gloo")
    sender = int(np.argmax(plan.sends_per_rank()[0]))
    peers = sorted(set(plan.layer(0).sends_from(sender)[:, 2].tolist()))
    k = len(peers) - 1  # the last peer's message never goes out
    ex = TransferExecutor(plan, model.slot_tensors, group, fail_after_sends=k if rank == sender else None)
    with pytest.raises(TransferError) as err:
        ex.run(timeout=1.0)
    if rank == peers[-1]:
        assert err.value.group_broken and "receive failed" in str(err.value)
    _assert_same(before, model.snapshot())
    dist.barrier()  # the default group is unaffected


def _assert_same(a, b) -> None:
    for la, lb in zip(a, b):
        for sa, sb in zip(la, lb):
            for ta, tb in zip(sa, sb):
                assert torch.equal(ta, tb)


@pytest.mark.parametrize("world", [2, 4])
def test_executor_gloo(world):
    run_distributed(_scenarios, world, timeout=120)


def _single(rank: int, world: int) -> None:
    import torch.distributed as dist

    rng = np.random.default_rng(5)
    old = random_placement(rng, 2, 1, 4, 3)
    new = random_placement(rng, 2, 1, 4, 3)
    model = Model(old, rank)
    plan = plan_transfer(old, new)
    assert plan.moved_slots().sum() == 0  # one rank: only local copies
    TransferExecutor(plan, model.slot_tensors, dist.group.WORLD).run()
    model.assert_holds(new, rank)


def test_executor_single_rank():
    run_distributed(_single, 1, timeout=60)


# --------------------------------------------------------------- chunked messages, pipelined run()
def test_rounds_split_runs_into_pieces():
    from megatron_eplb.transfer import _rounds

    runs = [(1, 0, 5), (2, 5, 2), (3, 7, 1)]
    assert _rounds(runs, None) == [runs]
    assert _rounds(runs, 2) == [[(1, 0, 2), (2, 5, 2), (3, 7, 1)], [(1, 2, 2)], [(1, 4, 1)]]
    assert _rounds([], 3) == []
    pieces = [p for r in _rounds(runs, 1) for p in r]
    assert sorted(p[1] for p in pieces) == list(range(8)) and all(p[2] == 1 for p in pieces)


def _fail_on_layer(ex: TransferExecutor, layer: int, rank: int, failing_rank: int) -> None:
    """Make ``ex`` fire the failure hook (every message posted) on ``failing_rank`` for ``layer`` only."""
    original = ex.start_layer

    def start(which: int):
        ex.fail_after_sends = 10**6 if which == layer and rank == failing_rank else None
        return original(which)

    ex.start_layer = start


def _chunk_scenarios(rank: int, world: int) -> dict:
    import torch.distributed as dist

    spr, num_layers = 4, 3
    num_experts = world * spr - 3
    slot_bytes = slot_nbytes(logical_tensors(0, 0))
    out = {}

    # 1. every variant moves every slot bitwise: pieces of one slot (one round per slot), pieces of 3 slots,
    #    one message per peer; pipelined and layer-by-layer run(); staged and direct local copies.
    variants = [
        (1, True, True),
        (1, False, False),
        (3 * slot_bytes, True, False),
        (0, True, True),
        (None, False, True),
    ]
    for seed, (chunk, pipeline, direct) in enumerate(variants):
        rng = np.random.default_rng(100 + seed)
        old = random_placement(rng, num_layers, world, spr, num_experts)
        new = random_placement(rng, num_layers, world, spr, num_experts)
        model = Model(old, rank)
        plan = plan_transfer(old, new)
        group = dist.new_group(backend="gloo")
        ex = TransferExecutor(
            plan, model.slot_tensors, group, chunk_bytes=chunk, pipeline=pipeline, direct_local_copies=direct
        )
        written = ex.run(timeout=30)
        model.assert_holds(new, rank)
        mine = plan.for_rank(rank)
        assert written == mine.recvs_per_rank()[:, rank].sum() + mine.local_copy_count().sum()

    # 2. pieces of one slot, two layers in flight, canary: one work per slot message (gloo: one per op).
    rng = np.random.default_rng(7)
    old = random_placement(rng, 2, world, spr, num_experts)
    new = ExpertPlacement(np.roll(old.phy2log, spr, axis=1), world, num_experts, allow_same_rank_copies=True)
    model = Model(old, rank)
    plan = plan_transfer(old, new)
    group = dist.new_group(backend="gloo")
    ex = TransferExecutor(plan, model.slot_tensors, group, chunk_bytes=1, checksums=True)
    h0, h1 = ex.start_layer(0), ex.start_layer(1)
    for h in (h0, h1):
        part = plan.layer(h.layer)
        assert len(h._works) == len(part.sends_from(rank)) + len(part.recvs_to(rank)) > 2
    ex.finish_layer(h0, timeout=30)
    ex.finish_layer(h1, timeout=30)
    model.assert_holds(new, rank)
    assert ex.verify_layer(h0, timeout=30) == [] and ex.verify_layer(h1, timeout=30) == []

    # 3. pipelined run() with a failure in the middle layer: layer 0 committed, layers 1 and 2 untouched on
    #    every rank, nothing of layer 2 posted; the group stays usable and the rest moves afterwards.
    rng = np.random.default_rng(11)
    old = random_placement(rng, num_layers, world, spr, num_experts)
    new = ExpertPlacement(np.roll(old.phy2log, spr, axis=1), world, num_experts, allow_same_rank_copies=True)
    model = Model(old, rank)
    before = model.snapshot()
    plan = plan_transfer(old, new)
    assert plan.layers_changed == (0, 1, 2)
    group = dist.new_group(backend="gloo")
    ex = TransferExecutor(plan, model.slot_tensors, group, chunk_bytes=2 * slot_bytes)
    posted = []
    _fail_on_layer(ex, 1, rank, world - 1)
    start = ex.start_layer
    ex.start_layer = lambda layer: posted.append(layer) or start(layer)
    with pytest.raises(TransferError) as err:
        ex.run(timeout=30)
    assert err.value.layer == 1 and not err.value.group_broken
    assert posted == [0, 1]
    model.assert_holds(new, rank, layers=[0])
    _assert_same(before[1:], model.snapshot()[1:])
    del ex.start_layer  # the class's method again
    ex.fail_after_sends = None
    ex.run(layers=[1, 2], timeout=30)
    model.assert_holds(new, rank)
    out["pipeline_failure"] = True

    # 4. half-way failure inside a chunked message: the sender posts only its first piece, the receiver of
    #    the rest times out; every rank raises and keeps its old tensors.
    model = Model(old, rank)
    before = model.snapshot()
    group = dist.new_group(backend="gloo")
    plan1 = plan_transfer(old, new, layers=[0])
    ex = TransferExecutor(
        plan1, model.slot_tensors, group, chunk_bytes=1, fail_after_sends=1 if rank == 0 else None
    )
    with pytest.raises(TransferError) as err:
        ex.run(timeout=1.0)
    if rank == 1:  # rank 0 sends its slots to rank 1, one piece of the spr arrived
        assert err.value.group_broken and "receive failed" in str(err.value)
    _assert_same(before, model.snapshot())
    dist.barrier()
    return out


def test_executor_chunks_and_pipeline_gloo():
    assert all(r["pipeline_failure"] for r in run_distributed(_chunk_scenarios, 3, timeout=120))


def test_p2p_bench_cpu_smoke(tmp_path):
    """benchmarks/p2p_bench.py on 2 gloo processes: every variant asked for moves the slots bitwise."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from dist import free_port

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "p2p.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(root / "benchmarks" / "p2p_bench.py"), "--small", "--reps", "1", "--warmup", "1",
           "--variants", "raw_piece,legacy_layer,default_run,default_all,vote_in_transfer_group", "--out", str(out)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["variants"]) == ["raw_layer", "raw_piece", "legacy_layer", "default_run", "default_all",
                                        "vote_in_transfer_group"]  # fmt: skip
    assert all(r["correct"] and r["bytes_per_s_per_rank"] > 0 for r in result["variants"].values())
    assert result["variants"]["raw_layer"]["ratio_to_raw_layer"] == 1.0
    assert "| default_run |" in proc.stdout


def _non_contiguous(rank: int, world: int) -> None:
    import torch.distributed as dist

    # Slots whose tensors are transposed / strided views; staged local copies go through pack and unpack.
    old = ExpertPlacement(np.array([[0, 1, 2, 3]]), 1, 4)
    new = ExpertPlacement(np.array([[3, 0, 1, 2]]), 1, 4)
    bases = [torch.randn(4, 6, generator=torch.Generator().manual_seed(e)) for e in range(4)]
    store = [[bases[e].t(), bases[e][:, ::2].bfloat16()] for e in range(4)]
    want = [[t.clone() for t in store[e]] for e in (3, 0, 1, 2)]
    plan = plan_transfer(old, new)
    ex = TransferExecutor(plan, lambda layer, k: store[k], dist.group.WORLD, direct_local_copies=False)
    assert ex.run() == 4
    for got, ref in zip(store, want):
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_executor_non_contiguous_slots():
    run_distributed(_non_contiguous, 1, timeout=60)
