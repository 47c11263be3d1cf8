"""Global greedy placement: replicate (``argmax w / c``, counts chosen with the packing in mind) → LPT pack with
equal slots per rank and no two copies of one expert on a rank → swap refinement between the hottest rank and the
coldest ranks; then, per layer, ``deepseek``'s plan where it is better and keeps copies apart."""

from __future__ import annotations

import numpy as np

from .candidates import Best, keep_best, keep_lower, sub_problem
from .common import Problem, items_from_counts, replicate_for_packing
from .packing import lpt_pack, phy2log_from_items, separate_copies
from .registry import Plan, PolicyOptions, register_policy
from .search import SearchState, local_search, pair_rounds

__all__ = ["global_best", "plan_global", "plan_global_own", "refine", "greedy_policy"]

# Swap partners of the hottest rank: the slots of this many coldest ranks (enough on every trace tried).
_PARTNERS = 4
# Swaps of the hottest rank after the pair rounds (each lowers the peak a little).
_POLISH_ITERS = 4
# ... with node constraints (pair rounds help less there).
_POLISH_ITERS_NODES = 64
# Pair swap rounds.
_ROUNDS = 3


def refine(state: SearchState, *, rounds: int | None = None, polish_iters: int | None = None) -> SearchState:
    """Refinement after packing (no churn cost): swap rounds between hot/cold rank pairs, then swaps of the
    hottest rank with the coldest ranks."""
    layers = np.arange(state.num_layers)
    mean = state.mean_load(layers)
    if state.locality != "strict":
        if rounds is None:
            rounds = _ROUNDS if state.locality == "none" else 8 * _ROUNDS
        pair_rounds(state, layers, mean * 1e-6, max_rounds=rounds)
    partners = None if state.locality != "none" else _PARTNERS
    if polish_iters is not None:
        iters = polish_iters
    else:
        iters = _POLISH_ITERS if state.locality == "none" else _POLISH_ITERS_NODES
    return local_search(state, layers, mean * 1e-9, partners=partners, max_iters=iters)


def plan_global_own(problem: Problem, *, refine_passes: bool = True) -> np.ndarray:
    """Global placement on the active ranks, by this policy's own steps (replicate → pack → refine).

    Copy counts from :func:`~.common.replicate_for_packing`: where its alternative counts pack with a lower
    bound, both are packed and the lower peak is kept.

    Args:
        problem: the checked problem (``load [L, E]``, ``P`` slots on ``N`` ranks, excluded ranks).
    Returns:
        int64 ``[L, P]`` phy2log (``-1`` on excluded ranks).
    """
    load = problem.load
    num_layers, num_experts = load.shape
    n_active = int(problem.active.sum())
    active_slots = problem.num_active_slots
    max_copies = active_slots if problem.dup_unavoidable else n_active
    extra = np.full(num_layers, active_slots - num_experts)
    counts, alternative, better = replicate_for_packing(
        load, extra, max_copies, n_active, problem.slots_per_rank, apart=not problem.dup_unavoidable
    )
    phy2log = _pack_global(problem, counts, refine_passes)
    rows = np.nonzero(better)[0]
    if len(rows):
        other = _pack_global(sub_problem(problem, rows), alternative[rows], refine_passes)
        keep_lower(phy2log, rows, other, problem, problem.dup_unavoidable)
    return phy2log


def _pack_global(problem: Problem, counts: np.ndarray, refine_passes: bool) -> np.ndarray:
    """Pack the copies (int ``counts [L, E]``) onto the active ranks, then refine: int64 ``[L, P]``."""
    load, num_experts = problem.load, problem.num_experts
    item_expert, item_weight, _, _ = items_from_counts(counts, load)
    capacity = np.where(problem.active, problem.slots_per_rank, 0)
    item_rank = lpt_pack(item_weight, item_expert, num_experts, capacity)
    phy2log = phy2log_from_items(item_rank, item_expert, problem.num_ranks, problem.slots_per_rank)
    if not problem.dup_unavoidable:
        phy2log = separate_copies(
            phy2log, load, problem.num_ranks, np.zeros(problem.num_ranks, dtype=np.int64)
        )
    if not refine_passes:
        return phy2log
    state = SearchState(load, phy2log, problem.num_ranks, allow_duplicates=problem.dup_unavoidable)
    return refine(state).slot_e


def global_best(problem: Problem, deepseek: np.ndarray | None = None) -> Best:
    """:func:`plan_global_own`, or per layer the ``deepseek`` plan where it is better and has no two copies of
    an expert on a rank (:func:`~.candidates.keep_best`).

    Args:
        problem: the checked problem.
        deepseek: int ``[L, P]`` the ``deepseek`` plan if the caller has it (else planned here).
    """
    from .deepseek import deepseek_plan  # (here: deepseek registers after greedy)

    if deepseek is None:
        deepseek = deepseek_plan(problem)
    own = Best(plan_global_own(problem))
    return keep_best(problem, own, [("deepseek", deepseek, None)], "none", problem.dup_unavoidable)


def plan_global(problem: Problem) -> np.ndarray:
    """Global placement on the active ranks: :func:`global_best`'s phy2log.

    Args:
        problem: the checked problem (``load [L, E]``, ``P`` slots on ``N`` ranks, excluded ranks).
    Returns:
        int64 ``[L, P]`` phy2log (``-1`` on excluded ranks).
    """
    return global_best(problem).phy2log


@register_policy("greedy")
def greedy_policy(problem: Problem, previous, options: PolicyOptions) -> Plan:
    """``policy="greedy"``: :func:`global_best` (``previous`` and the options are not used)."""
    best = global_best(problem)
    return Plan(best.phy2log, policy="greedy", info=best.info())
