"""Exact-parity mode with DeepSeek's EPLB (``eplb.py`` of deepseek-ai/EPLB), written here in numpy.

Same steps and the same arithmetic (float32 loads, first index on ties, stable descending sorts):
pack expert groups to nodes → replicate experts within nodes (``argmax w / c``) → pack the copies to GPUs
with equal counts (sorted LPT).  Global mode is the same with one group and one node.  Kept as the
baseline the other policies are measured against: it is stateless and may put two copies of one expert
on one GPU.
"""

from __future__ import annotations

import numpy as np

from .common import PolicyError, Problem
from .packing import _argsort_descending, _argsort_small_ints, _lpt_pack_free
from .registry import Plan, PolicyOptions, register_policy

__all__ = [
    "balanced_packing",
    "replicate_experts",
    "rebalance_experts_hierarchical",
    "deepseek_phy2log",
    "deepseek_plan",
    "deepseek_policy",
    "hierarchical_mode",
]


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``n`` weighted items into ``num_packs`` packs of ``n / num_packs`` items each (sorted LPT).

    ``eplb.py``'s loop: items heaviest first (stable), each to the lightest pack with room (the first of
    equals), pack weights summed in float32.  Computed by :func:`~.common._lpt_pack_free` (the items as
    distinct experts, so only room counts), which places several items per step with exactly the result of
    that loop.

    Args:
        weight: float32 ``[X, n]``.
        num_packs: packs.
    Returns:
        pack_index: int64 ``[X, n]`` pack of each item; rank_in_pack: int64 ``[X, n]`` position in it.
    """
    rows, num_items = weight.shape
    per_pack = num_items // num_packs
    if per_pack == 1:
        return (
            np.broadcast_to(np.arange(num_items), weight.shape).copy(),
            np.zeros(weight.shape, dtype=np.int64),
        )
    order = _argsort_descending(weight)  # = np.argsort(-weight, axis=1, kind="stable")
    items = np.broadcast_to(np.arange(num_items), weight.shape)
    pack_index = _lpt_pack_free(weight, items, num_items, np.full(num_packs, per_pack), order)
    # Position in the pack = arrival order: the items in `order`, stably sorted by pack.
    arrived = np.take_along_axis(
        order, _argsort_small_ints(np.take_along_axis(pack_index, order, 1), num_packs), 1
    )
    rank_in_pack = np.empty_like(order)
    np.put_along_axis(rank_in_pack, arrived, np.broadcast_to(np.arange(num_items) % per_pack, order.shape), 1)
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replicate ``num_log`` experts into ``num_phy`` copies, minimising the heaviest copy.

    Args:
        weight: float32 ``[X, num_log]``.
        num_phy: copies in all (``>= num_log``).
    Returns:
        phy2log: int64 ``[X, num_phy]``; rank: int64 ``[X, num_phy]`` replica index of each copy;
        logcnt: int64 ``[X, num_log]`` copies of each expert.
    """
    rows, num_log = weight.shape
    phy2log = np.tile(np.arange(num_phy, dtype=np.int64), (rows, 1))
    rank = np.zeros((rows, num_phy), dtype=np.int64)
    logcnt = np.ones((rows, num_log), dtype=np.int64)
    idx = np.arange(rows)
    ratio = np.array(weight, dtype=np.float32)  # weight / logcnt in float32, kept up to date
    for i in range(num_log, num_phy):
        best = ratio.argmax(axis=1)
        phy2log[:, i] = best
        rank[:, i] = logcnt[idx, best]
        logcnt[idx, best] += 1
        ratio[idx, best] = weight[idx, best] / logcnt[idx, best].astype(np.float32)
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_experts_hierarchical(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek's hierarchical policy.

    Args:
        weight: float32 ``[L, E]``.
        num_physical: ``P`` copies per layer; num_groups, num_nodes, num_gpus: topology.
    Returns:
        phy2log: int64 ``[L, P]``; phyrank: int64 ``[L, P]``; logcnt: int64 ``[L, E]``.
    """
    num_layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    per_gpu = num_physical // num_gpus
    # 1. expert groups to nodes
    tokens_per_group = weight.reshape(num_layers, num_groups, group_size).sum(axis=2, dtype=np.float32)
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size)[:, :, None] + np.arange(group_size)
    ).reshape(num_layers, -1)
    mlog2log = _inverse(log2mlog)
    # 2. redundant experts within nodes: [L * nodes, E / nodes]
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, num_log // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical // num_nodes)
    # 3. copies to GPUs within nodes: [L * nodes, P / nodes]
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt.astype(np.float32), phy2mlog, axis=1)
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(pack_index * per_gpu + rank_in_pack)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    pphy2mlog = (
        pphy2mlog.reshape(num_layers, num_nodes, -1)
        + np.arange(0, num_log, num_log // num_nodes)[None, :, None]
    ).reshape(num_layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, axis=1)
    return pphy2log, pphyrank, logcnt


def deepseek_phy2log(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> np.ndarray:
    """DeepSeek's ``rebalance_experts``: hierarchical when ``num_groups % num_nodes == 0``, else global.

    Args:
        weight: float ``[L, E]``.
    Returns:
        int64 ``[L, num_replicas]`` logical expert of each physical slot.
    """
    weight = np.asarray(weight, dtype=np.float32)
    if hierarchical_mode(num_groups, num_nodes, weight.shape[1]):
        phy2log, _, _ = rebalance_experts_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, _, _ = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    return phy2log


def hierarchical_mode(num_groups: int, num_nodes: int, num_experts: int) -> bool:
    """Whether ``eplb.py`` places hierarchically (``num_groups % num_nodes == 0``; it then needs the groups to
    divide the experts, which :func:`~.common.make_problem` checks) rather than globally."""
    return num_groups % num_nodes == 0 and num_experts % num_groups == 0


def deepseek_plan(problem: Problem) -> np.ndarray | None:
    """:func:`deepseek_phy2log` on the problem's active ranks, or None where it does not apply (excluded ranks
    in hierarchical mode on several nodes: DeepSeek's policy needs equal GPUs per node).

    Returns:
        int64 ``[L, P]`` (``-1`` on excluded ranks), or None.
    """
    active = np.nonzero(problem.active)[0]
    if len(active) == problem.num_ranks:
        return deepseek_phy2log(
            problem.load, problem.num_slots, problem.num_groups, problem.num_nodes, problem.num_ranks
        )
    if problem.num_nodes > 1 and hierarchical_mode(
        problem.num_groups, problem.num_nodes, problem.num_experts
    ):
        return None
    spr = problem.slots_per_rank
    sub = deepseek_phy2log(problem.load, len(active) * spr, 1, 1, len(active))
    phy2log = np.full((problem.num_layers, problem.num_slots), -1, dtype=np.int64)
    phy2log[:, (active[:, None] * spr + np.arange(spr)).ravel()] = sub
    return phy2log


@register_policy("deepseek")
def deepseek_policy(problem: Problem, previous, options: PolicyOptions) -> Plan:
    """``policy="deepseek"``: :func:`deepseek_plan` (exclusions: global mode only).  Stateless (``previous`` is
    not used); may put two copies of one expert on a rank."""
    phy2log = deepseek_plan(problem)
    if phy2log is None:
        raise PolicyError(
            "policy='deepseek' supports exclude_ranks only in its global mode (num_nodes=1, or num_groups not a "
            "multiple of num_nodes): DeepSeek's hierarchical policy needs equal GPUs per node; use "
            "policy='hierarchical'"
        )
    strict = problem.num_nodes > 1 and hierarchical_mode(
        problem.num_groups, problem.num_nodes, problem.num_experts
    )
    return Plan(phy2log, policy="deepseek", locality="strict" if strict else "none", allow_duplicates=True)
