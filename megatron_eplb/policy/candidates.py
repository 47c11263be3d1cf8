"""Never worse than a simpler plan: a policy compares its own placement, layer by layer, with the plans of the
simpler policies that keep its rules, and keeps the one with the lowest peak rank load.

Simpler, in this order: ``deepseek`` < ``greedy`` < ``hierarchical`` strict < ``hierarchical`` relaxed.  A
candidate counts for a layer only where it keeps the policy's rules there:

- no two copies of one expert on a rank, unless the policy allows them (``allow_duplicates``);
- ``strict``: every copy on its group's home node;
- ``relaxed``: at least one copy of every expert on its group's home node.

A candidate's home nodes are read from its own placement: the node holding most copies of each group, as
:func:`megatron_eplb.policy.placement_diagnostics` and ``low_churn`` read them.  The peak rank load is the
largest sum over a rank's slots of the per-copy loads (an expert's load split evenly over its copies).  Own plan
first: a candidate replaces it only if strictly lower.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .common import Problem, homes_from_placement

__all__ = [
    "Best",
    "feasible_layers",
    "keep_best",
    "keep_lower",
    "node_bound",
    "peak_rank_load",
    "sub_problem",
]

# A candidate replaces the own plan only if its peak is lower by more than this fraction (float noise).
_RTOL = 1e-12


@dataclass
class Best:
    """A policy's placement after :func:`keep_best`.

    Attributes:
        phy2log: int64 ``[L, P]``.
        home: int64 ``[L, E]`` home node of each expert (node-aware policies), else None.
        taken: candidate name -> layers where that candidate replaced the own plan.
    """

    phy2log: np.ndarray
    home: np.ndarray | None = None
    taken: dict = field(default_factory=dict)

    def info(self) -> dict:
        """``{"taken_from": taken}`` when a candidate won a layer, else empty (for :class:`Plan` ``info``)."""
        return {"taken_from": dict(self.taken)} if self.taken else {}


def peak_rank_load(phy2log: np.ndarray, load: np.ndarray, num_ranks: int) -> np.ndarray:
    """Peak rank load of each layer.

    Args:
        phy2log: int ``[L, P]`` (``-1`` empty); load: float ``[L, E]``; num_ranks: ``N``.
    Returns:
        float64 ``[L]``: max over ranks of the rank's summed per-copy loads.
    """
    num_layers, num_experts = load.shape
    valid = phy2log >= 0
    flat = np.where(valid, phy2log, num_experts) + (np.arange(num_layers) * (num_experts + 1))[:, None]
    counts = np.bincount(flat.ravel(), minlength=num_layers * (num_experts + 1)).reshape(num_layers, -1)
    per_copy = np.zeros((num_layers, num_experts + 1))
    np.divide(load, counts[:, :num_experts], out=per_copy[:, :num_experts], where=counts[:, :num_experts] > 0)
    slot_load = per_copy.ravel()[flat]
    return slot_load.reshape(num_layers, num_ranks, -1).sum(axis=2).max(axis=1)


def node_bound(load: np.ndarray, home: np.ndarray, problem: Problem) -> np.ndarray:
    """A lower bound on the peak of every placement that keeps all copies on their home nodes: the hottest
    node's load over its active ranks.

    Args:
        load: float ``[L, E]``; home: int ``[L, E]`` home node of each expert.
    Returns:
        float64 ``[L]``.
    """
    nodes = problem.num_nodes
    ranks = np.bincount(problem.rank_node[problem.active], minlength=nodes).astype(np.float64)
    node_load = np.zeros((load.shape[0], nodes))
    np.add.at(node_load, (np.arange(load.shape[0])[:, None], home), load)
    return np.where(ranks > 0, node_load / np.maximum(ranks, 1), np.where(node_load > 0, np.inf, 0)).max(
        axis=1
    )


def _duplicate_layers(phy2log: np.ndarray, num_ranks: int) -> np.ndarray:
    """bool ``[L]``: layers with two copies of one expert on a rank."""
    num_layers = phy2log.shape[0]
    per_rank = np.sort(phy2log.reshape(num_layers, num_ranks, -1), axis=2)
    return ((per_rank[:, :, 1:] == per_rank[:, :, :-1]) & (per_rank[:, :, 1:] >= 0)).any(axis=(1, 2))


def feasible_layers(
    phy2log: np.ndarray, problem: Problem, locality: str, allow_duplicates: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Where a placement keeps a policy's rules.

    Args:
        phy2log: int ``[L, P]``.
        locality: ``"none"``, ``"strict"`` or ``"relaxed"``.
        allow_duplicates: two copies of one expert on a rank are allowed.
    Returns:
        ok: bool ``[L]``; home: int64 ``[L, E]`` the placement's home nodes (None for ``"none"``).
    """
    ok = np.ones(phy2log.shape[0], dtype=bool)
    if not allow_duplicates:
        ok &= ~_duplicate_layers(phy2log, problem.num_ranks)
    if locality == "none":
        return ok, None
    num_layers, num_slots = phy2log.shape
    num_experts, groups = problem.num_experts, problem.num_groups
    home = homes_from_placement(phy2log, problem.rank_node, num_experts, groups)
    slot_node = problem.rank_node[np.arange(num_slots) // problem.slots_per_rank]
    valid = phy2log >= 0
    at_home = valid & (np.take_along_axis(home, np.where(valid, phy2log, 0), axis=1) == slot_node)
    if locality == "strict":
        ok &= (at_home == valid).all(axis=1)
    else:
        home_copies = np.zeros((num_layers, num_experts + 1), dtype=np.int64)
        rows = np.broadcast_to(np.arange(num_layers)[:, None], phy2log.shape)
        np.add.at(home_copies, (rows, np.where(at_home, phy2log, num_experts)), 1)
        ok &= (home_copies[:, :num_experts] > 0).all(axis=1)
    return ok, home


def keep_lower(
    phy2log: np.ndarray, rows: np.ndarray, other: np.ndarray, problem: Problem, allow_duplicates: bool
) -> None:
    """Write ``other`` (int ``[A, P]``, planned for the layers ``rows``) into ``phy2log`` (int ``[L, P]``, in
    place) where its peak is lower and, unless ``allow_duplicates``, it has no two copies of an expert on a rank.
    For a policy's own variants (same rules otherwise)."""
    load = problem.load[rows]
    lower = peak_rank_load(other, load, problem.num_ranks) < peak_rank_load(
        phy2log[rows], load, problem.num_ranks
    )
    if not allow_duplicates:
        lower &= ~_duplicate_layers(other, problem.num_ranks)
    phy2log[rows[lower]] = other[lower]


def sub_problem(problem: Problem, rows: np.ndarray) -> Problem:
    """The problem restricted to layers ``rows`` (every policy plans each layer on its own)."""
    return dataclasses.replace(problem, load=problem.load[rows])


def keep_best(
    problem: Problem,
    own: Best,
    candidates: list[tuple[str, np.ndarray | None, np.ndarray | None]],
    locality: str,
    allow_duplicates: bool,
) -> Best:
    """Per layer, the own plan or the feasible candidate with the lowest peak rank load.

    Args:
        problem: the checked problem.
        own: the policy's own plan (``home`` given when ``locality`` is not ``"none"``).
        candidates: ``(name, phy2log [L, P] or None, rows)``: a candidate planned on the layers ``rows`` only
            (``phy2log`` then ``[len(rows), P]``; None: all layers); ``phy2log`` None: not available.
        locality, allow_duplicates: the policy's rules (:func:`feasible_layers`).
    Returns:
        :class:`Best` (``taken`` counts the layers each candidate won).
    """
    load = problem.load
    best = Best(own.phy2log.copy(), None if own.home is None else own.home.copy(), dict(own.taken))
    peak = peak_rank_load(best.phy2log, load, problem.num_ranks)
    source = np.full(problem.num_layers, -1)  # index of the candidate that won each layer
    for index, (_, phy2log, rows) in enumerate(candidates):
        if phy2log is None:
            continue
        rows = np.arange(problem.num_layers) if rows is None else np.asarray(rows)
        if len(rows) == 0:
            continue
        ok, home = feasible_layers(phy2log, sub_problem(problem, rows), locality, allow_duplicates)
        cand_peak = peak_rank_load(phy2log, load[rows], problem.num_ranks)
        win = ok & (cand_peak < peak[rows] * (1 - _RTOL))
        at = rows[win]
        best.phy2log[at] = phy2log[win]
        if best.home is not None:
            best.home[at] = home[win]
        peak[at] = cand_peak[win]
        source[at] = index
    for index, count in zip(*np.unique(source[source >= 0], return_counts=True)):
        name = candidates[index][0]
        best.taken[name] = best.taken.get(name, 0) + int(count)
    return best
