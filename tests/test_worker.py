"""Tests for megatron_eplb.worker: the policy worker process and broadcast_placement."""

from __future__ import annotations

import time

import numpy as np
import pytest
from dist import run_distributed

from megatron_eplb.placement import ExpertPlacement
from megatron_eplb.worker import PolicyWorker, PolicyWorkerError, broadcast_placement

pytestmark = pytest.mark.slow  # every test here starts processes (the spawned policy worker, gloo ranks)


# Policy functions run in the spawned worker: top-level (picklable by reference).
def greedy_policy(load, num_slots, num_ranks, previous=None, **options):
    """A real (tiny) policy: hottest experts get the redundant slots, slots dealt round-robin by load."""
    num_layers, num_experts = load.shape
    rows = []
    for layer in range(num_layers):
        order = np.argsort(-load[layer], kind="stable")
        extra = order[: num_slots - num_experts]
        experts = np.concatenate([order, extra])
        spr = num_slots // num_ranks
        # each copy to the least-filled rank that does not hold that expert yet
        slots = [[] for _ in range(num_ranks)]
        for e in experts.tolist():
            free = [r for r in range(num_ranks) if len(slots[r]) < spr and e not in slots[r]]
            slots[min(free, key=lambda r: len(slots[r]))].append(e)
        row = np.array([e for rank in slots for e in rank], dtype=np.int64)
        rows.append(row)
    return ExpertPlacement(np.array(rows), num_ranks, num_experts, expert_load=load)


def slow_policy(load, num_slots, num_ranks, previous=None, delay=0.0, tag=0, **options):
    time.sleep(delay)
    phy2log = np.array(previous.phy2log)
    phy2log[0] = np.roll(phy2log[0], tag)
    return phy2log  # a bare phy2log array is accepted too


def failing_policy(load, num_slots, num_ranks, previous=None, **options):
    raise ValueError("policy exploded")


@pytest.fixture(scope="module")
def worker():
    w = PolicyWorker(slow_policy)
    yield w
    w.close()


def test_round_trip_real_policy():
    load = np.array([[10.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 8.0]])
    previous = ExpertPlacement.default(2, 4, 2, num_redundant=2)
    with PolicyWorker(greedy_policy) as w:
        req = w.submit(load, previous, {"policy": "greedy"})
        assert isinstance(req, int)
        placement = w.result(timeout=60)
        assert isinstance(placement, ExpertPlacement)
        assert placement.phy2log.shape == (2, 6)
        assert placement.replica_count[0, 0] == 2 and placement.replica_count[1, 3] == 2
        np.testing.assert_array_equal(placement.expert_load, load)
        assert w.poll() is None and w.result(0.1) is None  # nothing pending
        assert w.last_seconds is not None
    assert w.process is None


def test_submit_returns_at_once_and_poll(worker):
    previous = ExpertPlacement.default(1, 4, 2)
    t0 = time.monotonic()
    worker.submit(np.ones((1, 4)), previous, {"delay": 0.5, "tag": 1})
    assert time.monotonic() - t0 < 0.2
    assert worker.poll() is None  # not ready yet; still pending
    deadline = time.monotonic() + 30
    got = None
    while got is None and time.monotonic() < deadline:
        time.sleep(0.05)
        got = worker.poll()
    np.testing.assert_array_equal(got.phy2log[0], np.roll(previous.phy2log[0], 1))


def test_timeout_drops_and_late_answer_discarded(worker):
    previous = ExpertPlacement.default(1, 4, 2)
    worker.submit(np.ones((1, 4)), previous, {"delay": 1.0, "tag": 1})
    assert worker.result(timeout=0.1) is None  # late: dropped for this round
    assert worker.pending_id is None
    second = worker.submit(np.ones((1, 4)), previous, {"delay": 0.0, "tag": 2})
    got = worker.result(timeout=30)
    assert worker.pending_id is None and second == worker._next_id
    # The late answer (tag 1) arrived first and was discarded; we got the answer to request 2.
    np.testing.assert_array_equal(got.phy2log[0], np.roll(previous.phy2log[0], 2))


def test_killed_worker_restarts(worker):
    previous = ExpertPlacement.default(1, 4, 2)
    worker.submit(np.ones((1, 4)), previous, {"delay": 30.0})
    time.sleep(0.3)
    pid = worker.process.pid
    worker.process.kill()
    t0 = time.monotonic()
    assert worker.result(timeout=20) is None  # death is noticed at once, not after the timeout
    assert time.monotonic() - t0 < 5
    restarts = worker.restarts
    worker.submit(np.ones((1, 4)), previous, {"tag": 3})
    assert worker.restarts == restarts + 1 and worker.process.pid != pid
    got = worker.result(timeout=60)
    np.testing.assert_array_equal(got.phy2log[0], np.roll(previous.phy2log[0], 3))


def test_hung_worker_is_killed_and_replaced_after_two_missed_deadlines(caplog):
    import os
    import signal

    previous = ExpertPlacement.default(1, 4, 2)
    with PolicyWorker(slow_policy) as w:
        w.submit(np.ones((1, 4)), previous, {"tag": 1})
        assert w.result(timeout=60) is not None  # started and answering
        hung_pid = w.process.pid
        os.kill(hung_pid, signal.SIGSTOP)  # alive but never answers
        try:
            for _ in range(2):
                w.submit(np.ones((1, 4)), previous, {"tag": 2})
                with caplog.at_level("WARNING", logger="megatron_eplb.worker"):
                    assert w.result(timeout=0.3) is None
            assert w.hung == 1 and w.late_in_a_row == 0 and w.process.pid != hung_pid
            assert "hung: it missed its deadline 2 times in a row; killed" in caplog.text
            w.submit(np.ones((1, 4)), previous, {"tag": 3})
            got = w.result(timeout=60)  # the new worker plans
            np.testing.assert_array_equal(got.phy2log[0], np.roll(previous.phy2log[0], 3))
        finally:
            try:
                os.kill(hung_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_wait_keeps_a_late_request_pending_and_takes_it_when_it_arrives():
    """The manager's non-blocking look: ``wait`` gives up after its timeout without dropping the request."""
    previous = ExpertPlacement.default(1, 4, 2)
    with PolicyWorker(slow_policy) as w:
        w.submit(np.ones((1, 4)), previous, {"tag": 1, "delay": 1.0})
        t0 = time.monotonic()
        assert w.wait(0.05) is None and time.monotonic() - t0 < 0.5
        assert w.pending_id is not None and w.dropped == 0 and w.late_in_a_row == 0  # still pending
        got = None
        while got is None and time.monotonic() - t0 < 60:
            got = w.wait(0.0) or (time.sleep(0.05) or None)
        np.testing.assert_array_equal(got.phy2log[0], np.roll(previous.phy2log[0], 1))
        assert w.pending_id is None and w.wait(0.0) is None  # nothing pending any more


def test_policy_error_is_raised():
    previous = ExpertPlacement.default(1, 4, 2)
    with PolicyWorker(failing_policy, start=False) as w:
        w.submit(np.ones((1, 4)), previous)
        with pytest.raises(PolicyWorkerError, match="policy exploded"):
            w.result(timeout=60)
        assert w.is_alive()  # the worker survives a failing policy


def test_submit_validates_load(worker):
    with pytest.raises(ValueError, match="layers, experts"):
        worker.submit(np.ones(4), ExpertPlacement.default(1, 4, 2))


# ------------------------------------------------------------------------------- broadcast_placement
def _broadcast(rank: int, world: int) -> None:
    import torch.distributed as dist

    group = dist.new_group(backend="gloo")
    src = 1
    # No plan this round: every rank learns None together.
    assert broadcast_placement(None, src, group) is None
    plan = ExpertPlacement.default(3, 6, 2, num_redundant=2) if rank == src else None
    got = broadcast_placement(plan, src, group)
    assert got == ExpertPlacement.default(3, 6, 2, num_redundant=2)
    assert got.allow_same_rank_copies
    # Non-source ranks' argument is ignored.
    mine = ExpertPlacement.default(1, 2, 2) if rank == src else ExpertPlacement.default(1, 4, 2)
    assert broadcast_placement(mine, src, group) == ExpertPlacement.default(1, 2, 2)


def test_broadcast_placement_gloo():
    run_distributed(_broadcast, 2, timeout=60)
