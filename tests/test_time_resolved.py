"""megatron_eplb/policy/time_resolved.py: placements chosen by the window's per-step loads."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_eplb import replica_split
from megatron_eplb.errors import PolicyError
from megatron_eplb.placement import ExpertPlacement
from megatron_eplb.policy import rebalance, time_resolved
from megatron_eplb.policy.time_resolved import expected_busiest_rank, plan_for_steps
from megatron_eplb.stats import moved_slots

L, E, N, R = 3, 16, 4, 4


def _stationary(rng, steps: int, tokens: int = 4096) -> np.ndarray:
    """Steps sampled from one fixed skewed distribution per layer."""
    p = np.random.default_rng(0).dirichlet(np.full(E, 0.4), size=L)
    return np.stack(
        [np.stack([rng.multinomial(tokens, p[layer]) for layer in range(L)]) for _ in range(steps)]
    )


def _bursty(rng, steps: int, tokens: int = 4096) -> np.ndarray:
    """Two steady hot experts (0, 2), and four bursty ones (5, 7, 9, 13): each takes a large share one step in
    four.  Summed over the window all six look alike; per step the bursts are what needs copies."""
    out = np.zeros((steps, L, E), dtype=np.int64)
    for t in range(steps):
        p = np.full(E, 1.0)
        p[[0, 2]] += 3.0
        p[[5, 9, 13, 7][t % 4]] += 12.0
        out[t] = rng.multinomial(tokens, p / p.sum(), size=L)
    return out


def test_same_iterations_as_the_split():
    assert time_resolved.DEFAULT_ITERATIONS == replica_split.DEFAULT_ITERATIONS


def test_stationary_workload_replan_moves_nothing():
    rng = np.random.default_rng(1)
    start = ExpertPlacement.default(L, E, N, R)
    first = plan_for_steps(_stationary(rng, 20), E + R, N, previous=start)
    assert moved_slots(start, first).sum() > 0
    for _ in range(3):  # fresh windows of the same workload
        again = plan_for_steps(_stationary(rng, 20), E + R, N, previous=first)
        assert moved_slots(first, again).sum() == 0
    # while a fresh plan on the sum moves slots every time
    fresh = rebalance(_stationary(rng, 20).sum(0).astype(float), E + R, N, policy="greedy", previous=first)
    assert moved_slots(first, fresh).sum() > 0


def test_per_step_planning_beats_the_sum_on_bursty_steps():
    rng = np.random.default_rng(2)
    window, future = _bursty(rng, 40), _bursty(rng, 40)
    on_sum = rebalance(window.sum(0).astype(float), E + R, N, policy="greedy")
    per_step = plan_for_steps(window, E + R, N)
    # on the next window's steps, under the balanced split: the expected busiest rank is clearly lower
    assert expected_busiest_rank(per_step, future).mean() < 0.9 * expected_busiest_rank(on_sum, future).mean()
    assert (per_step.replica_count[:, [5, 7, 9, 13]] == 2).all()  # the bursty experts got the copies


def test_deterministic_and_valid():
    rng = np.random.default_rng(3)
    steps = _bursty(rng, 10)
    a = plan_for_steps(steps, E + R, N, previous=ExpertPlacement.default(L, E, N, R))
    b = plan_for_steps(steps.copy(), E + R, N, previous=ExpertPlacement.default(L, E, N, R))
    assert a == b and a.phy2log.shape == (L, E + R)
    assert np.array_equal(a.expert_load, steps.sum(0))
    with pytest.raises(PolicyError, match=r"\[steps, layers, experts\]"):
        plan_for_steps(steps.sum(0), E + R, N)
    with pytest.raises(PolicyError, match="finite"):
        plan_for_steps(-steps, E + R, N)


def recording_policy(load, num_slots, num_ranks, previous=None, step_loads=None, **kwargs):
    """A worker policy that reports what it was given (to the file in $EPLB_TEST_OUT) and keeps ``previous``."""
    import json
    import os

    with open(os.environ["EPLB_TEST_OUT"], "w") as f:
        json.dump(
            {"load": list(load.shape), "step_loads": None if step_loads is None else list(step_loads.shape)},
            f,
        )
    return previous


def _manager_time_resolved(rank: int, world: int) -> str:
    import torch
    from test_trace import _Handle

    from megatron_eplb.config import EPLBConfig
    from megatron_eplb.manager import EPLBManager

    handle = _Handle(rank, world)
    cfg = EPLBConfig(
        dynamic_eplb=True, eplb_time_resolved=True, num_iterations_eplb_update=6, eplb_window_size=5
    )
    cfg = cfg.replace(num_wait_worker_iterations=0, eplb_max_plan_wait=60.0)
    manager = EPLBManager(handle, cfg, policy_fn=recording_policy)
    outcome = None
    for step in range(6):
        handle.next = torch.full((2, 8), step, dtype=torch.int64)
        record = manager.step()
        outcome = record.outcome if record is not None else outcome
    manager.close()
    return outcome


def test_manager_hands_the_window_steps_to_the_worker(tmp_path):
    import json

    from dist import run_distributed

    out = tmp_path / "seen.json"
    outcome = run_distributed(_manager_time_resolved, 1, env={"EPLB_TEST_OUT": str(out)}, timeout=120)[0]
    assert outcome == "no_change"
    assert json.loads(out.read_text()) == {"load": [2, 8], "step_loads": [5, 2, 8]}
