"""Low-churn rebalancing: start from the current placement and change only what pays.

Steps, per layer, all layers at once:

1. **repair** what the new call makes invalid (forced moves): slots of newly excluded ranks are emptied,
   experts left without a copy are re-placed, slots of newly included ranks are filled, and same-rank
   duplicate copies are re-pointed;
2. a layer whose hottest rank is within ``churn_weight`` of the mean is left alone;
3. otherwise **local search**: swaps between the hottest rank and any other rank (2 moved slots) and
   re-pointed replicas (1 moved slot), the best balance gain per moved slot first, each move cutting the
   hottest rank by at least ``churn_weight x`` the mean rank load, until no move qualifies.

Experts that stay on a rank keep their slot (a move only rewrites the slot it changes), so churn counts
only slots that need a transfer.  ``churn_weight = 0`` chases balance; larger values move less.
SwiftBalancer's rules (re-plan a layer only if max/mean >= 1.01, a swap must cut the hottest rank by 1% of
the mean, keep a layer's new plan only if it improves) are the default's floor: every move here improves
the layer by at least that much.
"""

from __future__ import annotations

import numpy as np

from .common import Problem, homes_from_placement
from .greedy import plan_global
from .hierarchical import node_aware, plan_hierarchical, strict_duplicates
from .registry import Plan, PolicyOptions, register_policy
from .search import SearchState, local_search

__all__ = ["plan_low_churn", "homes_from_placement", "keep_slots", "low_churn_policy"]


def _home_violations(phy2log, home, rank_node, num_experts, locality) -> np.ndarray:
    """bool ``[L]``: layers that break the locality rule under ``home``."""
    num_layers, num_slots = phy2log.shape
    slot_node = rank_node[np.arange(num_slots) // (num_slots // len(rank_node))]
    valid = phy2log >= 0
    safe = np.where(valid, phy2log, 0)
    at_home = valid & (np.take_along_axis(home, safe, axis=1) == slot_node[None, :])
    if locality == "strict":
        return (valid & ~at_home).any(axis=1)
    home_copies = np.zeros((num_layers, num_experts), dtype=np.int64)
    rows = np.broadcast_to(np.arange(num_layers)[:, None], phy2log.shape)
    np.add.at(home_copies, (rows[at_home], phy2log[at_home]), 1)
    return (home_copies == 0).any(axis=1)


def _repair(state: SearchState, problem: Problem) -> None:
    """Forced moves: fill empty slots on active ranks, place missing experts, remove same-rank duplicates.

    One slot per layer per iteration; the expert chosen for a slot is a missing one (heaviest first), else
    the one whose extra copy relieves most (``w/c - w/(c+1)``) among experts not yet on that rank.
    """
    num_experts, spr = state.num_experts, state.spr
    active_slot = problem.active[state.slot_rank]
    slot_node = state.rank_node[state.slot_rank]
    for _ in range(state.num_slots + num_experts):
        slot_e = state.slot_e
        counts = state.counts[:, :num_experts]
        missing = counts == 0
        empty = (slot_e < 0) & active_slot[None, :]
        dup = np.zeros_like(empty)
        if not state.allow_duplicates:
            per_rank = slot_e.reshape(state.num_layers, state.num_ranks, spr)
            earlier = (per_rank[:, :, :, None] == per_rank[:, :, None, :]) & np.tril(
                np.ones((spr, spr), dtype=bool), -1
            )
            dup = (earlier.any(axis=3) & (per_rank >= 0)).reshape(slot_e.shape)
        need = missing.any(axis=1) | empty.any(axis=1) | dup.any(axis=1)
        if not need.any():
            return
        A = np.nonzero(need)[0]
        rl = state.rank_loads(A)
        # target slot: an empty slot, else a duplicate, else a copy of a multi-copy expert on the coldest rank
        slot_counts = np.take_along_axis(
            np.concatenate([counts, np.zeros((state.num_layers, 1), np.int64)], 1),
            np.where(slot_e >= 0, slot_e, num_experts),
            axis=1,
        )
        spare = (slot_counts >= 2) & active_slot[None, :]
        if state.locality != "none":
            # never take the last home copy of an expert
            home_slot = np.take_along_axis(state.home, np.where(slot_e >= 0, slot_e, 0), axis=1) == slot_node
            spare &= ~home_slot | (
                np.take_along_axis(state.home_cnt, np.where(slot_e >= 0, slot_e, num_experts), axis=1) >= 2
            )
        prio = np.where(empty[A], 0.0, np.where(dup[A], 1.0, np.where(spare[A], 2.0, np.inf)))
        prio = prio + rl[:, state.slot_rank] / np.maximum(rl.max(axis=1, keepdims=True), 1e-300) * 0.5
        slot = prio.argmin(axis=1)
        usable = np.isfinite(prio[np.arange(len(A)), slot])
        r = state.slot_rank[slot]
        w = state.weight[A]
        c = counts[A].astype(np.float64)
        relief = w / np.maximum(c, 1) - w / (c + 1)
        allowed = state.has[A, r, :num_experts] == 0
        if state.locality == "strict":
            allowed &= state.home[A] == slot_node[slot][:, None]
        if state.allow_duplicates:  # a second copy on the rank only when nothing else fits
            fallback = np.ones_like(allowed)
            if state.locality == "strict":
                fallback = state.home[A] == slot_node[slot][:, None]
            allowed = np.where(allowed.any(axis=1, keepdims=True), allowed, fallback)
        lost = missing[A] & allowed
        score = np.where(
            lost.any(axis=1, keepdims=True),
            np.where(lost, w + 1.0, -np.inf),
            np.where(allowed, relief, -np.inf),
        )
        y = score.argmax(axis=1)
        ok = usable & np.isfinite(score[np.arange(len(A)), y])
        # An only-missing layer with no spare slot cannot be fixed: stop rather than loop forever.
        if not ok.any():
            return
        state.apply_repoint(A[ok], slot[ok], y[ok])


def keep_slots(new: np.ndarray, old: np.ndarray, num_ranks: int) -> np.ndarray:
    """Reorder each rank's slots so that every expert the rank held in ``old`` sits in its old slot.

    Args:
        new, old: int64 ``[L, P]`` (no two copies of one expert on a rank).
    Returns:
        int64 ``[L, P]``: ``new`` with slots permuted within ranks only.
    """
    num_layers, num_slots = new.shape
    spr = num_slots // num_ranks
    new_r = new.reshape(num_layers, num_ranks, spr)
    old_r = old.reshape(num_layers, num_ranks, spr)
    eq = (new_r[..., :, None] == old_r[..., None, :]) & (new_r >= 0)[..., :, None]
    kept = eq.any(axis=3)
    target = eq.argmax(axis=3)
    taken = eq.any(axis=2)
    free_pos = np.argsort(taken, axis=2, kind="stable")  # untaken positions first, in slot order
    nth_free = np.cumsum(~kept, axis=2) - 1
    target = np.where(kept, target, np.take_along_axis(free_pos, np.maximum(nth_free, 0), axis=2))
    out = np.empty_like(new_r)
    np.put_along_axis(out, target, new_r, axis=2)
    return out.reshape(num_layers, num_slots)


def plan_low_churn(
    problem: Problem,
    previous: np.ndarray,
    *,
    churn_weight: float = 0.01,
    home: np.ndarray | None = None,
    locality: str = "none",
    max_iters: int | None = None,
    allow_duplicates: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Rebalance ``previous`` towards ``problem.load`` with few moved slots.

    Args:
        problem: checked problem.
        previous: int64 ``[L, P]`` current phy2log.
        churn_weight: a move must cut the hottest rank by at least this fraction of the mean rank load.
        home: int64 ``[L, E]`` home node of each expert (node-aware), else None.
        locality: ``"none"``, ``"strict"`` or ``"relaxed"``.
        max_iters: cap on moves per layer (default ``P``).
        allow_duplicates: accept two copies of one expert on a rank (strict locality that forces them).
    Returns:
        phy2log: int64 ``[L, P]``; touched: bool ``[L]`` layers that changed.
    """
    phy2log = np.array(previous, dtype=np.int64)
    spr = problem.slots_per_rank
    slot_rank = np.arange(problem.num_slots) // spr
    phy2log[:, ~problem.active[slot_rank]] = -1
    state = SearchState(
        problem.load,
        phy2log,
        problem.num_ranks,
        home=home,
        rank_node=problem.rank_node,
        locality=locality,
        original=previous,
        allow_duplicates=problem.dup_unavoidable or allow_duplicates,
    )
    state.rank_active = problem.active.copy()
    _repair(state, problem)
    layers = np.arange(problem.num_layers)
    rl = state.rank_loads(layers)[:, problem.active]
    mean, peak = rl.mean(axis=1), rl.max(axis=1)
    min_gain = np.maximum(churn_weight * mean, 1e-9 * mean)
    todo = layers[peak - mean >= min_gain]
    local_search(
        state,
        todo,
        min_gain,
        repoint=True,
        use_cost=True,
        max_iters=problem.num_slots if max_iters is None else max_iters,
    )
    phy2log = state.slot_e
    if not state.allow_duplicates:
        phy2log = keep_slots(phy2log, np.asarray(previous, dtype=np.int64), problem.num_ranks)
    return phy2log, state.moves > 0


@register_policy("low_churn")
def low_churn_policy(problem: Problem, previous, options: PolicyOptions) -> Plan:
    """``policy="low_churn"``: :func:`plan_low_churn` from ``previous``.

    Without ``previous`` there is nothing to keep: a fresh global or hierarchical placement, reported as
    ``low_churn(fresh)``.  Node-aware (:func:`~.hierarchical.node_aware`): layers of ``previous`` that break
    ``options.node_locality`` are planned afresh first (``info["replanned_layers"]``).
    """
    churn, max_moves = options.churn_weight, options.max_moves_per_layer
    if not node_aware(problem):
        if previous is None:
            return Plan(plan_global(problem), policy="low_churn(fresh)")
        phy2log, touched = plan_low_churn(problem, previous.phy2log, churn_weight=churn, max_iters=max_moves)
        return Plan(phy2log, policy="low_churn", info={"changed_layers": int(touched.sum())})
    locality = options.node_locality
    dups = locality == "strict" and strict_duplicates(problem)
    if previous is None:
        phy2log, home = plan_hierarchical(problem, locality)
        return Plan(phy2log, "low_churn(fresh)", locality=locality, home_node=home, allow_duplicates=dups)
    home = homes_from_placement(previous.phy2log, problem.rank_node, problem.num_experts, problem.num_groups)
    prev = previous.phy2log
    bad = _home_violations(prev, home, problem.rank_node, problem.num_experts, locality)
    if bad.any():  # layers that break the locality rule are planned afresh
        fresh, fresh_home = plan_hierarchical(problem, locality)
        prev = np.where(bad[:, None], fresh, prev)
        home = np.where(bad[:, None], fresh_home, home)
    phy2log, touched = plan_low_churn(
        problem,
        prev,
        churn_weight=churn,
        home=home,
        locality=locality,
        max_iters=max_moves,
        allow_duplicates=dups,
    )
    info = {"changed_layers": int((touched | bad).sum()), "replanned_layers": int(bad.sum())}
    return Plan(phy2log, "low_churn", locality=locality, home_node=home, allow_duplicates=dups, info=info)
