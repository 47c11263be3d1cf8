"""Replay a load trace: how balanced every step would have been under each placement strategy and split.

Routing does not depend on the placement, so a trace's per-step counts (:mod:`megatron_eplb.trace`) give
every strategy's per-step rank loads exactly, at any EP size.  Strategies (rows of :func:`replay`):

- ``default``: Megatron's placement (expert ``e`` on rank ``e // (E / N)``, no redundant slots);
- ``{policy} even`` / ``{policy} balanced`` / ``{policy} best split``: the policy re-plans every ``interval``
  steps from the summed load of the last ``window`` steps (as the manager does; before the first plan the
  default layout with ``R`` redundant slots); each step's tokens split over the copies evenly, with the
  per-batch shares of the ``balanced`` dispatch (:mod:`megatron_eplb.replica_split`), or with the best split
  any dispatch could make over that placement (the exact bound, an LP's value);
- ``{policy} time-resolved ...``: the same, planned with :func:`megatron_eplb.policy.time_resolved.plan_for_steps`
  from the window's per-step loads (when asked for);
- ``oracle``: a fresh plan on each step's own load (moves free), even split: the ceiling of planning.

Per step, balancedness = mean over layers of (mean rank load / max rank load), as the manager reports it;
the summaries (mean, p10, worst) cover the steps from the first re-plan on (step ``interval``), the same
steps for every row, so that the start layout does not weigh in.
Pure functions over numpy arrays (torch for the split); shapes: ``T`` steps, ``L`` layers, ``E`` experts,
``N`` ranks, ``P`` slots per layer.
"""

from __future__ import annotations

import numpy as np
import torch

from .placement import ExpertPlacement
from .policy import rebalance
from .replica_split import DEFAULT_ITERATIONS, balanced_shares, best_split_bound, replica_tables
from .stats import moved_slots

__all__ = [
    "even_rank_loads",
    "balanced_rank_loads",
    "fast_rank_loads",
    "fast_replay",
    "replay",
    "step_balancedness",
    "summarize",
]


def even_rank_loads(placement: ExpertPlacement, loads: np.ndarray) -> np.ndarray:
    """float64 ``[k, L, N]`` rank loads with each expert's tokens split evenly over its copies.

    Args:
        placement: ``[L, P]`` on ``N`` ranks.
        loads: ``[k, L, E]`` tokens per step, layer and expert.
    """
    phy2log = placement.phy2log
    valid = phy2log >= 0
    per_copy = loads / np.maximum(placement.replica_count, 1)[None]  # [k, L, E]
    slot = np.take_along_axis(per_copy, np.where(valid, phy2log, 0)[None].repeat(len(loads), 0), axis=2)
    slot = np.where(valid[None], slot, 0.0)  # [k, L, P]
    return slot.reshape(*slot.shape[:2], placement.num_ranks, -1).sum(axis=3)


def balanced_rank_loads(
    placement: ExpertPlacement, loads: np.ndarray, iterations: int = DEFAULT_ITERATIONS
) -> np.ndarray:
    """float64 ``[k, L, N]`` rank loads under the ``balanced`` dispatch's per-batch shares (each step its own)."""
    out = even_rank_loads(placement, loads)
    batch = torch.as_tensor(np.asarray(loads, dtype=np.int64))
    for layer in range(placement.num_layers):
        row = placement.phy2log[layer]
        if placement.replica_count[layer].max() < 2:
            continue
        tables = replica_tables(row, placement.num_ranks, placement.num_experts)
        shares = balanced_shares(batch[:, layer], tables, iterations)  # [k, E, C]
        rank = tables.copy_rank.reshape(-1).numpy()
        flat = shares.reshape(shares.shape[0], -1).numpy()
        per_rank = np.zeros((flat.shape[0], placement.num_ranks + 1))
        np.add.at(per_rank.T, rank, flat.T)
        out[:, layer] = per_rank[:, :-1]
    return out


def fast_rank_loads(
    placement: ExpertPlacement,
    loads: np.ndarray,
    num_fast: int,
    iterations: int = DEFAULT_ITERATIONS,
    num_nodes: int = 1,
    cross_node_min_gain: int = 0,
) -> np.ndarray:
    """float64 ``[k, L, N]`` rank loads with ``num_fast`` spare slots per rank filled every step with copies of
    that step's hottest experts, on top of ``placement`` (the persistent one), and the balanced split over
    all copies (:func:`~megatron_eplb.fast_replicas.plan_fast_replicas`, each step its own)."""
    return fast_replay(placement, loads, num_fast, iterations, num_nodes, cross_node_min_gain)[0]


def fast_replay(
    placement: ExpertPlacement,
    loads: np.ndarray,
    num_fast: int,
    iterations: int = DEFAULT_ITERATIONS,
    num_nodes: int = 1,
    cross_node_min_gain: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`fast_rank_loads` with the copies counted.

    Args:
        placement: ``[L, P]`` persistent placement on ``N`` ranks; loads: ``[k, L, E]``; num_fast: ``F``.
        num_nodes, cross_node_min_gain: the ranks' nodes and ``m`` of the cross-node rule
            (:func:`~megatron_eplb.fast_replicas.fast_tables`).
    Returns:
        ``(rank_loads float64 [k, L, N], copies int64 [k, L], cross_node int64 [k, L])``: the spare copies used
        per step and layer, and those of them fetched across nodes.
    """
    from .fast_replicas import cross_node_copies, fast_tables, plan_fast_replicas, rank_loads_of_copies

    batch = torch.as_tensor(np.asarray(loads, dtype=np.int64))
    out = np.zeros((batch.shape[0], placement.num_layers, placement.num_ranks))
    copies = np.zeros((batch.shape[0], placement.num_layers), dtype=np.int64)
    cross = np.zeros_like(copies)
    for layer in range(placement.num_layers):
        tables = fast_tables(
            placement.phy2log[layer],
            placement.num_ranks,
            placement.num_experts,
            num_fast,
            num_nodes=num_nodes,
            cross_node_min_gain=cross_node_min_gain,
        )
        plan = plan_fast_replicas(batch[:, layer], tables, iterations)
        out[:, layer] = rank_loads_of_copies(plan.shares, plan.copy_rank, placement.num_ranks).numpy()
        copies[:, layer] = (plan.fast_expert >= 0).flatten(1).sum(1).numpy()
        cross[:, layer] = cross_node_copies(plan.fast_expert, tables).numpy()
    return out, copies, cross


def best_split_busiest(placement: ExpertPlacement, loads: np.ndarray) -> np.ndarray:
    """float64 ``[k, L]``: the lightest busiest rank any split of each step over ``placement`` reaches
    (:func:`~megatron_eplb.replica_split.best_split_bound`'s lower bound: an LP's value)."""
    out = np.zeros(loads.shape[:2])
    for t in range(loads.shape[0]):
        for layer in range(loads.shape[1]):
            out[t, layer] = best_split_bound(loads[t, layer], placement.phy2log[layer], placement.num_ranks)[
                0
            ]
    return out


def step_balancedness(rank_loads: np.ndarray, busiest: np.ndarray | None = None) -> np.ndarray:
    """float64 ``[k]``: per step, the mean over layers of mean / max rank load (``[k, L, N]``); with
    ``busiest [k, L]`` that max instead (the bound)."""
    mean = rank_loads.mean(axis=2)
    peak = rank_loads.max(axis=2) if busiest is None else busiest
    per_layer = np.divide(mean, peak, out=np.ones_like(mean), where=peak > 0)
    return per_layer.mean(axis=1)


def summarize(per_step: np.ndarray) -> dict:
    """``mean``, ``p10`` and ``worst`` of a per-step balancedness series."""
    per_step = np.asarray(per_step)
    return {
        "mean": float(per_step.mean()),
        "p10": float(np.percentile(per_step, 10)),
        "worst": float(per_step.min()),
    }


def _schedule(num_steps: int, interval: int) -> list[tuple[int, int]]:
    """``[(start, end)]`` segments of steps between two plans (a plan takes effect at ``start > 0``)."""
    starts = list(range(0, num_steps, interval))
    return [(s, min(s + interval, num_steps)) for s in starts]


def replay(
    loads: np.ndarray,
    ep_size: int,
    redundancy: int,
    *,
    policies: tuple[str, ...] = ("greedy",),
    interval: int = 50,
    window: int = 50,
    oracle_policy: str = "greedy",
    bound: bool = True,
    time_resolved: bool = False,
    iterations: int = DEFAULT_ITERATIONS,
    progress: bool = False,
    fast_slots: int = 0,
    num_nodes: int = 1,
    cross_node_min_gain: int = 0,
) -> dict:
    """Per-step balancedness of every strategy on the same steps.

    Args:
        loads: ``[T, L, E]`` tokens per step (summed over source ranks).
        ep_size: ``N``; ``redundancy``: ``R`` (``(E + R) % N == 0``).
        policies: placement policies to re-plan with (``megatron_eplb.policy`` names).
        interval: steps between re-plans; ``window``: steps of load each plan sees.
        oracle_policy: the policy of the per-step oracle.
        bound: also compute the best split over each policy's placements (the exact bound; slow on big E).
        time_resolved: also plan with the window's per-step loads (issue #13 part 3).
        iterations: the balanced split's rounds.
        progress: a tqdm progress bar.
        fast_slots: ``F`` > 0 adds the per-step replicas (issue #20): ``F`` of each rank's slots are spare
            slots refilled every step with copies of that step's hottest experts
            (:mod:`~megatron_eplb.fast_replicas`); the persistent placement keeps ``R - N * F`` redundant
            slots (same slot count as the other rows). Rows ``default + fast`` (the default placement, never
            re-planned) and, per policy, ``{policy} + fast`` (re-planned like the others); a fast row also has
            ``copies`` and ``cross_node_copies``: spare copies used, and those fetched across nodes, per step
            (summed over layers; mean over the summary's steps) and ``cross_node_per_step`` [T].
        num_nodes: nodes the ranks span (``N / num_nodes`` consecutive ranks each): the policies plan with them
            (``hierarchical``, ``auto``: node-aware) and the fast rows count their copies across nodes.
        cross_node_min_gain: ``m`` of the per-step replicas' cross-node rule (``eplb_fast_cross_node_min_tokens``;
            0: off).  With ``num_nodes > 1`` and ``m > 0`` every fast row has a companion ``... (any node)``
            without the rule (``m = 0``) on the same persistent placements, side by side.
    Returns:
        ``{"config": {...}, "rows": [{"name", "policy", "split", "per_step" [T], "mean", "p10", "worst",
        "moved_slots"}, ...], "split_vs_bound_min": float | None}``; ``split_vs_bound_min`` is the worst
        (step, layer) ratio of the best split's busiest rank to the balanced split's (1.0 = as good as the LP).
    """
    from tqdm import tqdm

    loads = np.asarray(loads, dtype=np.int64)
    num_steps, num_layers, num_experts = loads.shape
    slots = num_experts + redundancy
    if slots % ep_size:
        raise ValueError(
            f"{num_experts} experts + {redundancy} redundant slots do not divide over {ep_size} ranks"
        )
    persistent_redundancy = redundancy - ep_size * fast_slots
    if fast_slots < 0 or persistent_redundancy < 0:
        raise ValueError(
            f"fast_slots={fast_slots} spare slots per rank need {ep_size * fast_slots} of the {redundancy} "
            f"redundant slots (0 <= fast_slots <= redundancy / ep_size)"
        )
    if num_nodes < 1 or ep_size % num_nodes:
        raise ValueError(f"num_nodes={num_nodes} does not divide the EP size {ep_size}")
    if cross_node_min_gain < 0:
        raise ValueError(f"cross_node_min_gain={cross_node_min_gain} must be >= 0")
    gains = [cross_node_min_gain] + ([0] if num_nodes > 1 and cross_node_min_gain > 0 else [])
    segments = _schedule(num_steps, interval)
    variants = [(p, False) for p in policies] + ([(p, True) for p in policies] if time_resolved else [])
    fast_rows = (1 + len(policies)) * len(gains) if fast_slots else 0
    bar = tqdm(
        total=num_steps * (2 + len(variants) + fast_rows), desc="replay", unit="step", disable=not progress
    )
    rows = []
    first = interval if interval < num_steps else 0  # the summaries' first step

    def row(name: str, policy: str, split: str, per_step: np.ndarray, moved: int) -> dict:
        return {
            "name": name,
            "policy": policy,
            "split": split,
            "per_step": per_step.tolist(),
            **summarize(per_step[first:]),
            "moved_slots": moved,
        }

    if num_experts % ep_size == 0:
        default = ExpertPlacement.default(num_layers, num_experts, ep_size, 0)
        rows.append(row("default", "none", "even", step_balancedness(even_rank_loads(default, loads)), 0))
    bar.update(num_steps)
    ratio_min = None
    for policy, resolved in variants:
        start = ExpertPlacement.default(num_layers, num_experts, ep_size, redundancy)
        current, moved = start, 0
        even, balanced, best = [], [], []
        for begin, end in segments:
            if begin > 0:
                past = loads[max(0, begin - window) : begin]
                new = _plan(past, slots, ep_size, policy, current, resolved, num_nodes)
                moved += int(moved_slots(current, new).sum())
                current = new
            seg = loads[begin:end]
            even.append(even_rank_loads(current, seg))
            balanced.append(balanced_rank_loads(current, seg, iterations))
            if bound:
                best.append(best_split_busiest(current, seg))
            bar.update(end - begin)
        even, balanced = np.concatenate(even), np.concatenate(balanced)
        name = f"{policy} time-resolved" if resolved else policy
        rows.append(row(f"{name} even", policy, "even", step_balancedness(even), moved))
        rows.append(row(f"{name} balanced", policy, "balanced", step_balancedness(balanced), moved))
        if bound:
            best = np.concatenate(best)
            rows.append(row(f"{name} best split", policy, "best", step_balancedness(balanced, best), moved))
            busiest = balanced.max(axis=2)
            ratio = np.divide(best, busiest, out=np.ones_like(best), where=busiest > 0).min()
            ratio_min = float(ratio) if ratio_min is None else min(ratio_min, float(ratio))
    if fast_slots:
        start = ExpertPlacement.default(num_layers, num_experts, ep_size, persistent_redundancy)

        def fast_rows_of(name: str, policy: str, placements: list, moved: int) -> None:
            """The fast rows of one persistent schedule ``[(placement, begin, end)]``, one per ``m`` of ``gains``."""
            for m in gains:
                parts = [
                    fast_replay(p, loads[b:e], fast_slots, iterations, num_nodes, m) for p, b, e in placements
                ]
                rank_loads, copies, cross = (np.concatenate(x) for x in zip(*parts))
                label = f"{name} + fast" + (" (any node)" if m != cross_node_min_gain else "")
                out = row(label, policy, "fast", step_balancedness(rank_loads), moved)
                out["copies"] = float(copies.sum(1)[first:].mean())
                out["cross_node_copies"] = float(cross.sum(1)[first:].mean())
                out["cross_node_per_step"] = cross.sum(1).tolist()
                out["cross_node_min_gain"] = m
                rows.append(out)
                bar.update(num_steps)

        fast_rows_of("default", "none", [(start, 0, num_steps)], 0)
        for policy in policies:
            current, moved, placements = start, 0, []
            for begin, end in segments:
                if begin > 0:
                    past = loads[max(0, begin - window) : begin]
                    new = _plan(
                        past, slots - ep_size * fast_slots, ep_size, policy, current, False, num_nodes
                    )
                    moved += int(moved_slots(current, new).sum())
                    current = new
                placements.append((current, begin, end))
            fast_rows_of(policy, policy, placements, moved)
    oracle, moved, previous = [], 0, None
    for t in range(num_steps):
        plan = rebalance(loads[t].astype(np.float64), slots, ep_size, policy=oracle_policy)
        if previous is not None:
            moved += int(moved_slots(previous, plan).sum())
        previous = plan
        oracle.append(even_rank_loads(plan, loads[t : t + 1]))
        bar.update(1)
    rows.append(
        row("oracle (per-step plan)", oracle_policy, "even", step_balancedness(np.concatenate(oracle)), moved)
    )
    bar.close()
    config = dict(
        steps=num_steps,
        summary_from_step=first,
        layers=num_layers,
        experts=num_experts,
        ep_size=ep_size,
        redundancy=redundancy,
        num_slots=slots,
        interval=interval,
        window=window,
        iterations=iterations,
        fast_slots=fast_slots,
        num_nodes=num_nodes,
        cross_node_min_gain=cross_node_min_gain,
    )
    return {"config": config, "rows": rows, "split_vs_bound_min": ratio_min}


def _plan(
    past: np.ndarray,
    slots: int,
    ep_size: int,
    policy: str,
    current: ExpertPlacement,
    resolved: bool,
    num_nodes: int = 1,
) -> ExpertPlacement:
    """A plan from the window ``past [k, L, E]`` (its sum, or its steps with ``resolved``), for ranks in
    ``num_nodes`` nodes (the node-aware policies use them, as the manager's ``eplb_num_nodes``)."""
    if resolved:
        from .policy.time_resolved import plan_for_steps

        return plan_for_steps(past, slots, ep_size, previous=current, policy=policy, num_nodes=num_nodes)
    return rebalance(
        past.sum(axis=0).astype(np.float64),
        slots,
        ep_size,
        policy=policy,
        previous=current,
        num_nodes=num_nodes,
    )
