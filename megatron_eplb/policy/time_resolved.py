"""Time-resolved planning: choose each layer's placement by the window's per-step loads, not only their sum.

A step's time is set by its own busiest rank, and with the ``balanced`` dispatch each step's tokens are split
over the copies from that step's counts (:mod:`megatron_eplb.replica_split`).  So a placement is scored by
the **mean over the window's steps of the busiest rank under that split** (the expected step time), and
per layer the cheapest placement within ``churn_weight`` of the best score wins:

1. candidates: the current placement (moves nothing), the policy's plan on the window's sum, a fresh greedy
   plan on the sum, and greedy plans on volatility-aware loads (each expert's 90th percentile over the steps,
   and mean + standard deviation): an expert that is hot only at times gets the copies its bad steps need;
2. each candidate layer is scored on every step of the window (the balanced split, batched over the steps);
3. per layer, among the candidates whose score is within ``churn_weight x`` the mean rank load of the best,
   the one that moves the fewest slots from the current placement is kept: on a stationary workload the
   current placement is among them, so a re-plan moves nothing.

Pure and deterministic, like every policy; not registered as a policy name because it needs the steps
(``[k, L, E]``), not the ``[L, E]`` sum: the manager calls it with ``eplb_time_resolved`` and the replay with
``--time-resolved``.
"""

from __future__ import annotations

import numpy as np

from ..errors import PolicyError
from ..placement import ExpertPlacement

# The balanced split's rounds (replica_split.DEFAULT_ITERATIONS; that module imports torch, which importing
# the policies must not: they are imported by the config).
DEFAULT_ITERATIONS = 8

__all__ = ["expected_busiest_rank", "plan_for_steps"]


def expected_busiest_rank(
    placement: ExpertPlacement, step_loads: np.ndarray, iterations: int = DEFAULT_ITERATIONS
) -> np.ndarray:
    """float64 ``[L]``: per layer, the mean over the steps of the busiest rank under the balanced split.

    Args:
        placement: ``[L, P]`` on ``N`` ranks.
        step_loads: ``[k, L, E]`` tokens per step.
    """
    from ..replay import balanced_rank_loads

    return balanced_rank_loads(placement, step_loads, iterations).max(axis=2).mean(axis=0)


def plan_for_steps(
    step_loads,
    num_slots: int,
    num_ranks: int,
    *,
    previous: ExpertPlacement | None = None,
    policy: str = "auto",
    churn_weight: float = 0.01,
    iterations: int = DEFAULT_ITERATIONS,
    **options,
) -> ExpertPlacement:
    """A placement for the window's steps (see the module docstring).

    Args:
        step_loads: float ``[k, L, E]`` tokens per step of the window (k >= 1).
        num_slots: ``P``; num_ranks: ``N``.
        previous: the current placement (``[L, P]``); candidates are compared by the slots they move from it.
        policy: the policy of the main candidate (on the window's sum), as for :func:`~megatron_eplb.policy.rebalance`.
        churn_weight: a candidate that moves more must lower the expected busiest rank by at least this
            fraction of the mean rank load.
        iterations: the balanced split's rounds.
        options: passed to :func:`~megatron_eplb.policy.rebalance` (``num_nodes``, ``num_groups``, ...).
    Returns:
        :class:`ExpertPlacement` (``expert_load`` = the window's sum).
    """
    from ..stats import moved_slots
    from . import rebalance

    loads = np.asarray(step_loads, dtype=np.float64)
    if loads.ndim != 3 or loads.shape[0] < 1:
        raise PolicyError(f"step_loads must be [steps, layers, experts] with steps >= 1, got {loads.shape}")
    if not np.isfinite(loads).all() or (loads < 0).any():
        raise PolicyError("step_loads must be finite and >= 0")
    total = loads.sum(axis=0)
    kw = dict(options, churn_weight=churn_weight)
    candidates = [] if previous is None else [previous]
    candidates.append(rebalance(total, num_slots, num_ranks, previous=previous, policy=policy, **kw))
    greedy_kw = {
        k: v for k, v in kw.items() if k in ("num_nodes", "num_groups", "exclude_ranks", "node_locality")
    }
    volatile = (np.percentile(loads, 90, axis=0), loads.mean(axis=0) + loads.std(axis=0))
    for load in (total, *volatile):
        policy_name = "greedy" if greedy_kw.get("num_nodes", 1) == 1 else "hierarchical"
        candidates.append(rebalance(load, num_slots, num_ranks, policy=policy_name, **greedy_kw))
    integer = np.rint(loads).astype(np.int64)
    scores = np.stack([expected_busiest_rank(c, integer, iterations) for c in candidates])  # [C, L]
    if previous is not None:
        moves = np.stack([moved_slots(previous, c) for c in candidates])  # [C, L]
    else:
        moves = np.zeros(scores.shape, dtype=np.int64)
    mean_rank = total.sum(axis=1) / loads.shape[0] / num_ranks  # [L]
    good = scores <= scores.min(axis=0) + churn_weight * mean_rank  # [C, L]
    # Among the good candidates: fewest moves, then the best score, then the earliest candidate.
    key = np.where(good, moves * (scores.max() + 1.0) + scores, np.inf)
    pick = key.argmin(axis=0)  # [L]
    phy2log = np.stack([candidates[c].phy2log[layer] for layer, c in enumerate(pick)])
    return ExpertPlacement(
        phy2log,
        num_ranks,
        total.shape[1],
        expert_load=total,
        allow_same_rank_copies=any(c.allow_same_rank_copies for c in candidates),
    )
