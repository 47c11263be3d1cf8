"""Tests for megatron_eplb.transfer.plan: the pure transfer plan (hypothesis), local copy order, message rounds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_eplb.placement import ExpertPlacement
from megatron_eplb.stats import moved_slots
from megatron_eplb.transfer import LayerTransfer, plan_transfer
from megatron_eplb.transfer.plan import _rounds, message_rounds


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


# ------------------------------------------------------------------------------------ message rounds
def test_rounds_split_runs_into_pieces():
    runs = [(1, 0, 5), (2, 5, 2), (3, 7, 1)]
    assert _rounds(runs, None) == [runs]
    assert _rounds(runs, 2) == [[(1, 0, 2), (2, 5, 2), (3, 7, 1)], [(1, 2, 2)], [(1, 4, 1)]]
    assert _rounds([], 3) == []
    pieces = [p for r in _rounds(runs, 1) for p in r]
    assert sorted(p[1] for p in pieces) == list(range(8)) and all(p[2] == 1 for p in pieces)
    # message_rounds: runs of a peer array, cut the same way.
    peers = np.array([1] * 5 + [2] * 2 + [3], dtype=np.int64)
    assert message_rounds(peers, 2) == _rounds(runs, 2)
    assert message_rounds(np.zeros(0, dtype=np.int64), None) == []
