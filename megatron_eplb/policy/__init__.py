"""Placement policies behind one interface: :func:`rebalance`.

Policies (``policy=``):

- ``greedy``: global. Replicate (``argmax w / c``) → LPT packing with equal slots per rank and never two
  copies of one expert on a rank → swap refinement (hot/cold rank pairs, then the hottest rank).
- ``hierarchical``: node-aware (``num_nodes > 1``, expert groups spread evenly over nodes): pack groups to
  nodes → replicate → pack → refine.  ``node_locality="strict"`` keeps every copy on its group's node;
  ``"relaxed"`` (default) keeps the primary copy there and lets redundant copies cross nodes.
- ``low_churn``: start from ``previous`` and change only what pays (see :mod:`.low_churn`).
- ``deepseek``: parity with DeepSeek's ``eplb.py`` (hierarchical when ``num_groups % num_nodes == 0``, else
  global, accepting any groups and nodes as ``eplb.py`` does); the baseline.
- ``auto``: ``low_churn`` when ``previous`` is given, else ``hierarchical`` when ``num_nodes > 1``, else
  ``greedy``.

Balance is judged with a logical expert's load split evenly over its copies (the default dispatch).
Every function is pure and deterministic (ties go to the lower index; sorts are stable).

Never worse than a simpler plan (:mod:`.candidates`): per layer, ``greedy`` keeps ``deepseek``'s plan where it is
better and has no same-rank copies; ``hierarchical`` strict likewise ``greedy``'s and ``deepseek``'s where they keep
every copy at home; relaxed also strict's, so it is never worse than strict.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import time
from collections.abc import Iterable

import numpy as np

from ..errors import PolicyError
from ..placement import ExpertPlacement
from ..stats import balance_summary, moved_slots

# The built-in policies register in this order (the order of policy_names()); every other module of this
# package is imported after them (_import_policy_modules), so a new policy is one file.
# isort: off
from . import greedy  # noqa: F401
from . import hierarchical  # noqa: F401
from . import low_churn  # noqa: F401
from . import deepseek  # noqa: F401

# isort: on
from .common import NODE_LOCALITY, as_load, homes_from_placement, make_problem
from .packing import count_same_rank_duplicates as _count_dups
from .registry import AUTO, Plan, PolicyOptions, check_policy_name, get_policy, policy_names, register_policy

__all__ = [
    "NODE_LOCALITY",
    "POLICY_NAMES",
    "Plan",
    "PolicyError",
    "PolicyOptions",
    "placement_diagnostics",
    "policy_names",
    "rebalance",
    "rebalance_with_info",
    "register_policy",
    "resolve_policy",
]


def _import_policy_modules() -> None:
    """Import every module of this package, so that a policy file registers itself by being here."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_policy_modules()


def __getattr__(name: str):
    if name == "POLICY_NAMES":  # live: includes policies registered after import
        return policy_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_OPTIONS = tuple(f.name for f in dataclasses.fields(PolicyOptions))


def resolve_policy(policy: str, *, has_previous: bool, num_nodes: int) -> str:
    """The concrete policy ``auto`` stands for (others unchanged)."""
    check_policy_name(policy)
    if policy != AUTO:
        return policy
    if has_previous:
        return "low_churn"
    return "hierarchical" if num_nodes > 1 else "greedy"


def _check_options(options: dict) -> PolicyOptions:
    import difflib

    for key in options:
        if key not in _OPTIONS:
            close = difflib.get_close_matches(key, _OPTIONS, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid options: {', '.join(_OPTIONS)}"
            raise PolicyError(f"unknown policy option {key!r}{hint}")
    churn = options.get("churn_weight", 0.01)
    if isinstance(churn, bool) or not isinstance(churn, (int, float)) or not np.isfinite(churn) or churn < 0:
        raise PolicyError(f"churn_weight must be a finite number >= 0, got {churn!r}")
    locality = options.get("node_locality", "relaxed")
    if locality not in NODE_LOCALITY:
        raise PolicyError(f"node_locality={locality!r} is not one of {', '.join(NODE_LOCALITY)}")
    max_moves = options.get("max_moves_per_layer")
    if max_moves is not None and (
        isinstance(max_moves, bool) or not isinstance(max_moves, int) or max_moves < 0
    ):
        raise PolicyError(f"max_moves_per_layer must be an integer >= 0, got {max_moves!r}")
    return PolicyOptions(float(churn), locality, max_moves)


def rebalance_with_info(
    load,
    num_slots: int,
    num_ranks: int,
    *,
    num_nodes: int = 1,
    num_groups: int = 1,
    previous: ExpertPlacement | None = None,
    policy: str = "auto",
    exclude_ranks: Iterable[int] = (),
    **options,
) -> tuple[ExpertPlacement, dict]:
    """:func:`rebalance` plus a dict of what was done.

    Returns:
        placement: the new :class:`ExpertPlacement` (``expert_load`` = ``load``).
        info: ``policy`` (the concrete one), ``locality`` (``none``/``strict``/``relaxed``), ``seconds``,
        ``home_node`` (int ``[L, E]`` or None), ``changed_layers`` (low_churn), ``taken_from`` (layers won by a
        simpler policy's plan, by name, if any) and, when ``previous`` is given, ``moved_slots`` (int ``[L]``).
    """
    problem = make_problem(
        load,
        num_slots,
        num_ranks,
        num_nodes=num_nodes,
        num_groups=num_groups,
        previous=previous,
        exclude_ranks=exclude_ranks,
        deepseek_topology=policy == "deepseek",
    )
    opts = _check_options(options)
    policy = resolve_policy(policy, has_previous=previous is not None, num_nodes=problem.num_nodes)
    start = time.perf_counter()
    plan: Plan = get_policy(policy)(problem, previous, opts)
    info: dict = {"policy": plan.policy, "locality": plan.locality, **plan.info}
    info["seconds"] = time.perf_counter() - start
    info["home_node"] = plan.home_node
    placement = ExpertPlacement(
        plan.phy2log,
        problem.num_ranks,
        problem.num_experts,
        expert_load=problem.load,
        allow_same_rank_copies=plan.allow_duplicates or problem.dup_unavoidable,
    )
    if previous is not None:
        info["moved_slots"] = moved_slots(previous, placement)
    return placement, info


def rebalance(load, num_slots: int, num_ranks: int, **kwargs) -> ExpertPlacement:
    """Plan a placement of ``E`` logical experts into ``num_slots`` physical slots per layer.

    Keyword arguments as :func:`rebalance_with_info` (defaults: ``num_nodes=1, num_groups=1,
    previous=None, policy="auto", exclude_ranks=()``).

    Args:
        load: float ``[L, E]`` tokens routed to each logical expert (numpy or torch); finite, >= 0.
        num_slots: ``P`` physical slots per layer (a multiple of ``num_ranks``, at least ``E``).
        num_ranks: ``N`` ranks of the expert-parallel group (slot ``s`` lives on rank ``s // (P / N)``).
        num_nodes: nodes the ranks span (ranks ``[n * N/nodes, (n+1) * N/nodes)`` on node ``n``).
        num_groups: expert groups (group-limited routing; experts ``[g * E/G, (g+1) * E/G)`` in group ``g``).
        previous: the current :class:`ExpertPlacement` (``[L, P]`` on ``N`` ranks), for ``low_churn``/``auto``.
        policy: ``auto`` or a registered policy (:func:`policy_names`: ``greedy``, ``hierarchical``,
            ``low_churn``, ``deepseek``, ...).
        exclude_ranks: ranks that get no experts (failed GPUs); their slots are ``-1``.
        churn_weight: (option, default 0.01) a low_churn move must cut the hottest rank's load by at least
            this fraction of the mean rank load.
        node_locality: (option) ``"relaxed"`` (default) or ``"strict"``.
        max_moves_per_layer: (option) low_churn cap on moves per layer.
    Returns:
        :class:`ExpertPlacement` with ``phy2log`` int64 ``[L, P]`` and ``expert_load`` = ``load``.
    Raises:
        PolicyError: bad arguments (the message says which and what to do).
    """
    return rebalance_with_info(load, num_slots, num_ranks, **kwargs)[0]


def placement_diagnostics(
    placement: ExpertPlacement,
    load,
    *,
    num_nodes: int = 1,
    num_groups: int = 1,
    previous: ExpertPlacement | None = None,
    home_node: np.ndarray | None = None,
) -> dict:
    """Metrics of a placement under a load.

    Args:
        placement: ``[L, P]`` on ``N`` ranks.
        load: float ``[L, E]``.
        num_nodes, num_groups: topology, for the node metrics.
        previous: for churn.
        home_node: int ``[L, E]`` home node of each expert (from :func:`rebalance_with_info`); default: per
            group, the node holding most of its copies.
    Returns:
        dict: ``balancedness`` (mean over layers of mean/max rank load), ``sum_ratio``, ``max_over_mean``,
        ``per_layer`` (list), ``same_rank_duplicates``; with ``previous``: ``moved_slots``,
        ``moved_fraction``; with nodes and groups: ``cross_node_share`` (share of routed load served by
        copies off their expert's home node), ``node_local_violations`` (copies off their home node),
        ``experts_without_home_copy``.
    """
    load = as_load(load)
    if load.shape != (placement.num_layers, placement.num_experts):
        raise PolicyError(
            f"load has shape {list(load.shape)} but the placement has {placement.num_layers} layers x "
            f"{placement.num_experts} experts"
        )
    summary = balance_summary(placement, load)
    out = {
        "balancedness": summary["mean"],
        "sum_ratio": summary["sum_ratio"],
        "max_over_mean": summary["max_over_mean"],
        "per_layer": summary["per_layer"],
        "same_rank_duplicates": _count_dups(placement.phy2log, placement.num_ranks),
    }
    if previous is not None:
        moved = moved_slots(previous, placement)
        out["moved_slots"] = int(moved.sum())
        out["moved_fraction"] = float(moved.sum() / placement.phy2log.size)
    if num_nodes > 1 and num_groups % num_nodes == 0 and placement.num_experts % num_groups == 0:
        rank_node = np.arange(placement.num_ranks) // (placement.num_ranks // num_nodes)
        if home_node is None:
            home_node = homes_from_placement(placement.phy2log, rank_node, placement.num_experts, num_groups)
        p = placement.phy2log
        slot_node = rank_node[placement.rank_of_slot()]
        valid = p >= 0
        safe = np.where(valid, p, 0)
        off = valid & (np.take_along_axis(home_node, safe, axis=1) != slot_node[None, :])
        per_copy = load / np.maximum(placement.replica_count, 1)
        served_off = np.where(off, np.take_along_axis(per_copy, safe, axis=1), 0.0).sum()
        total = load.sum()
        out["cross_node_share"] = float(served_off / total) if total > 0 else 0.0
        out["node_local_violations"] = int(off.sum())
        at_home = valid & ~off
        home_copies = np.zeros(load.shape, dtype=np.int64)
        rows = np.broadcast_to(np.arange(p.shape[0])[:, None], p.shape)
        np.add.at(home_copies, (rows[at_home], p[at_home]), 1)
        out["experts_without_home_copy"] = int((home_copies == 0).sum())
    return out
