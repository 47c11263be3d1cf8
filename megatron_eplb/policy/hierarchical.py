"""Node-aware placement for group-limited routing (``E`` experts in ``G`` groups, ranks on ``nodes`` nodes).

Steps: pack expert groups to nodes (equal group counts, sorted LPT; with two groups per node this is the
optimal pairing) → replicate → LPT pack copies to ranks → refinement swaps.

- ``strict``: every copy of a group's experts stays on the group's node (DeepSeek's rule); each node
  replicates within its own slots.  The pairing of groups caps balance.
- ``relaxed``: the first (primary) copy of each expert stays on its group's node; redundant copies go where
  they balance best, across nodes too.

Then per layer the better of the simpler plans that keep the rule (:func:`node_aware_best`): strict takes
``greedy``'s and ``deepseek``'s, relaxed also strict's.
"""

from __future__ import annotations

import numpy as np

from .candidates import Best, keep_best, keep_lower, node_bound, peak_rank_load, sub_problem
from .common import PolicyError, Problem, items_from_counts, packing_bound, replicate_for_packing
from .greedy import global_best, refine
from .packing import lpt_pack, phy2log_from_items, separate_copies
from .registry import Plan, PolicyOptions, register_policy
from .search import SearchState

__all__ = [
    "group_home_nodes",
    "hierarchical_policy",
    "node_aware",
    "node_aware_best",
    "plan_hierarchical",
    "plan_hierarchical_own",
    "strict_duplicates",
]


def node_aware(problem: Problem) -> bool:
    """Whether the topology supports node-aware placement (more than one node, groups spread evenly)."""
    g, n = problem.num_groups, problem.num_nodes
    return n > 1 and g >= n and g % n == 0 and problem.num_experts % g == 0


def strict_duplicates(problem: Problem) -> bool:
    """Strict locality with more slots per rank than a node's experts: a rank must hold two copies."""
    return problem.slots_per_rank > problem.num_experts // problem.num_nodes


def group_home_nodes(load: np.ndarray, num_groups: int, num_nodes: int) -> np.ndarray:
    """Pack expert groups to nodes, ``G / nodes`` groups per node, heaviest group first to the lightest node.

    Args:
        load: float ``[L, E]``.
    Returns:
        int64 ``[L, E]`` home node of every expert.
    """
    num_layers, num_experts = load.shape
    group_load = load.reshape(num_layers, num_groups, -1).sum(axis=2)
    groups = np.broadcast_to(np.arange(num_groups), group_load.shape)
    group_node = lpt_pack(group_load, groups, num_groups, np.full(num_nodes, num_groups // num_nodes))
    return np.repeat(group_node, num_experts // num_groups, axis=1)


def _check_capacity(problem: Problem, home: np.ndarray) -> np.ndarray:
    """int ``[nodes]`` slots per node; raise when a node cannot hold one copy of each of its experts."""
    node_slots = (
        np.bincount(problem.rank_node[problem.active], minlength=problem.num_nodes) * problem.slots_per_rank
    )
    need = problem.num_experts // problem.num_nodes
    short = np.nonzero(node_slots < need)[0]
    if len(short):
        n = int(short[0])
        raise PolicyError(
            f"node {n} has {int(node_slots[n])} slots on its active ranks but must hold its "
            f"{need} experts (exclude_ranks leaves too few); exclude fewer ranks there or use policy='greedy'"
        )
    return node_slots


def replicate_relaxed(
    load: np.ndarray, home: np.ndarray, node_slots: np.ndarray, ranks_per_node: np.ndarray, dup_ok: bool
) -> np.ndarray:
    """Redundant copies for relaxed locality, and the node each one lives on.

    Each step looks at the two lower bounds on the hottest rank: the hottest node's load over its ranks, and
    the heaviest copy.  If the node bound is higher, the step copies the expert whose new copy takes most
    load off the hottest node; otherwise the heaviest copy's expert.  The copy goes to the node with the
    lowest load per rank that has a free slot (and a rank without that expert).

    Args:
        load: float ``[L, E]``; home: int ``[L, E]`` home node of each expert (its primary copy).
        node_slots: int ``[nodes]`` slots per node; ranks_per_node: int ``[nodes]`` active ranks.
        dup_ok: copies of one expert may exceed a node's ranks.
    Returns:
        int64 ``[L, E, nodes]`` copies of each expert on each node.
    """
    num_layers, num_experts = load.shape
    nodes = len(node_slots)
    rows = np.arange(num_layers)
    on_node = (home[:, :, None] == np.arange(nodes)).astype(np.int64)
    free = np.broadcast_to(node_slots - on_node.sum(axis=1)[0], (num_layers, nodes)).copy()
    per_rank = np.maximum(ranks_per_node, 1).astype(np.float64)
    node_cap = np.where(dup_ok, np.iinfo(np.int64).max, ranks_per_node)
    for _ in range(int(free.sum(axis=1).max(initial=0))):
        copies = on_node.sum(axis=2)
        per_copy = load / copies
        node_load = np.einsum("le,len->ln", per_copy, on_node) / per_rank
        hot = node_load.argmax(axis=1)
        heaviest = per_copy.max(axis=1)
        on_hot = on_node[rows, :, hot]
        can_go = ((free[:, None, :] > 0) & (on_node < node_cap)).any(axis=2)  # [L, E]
        relief = np.where(can_go, on_hot * load / (copies * (copies + 1.0)), -1.0)
        room = can_go.any(axis=1)
        e = np.where(
            node_load[rows, hot] > heaviest,
            relief.argmax(axis=1),
            np.where(can_go, per_copy, -1.0).argmax(axis=1),
        )
        fits = (free > 0) & (on_node[rows, e] < node_cap)
        target = np.where(fits, node_load, np.inf).argmin(axis=1)
        ok = room & fits[rows, target]
        on_node[rows[ok], e[ok], target[ok]] += 1
        free[rows[ok], target[ok]] -= 1
    return on_node


def plan_hierarchical_own(problem: Problem, locality: str = "relaxed", *, refine_passes: bool = True):
    """Node-aware placement by this policy's own steps (groups to nodes → replicate → pack → refine).

    Copy counts: ``strict`` replicates within each node (:func:`~.common.replicate_for_packing`, whose
    alternative counts are packed too where they bound lower); ``relaxed`` by :func:`replicate_relaxed`, and
    where the global counts of :func:`~.common.replicate_for_packing` have a lower
    :func:`~.common.packing_bound` than those, also by them (the primary copy at home, the others anywhere).
    The lower peak is kept per layer.

    Args:
        problem: checked problem with ``num_nodes > 1`` and ``num_groups`` a multiple of ``num_nodes``.
        locality: ``"relaxed"`` or ``"strict"``.
    Returns:
        phy2log: int64 ``[L, P]``; home: int64 ``[L, E]`` home node of every expert.
    """
    load = problem.load
    num_layers, num_experts = load.shape
    nodes = problem.num_nodes
    home = group_home_nodes(load, problem.num_groups, nodes)
    node_slots = _check_capacity(problem, home)
    ranks_per_node = np.bincount(problem.rank_node[problem.active], minlength=nodes)
    spr = problem.slots_per_rank
    if locality == "strict":
        # Replicate within each node: rows [L * nodes, E / nodes], experts ordered by home node (stable).
        order = np.argsort(home, axis=1, kind="stable")
        node_weight = np.take_along_axis(load, order, axis=1).reshape(num_layers * nodes, -1)
        extra = np.tile(node_slots - num_experts // nodes, num_layers)
        bins = np.tile(ranks_per_node, num_layers)
        max_copies = bins if not strict_duplicates(problem) else int(node_slots.max())
        apart = not (problem.dup_unavoidable or strict_duplicates(problem))
        plain, other, better = replicate_for_packing(
            node_weight, extra, max_copies, np.maximum(bins, 1), spr, apart=apart
        )
        counts = np.empty((2, num_layers, num_experts), dtype=np.int64)
        np.put_along_axis(counts[0], order, plain.reshape(num_layers, num_experts), axis=1)
        np.put_along_axis(counts[1], order, other.reshape(num_layers, num_experts), axis=1)
        phy2log = _pack_counts(problem, locality, home, counts[0], refine_passes)
        rows = np.nonzero(better.reshape(num_layers, nodes).any(axis=1))[0]
        if len(rows):
            sub = sub_problem(problem, rows)
            other = _pack_counts(sub, locality, home[rows], counts[1, rows], refine_passes)
            keep_lower(phy2log, rows, other, problem, not apart)
        return phy2log, home
    copies_on_node = replicate_relaxed(load, home, node_slots, ranks_per_node, problem.dup_unavoidable)
    flat = copies_on_node.reshape(num_layers, -1)  # [L, E * nodes]
    item_index = np.repeat(np.tile(np.arange(flat.shape[1]), num_layers), flat.ravel()).reshape(
        num_layers, -1
    )
    item_expert, item_node = np.divmod(item_index, nodes)
    item_weight = (load / copies_on_node.sum(axis=2))[np.arange(num_layers)[:, None], item_expert]
    phy2log = _pack_items(problem, locality, home, item_expert, item_weight, item_node, refine_passes)
    # Where the global counts bound lower than these (copies that cannot fill whole rounds of the ranks), also
    # those: primary copies at home, taken first among equal copies.
    n_active, apart = int(problem.active.sum()), not problem.dup_unavoidable
    extra = np.full(num_layers, problem.num_active_slots - num_experts)
    max_copies = problem.num_active_slots if problem.dup_unavoidable else n_active
    plain, other, better = replicate_for_packing(load, extra, max_copies, n_active, spr, apart=apart)
    counts = np.where(better[:, None], other, plain)
    own = packing_bound(load, copies_on_node.sum(axis=2), n_active, spr, apart=apart)
    rows = np.nonzero(own > packing_bound(load, counts, n_active, spr, apart=apart) * (1 + 1e-12))[0]
    if len(rows):
        item_expert, item_weight, primary, item_home = items_from_counts(counts[rows], load[rows], home[rows])
        item_node = np.where(primary, item_home, -1)
        order = np.lexsort((~primary, -item_weight))  # heaviest first, primary copies first among equals
        sub = sub_problem(problem, rows)
        alt = _pack_items(
            sub, locality, home[rows], item_expert, item_weight, item_node, refine_passes, order
        )
        keep_lower(phy2log, rows, alt, problem, problem.dup_unavoidable)
    return phy2log, home


def _pack_counts(problem: Problem, locality: str, home: np.ndarray, counts: np.ndarray, refine_passes: bool):
    """Strict: every copy (int ``counts [L, E]``) on its home node; :func:`_pack_items`."""
    item_expert, item_weight, _, item_node = items_from_counts(counts, problem.load, home)
    return _pack_items(problem, locality, home, item_expert, item_weight, item_node, refine_passes)


def _pack_items(
    problem, locality, home, item_expert, item_weight, item_node, refine_passes, order=None
) -> np.ndarray:
    """Pack items (int ``item_expert [L, K]``, float ``item_weight``, int ``item_node``: ``-1`` free; optional
    int ``order``) onto the active ranks (:func:`~.common.lpt_pack`), then refine: int64 ``[L, P]``."""
    load = problem.load
    capacity = np.where(problem.active, problem.slots_per_rank, 0)
    item_rank = lpt_pack(
        item_weight,
        item_expert,
        problem.num_experts,
        capacity,
        item_node=item_node,
        rank_node=problem.rank_node,
        order=order,
    )
    phy2log = phy2log_from_items(item_rank, item_expert, problem.num_ranks, problem.slots_per_rank)
    dups = problem.dup_unavoidable or (locality == "strict" and strict_duplicates(problem))
    if not dups:
        phy2log = separate_copies(phy2log, load, problem.num_ranks, problem.rank_node)
    if not refine_passes:
        return phy2log
    state = SearchState(
        load,
        phy2log,
        problem.num_ranks,
        home=home,
        rank_node=problem.rank_node,
        locality=locality,
        allow_duplicates=dups,
    )
    return refine(state).slot_e


def node_aware_best(problem: Problem, locality: str = "relaxed") -> Best:
    """:func:`plan_hierarchical_own`, or per layer a simpler policy's plan where it is better and keeps the
    locality rule (:func:`~.candidates.keep_best`).

    Candidates: ``strict`` takes ``greedy`` and ``deepseek``; ``relaxed`` also takes ``strict``'s own plan, so
    it is never worse than ``strict`` (whose other candidates it shares).  ``strict``'s own plan is made only for
    the layers where its node bound (hottest node per rank) is not already above the best peak so far.

    Returns:
        :class:`~.candidates.Best` with ``home`` int64 ``[L, E]``.
    """
    from .deepseek import deepseek_plan  # (here: deepseek registers after hierarchical)

    phy2log, home = plan_hierarchical_own(problem, locality)
    dups = problem.dup_unavoidable or (locality == "strict" and strict_duplicates(problem))
    best = Best(phy2log, home)
    if locality == "relaxed":
        rows = _may_beat(problem, best, node_bound(problem.load, home, problem))
        strict = plan_hierarchical_own(sub_problem(problem, rows), "strict")[0] if len(rows) else None
        best = keep_best(problem, best, [("hierarchical(strict)", strict, rows)], locality, dups)
    deepseek = deepseek_plan(problem)
    candidates = [("greedy", global_best(problem, deepseek).phy2log, None), ("deepseek", deepseek, None)]
    return keep_best(problem, best, candidates, locality, dups)


def _may_beat(problem: Problem, best: Best, bound: np.ndarray) -> np.ndarray:
    """int ``[A]``: layers whose best peak so far is not clearly below ``bound`` (float ``[L]``)."""
    peak = peak_rank_load(best.phy2log, problem.load, problem.num_ranks)
    return np.nonzero(peak > bound * (1 - 1e-9))[0]


def plan_hierarchical(problem: Problem, locality: str = "relaxed"):
    """Node-aware placement: :func:`node_aware_best`.

    Args:
        problem: checked problem with ``num_nodes > 1`` and ``num_groups`` a multiple of ``num_nodes``.
        locality: ``"relaxed"`` or ``"strict"``.
    Returns:
        phy2log: int64 ``[L, P]``; home: int64 ``[L, E]`` home node of every expert.
    """
    best = node_aware_best(problem, locality)
    return best.phy2log, best.home


@register_policy("hierarchical")
def hierarchical_policy(problem: Problem, previous, options: PolicyOptions) -> Plan:
    """``policy="hierarchical"``: :func:`node_aware_best` with ``options.node_locality``; global
    :func:`~.greedy.global_best` (reported as ``greedy``, with a ``fallback`` note) when the topology is not
    node-aware."""
    if not node_aware(problem):
        note = (
            f"num_groups={problem.num_groups} is not a positive multiple of num_nodes={problem.num_nodes}: "
            "placed globally"
        )
        best = global_best(problem)
        return Plan(best.phy2log, policy="greedy", info={"fallback": note, **best.info()})
    locality = options.node_locality
    best = node_aware_best(problem, locality)
    return Plan(
        best.phy2log,
        policy="hierarchical",
        locality=locality,
        home_node=best.home,
        allow_duplicates=locality == "strict" and strict_duplicates(problem),
        info=best.info(),
    )
