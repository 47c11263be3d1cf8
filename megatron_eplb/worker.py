"""The policy worker: placement planning in a separate process, off the training/serving loop.

One rank (the planning rank) owns a :class:`PolicyWorker`.  It submits the gathered load window and the
current placement; the worker process runs the policy and sends back a new :class:`ExpertPlacement`.
Requests carry an id, so an answer that arrives after its request was given up (timeout, a newer request)
is discarded.  A worker that died (killed, crashed) is detected and started anew on the next submit.
:func:`broadcast_placement` then tells every rank, together, whether a plan arrived and what it is.

The manager's side of a rebalance's *plan* step: :func:`submit_plan` (the window's layers and the policy
options of the config), :func:`look_for_plan` (the planning rank's look at the due step and after) and
:func:`share_plan` (every rank takes the same verdict and plan).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
import types
from collections.abc import Callable
from multiprocessing.connection import wait as _wait_any
from typing import Any

import numpy as np

from .errors import PolicyWorkerError
from .placement import ExpertPlacement

__all__ = [
    "PLAN_ARRIVED",
    "PLAN_DROPPED",
    "PLAN_PENDING",
    "PolicyWorker",
    "PolicyWorkerError",
    "agree_on_plan",
    "broadcast_placement",
    "default_policy_fn",
    "look_for_plan",
    "poll_plan",
    "share_plan",
    "submit_plan",
]

log = logging.getLogger("megatron_eplb")

PLAN_PENDING, PLAN_ARRIVED, PLAN_DROPPED = 0, 1, 2
"""The planning rank's verdict on an awaited plan (:func:`poll_plan`, :func:`agree_on_plan`)."""

log = logging.getLogger(__name__)

HUNG_AFTER_LATE = 2  # deadlines missed in a row after which the worker is killed and replaced


def default_policy_fn(load, num_slots, num_ranks, step_loads=None, **kwargs):
    """``megatron_eplb.policy.rebalance``, imported in the worker process (lazily); with ``step_loads``
    (``[k, L, E]``, ``eplb_time_resolved``) ``policy.time_resolved.plan_for_steps`` instead."""
    if step_loads is not None:
        from .policy.time_resolved import plan_for_steps

        return plan_for_steps(step_loads, num_slots, num_ranks, **kwargs)
    from .policy import rebalance

    return rebalance(load, num_slots, num_ranks, **kwargs)


def _as_placement(result: Any, num_ranks: int, num_experts: int) -> ExpertPlacement:
    """Accept an ExpertPlacement, a ``phy2log`` array ``[L, P]``, or a tuple whose first item is one."""
    if isinstance(result, ExpertPlacement):
        return result
    if isinstance(result, tuple) and result:
        result = result[0]
    if hasattr(result, "detach"):
        result = result.detach().cpu().numpy()
    return ExpertPlacement(np.asarray(result), num_ranks, num_experts, allow_same_rank_copies=True)


def _worker_main(conn, requests, policy_fn: Callable, num_threads: int | None) -> None:
    """The worker process: answer ``(id, load, previous, kwargs)`` requests until ``None`` arrives."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if num_threads is not None and "torch" in sys.modules:  # a policy that uses torch imported it
        sys.modules["torch"].set_num_threads(num_threads)
    if policy_fn is None:  # warm up: import the policies now, not inside the first (awaited) plan
        default_policy_fn(np.ones((1, 4)), 4, 2)
    while True:
        request = requests.get()
        while True:  # skip requests superseded by newer ones already queued
            try:
                newer = requests.get_nowait()
            except Exception:
                break
            request = newer
            if request is None:
                break
        if request is None:
            return
        req_id, load, previous, num_slots, num_ranks, kwargs = request
        start = time.perf_counter()
        try:
            fn = policy_fn if policy_fn is not None else default_policy_fn
            result = fn(load, num_slots, num_ranks, previous=previous, **kwargs)
            placement = _as_placement(result, num_ranks, load.shape[1])
            reply = (req_id, "ok", placement, time.perf_counter() - start)
        except BaseException:
            reply = (req_id, "error", traceback.format_exc(), time.perf_counter() - start)
        try:
            conn.send(reply)
        except (BrokenPipeError, EOFError, OSError):
            return


@contextlib.contextmanager
def _spawn_without_main(policy_fn: Callable | None):
    """Start a spawned child without re-running the parent's ``__main__`` script.

    ``spawn`` re-imports the parent's main module in the child: for a training script that is torch,
    Megatron and DeepSpeed (seconds of imports, which made the first awaited plan late, and DeepSpeed's
    accelerator probing can open a GPU context beside training).  The worker needs only this package, so
    the child is shown an empty ``__main__`` unless the policy function itself lives there.
    """
    main = sys.modules.get("__main__")
    if main is None or getattr(policy_fn, "__module__", None) == "__main__":
        yield
        return
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """Set environment variables for a child started inside the block (restored after)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class PolicyWorker:
    """Run the placement policy in a separate process (``spawn`` context).

    Args:
        policy_fn: a picklable top-level function ``(load [L, E], num_slots, num_ranks, previous=...,
            **kwargs) -> ExpertPlacement`` (or a ``phy2log [L, P]`` array); default
            ``megatron_eplb.policy.rebalance``, imported in the worker.
        num_threads: torch threads in the worker (default 1, to leave the cores to training).
        start: start the process now (else on the first submit).

    Use: ``req = w.submit(load, placement, {"policy": "low_churn"})`` returns at once; later ``w.poll()``
    (non-blocking) or ``w.result(timeout)`` returns the new placement, or ``None`` (not ready / dropped).
    """

    def __init__(
        self,
        policy_fn: Callable | None = None,
        *,
        num_threads: int | None = 1,
        start: bool = True,
    ) -> None:
        self.policy_fn = policy_fn
        self.num_threads = num_threads
        self._ctx = mp.get_context("spawn")
        self._process = None
        self._conn = None
        self._requests = None
        self._next_id = 0
        self.pending_id: int | None = None
        self.restarts = 0
        self.dropped = 0
        self.late_in_a_row = 0  # requests in a row that missed their deadline
        self.hung = 0  # workers killed as hung (HUNG_AFTER_LATE deadlines missed in a row)
        self.last_seconds: float | None = None
        if start:
            self._start()

    # ---------------------------------------------------------------- process
    @property
    def process(self):
        """The worker's ``multiprocessing.Process`` (``None`` before start or after close)."""
        return self._process

    def is_alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def _start(self) -> None:
        parent, child = self._ctx.Pipe(duplex=False)
        self._requests = self._ctx.Queue()
        self._process = self._ctx.Process(
            target=_worker_main,
            args=(child, self._requests, self.policy_fn, self.num_threads),
            name="megatron-eplb-policy",
            daemon=True,
        )
        env = {"OMP_NUM_THREADS": str(self.num_threads)} if self.num_threads is not None else {}
        with _spawn_without_main(self.policy_fn), _environ(env):
            self._process.start()
        child.close()
        self._conn = parent

    def _stop(self, timeout: float = 5.0) -> None:
        proc, self._process = self._process, None
        if proc is None:
            return
        if proc.is_alive():
            try:
                self._requests.put(None)
            except Exception:
                pass
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)
        for closer in (self._conn.close, self._requests.close, self._requests.cancel_join_thread):
            try:
                closer()
            except Exception:
                pass
        self._conn = self._requests = None

    # ---------------------------------------------------------------- requests
    def submit(
        self,
        load,
        previous: ExpertPlacement,
        kwargs: dict | None = None,
        *,
        num_slots: int | None = None,
        num_ranks: int | None = None,
    ) -> int:
        """Queue a planning request and return its id at once (a newer request supersedes older ones).

        Args:
            load: float ``[L, E]`` load window (numpy or torch; copied to numpy).
            previous: the current placement (gives ``num_slots``/``num_ranks`` unless passed explicitly).
            kwargs: extra keyword arguments for the policy function (``policy=``, options).
        """
        if hasattr(load, "detach"):
            load = load.detach().cpu().numpy()
        load = np.array(load, dtype=np.float64)
        if load.ndim != 2:
            raise ValueError(f"load must be [layers, experts], got shape {load.shape}")
        num_slots = previous.num_slots if num_slots is None else int(num_slots)
        num_ranks = previous.num_ranks if num_ranks is None else int(num_ranks)
        if self._process is None or not self._process.is_alive():
            if self._process is not None:
                log.warning(
                    "policy worker (pid %s) died with exit code %s; restarting it",
                    self._process.pid,
                    self._process.exitcode,
                )
                self.restarts += 1
                self._stop(timeout=1.0)
            self._start()
        if self.pending_id is not None:
            self.dropped += 1
        self._next_id += 1
        self.pending_id = self._next_id
        self._requests.put((self.pending_id, load, previous, num_slots, num_ranks, dict(kwargs or {})))
        return self.pending_id

    def _receive(self, timeout: float) -> ExpertPlacement | None:
        """Read replies for up to ``timeout`` s; return the pending request's placement, discard others."""
        deadline = time.monotonic() + max(timeout, 0.0)
        while self.pending_id is not None and self._conn is not None:
            left = max(deadline - time.monotonic(), 0.0)
            ready = _wait_any([self._conn, self._process.sentinel], left)
            if self._conn in ready:
                try:
                    req_id, status, payload, seconds = self._conn.recv()
                except (EOFError, OSError):  # the worker's end is closed: it died
                    return self._worker_died()
                if req_id != self.pending_id:
                    log.info("discarding the policy worker's late answer to request %d", req_id)
                    continue
                self.pending_id = None
                self.last_seconds = seconds
                if status == "error":
                    raise PolicyWorkerError(f"the policy failed in the worker (request {req_id}):\n{payload}")
                return payload
            if self._process.sentinel in ready:
                if self._conn.poll():  # read what it sent before exiting (or its EOF) first
                    continue
                return self._worker_died()
            if not ready:
                return None
        return None

    def _worker_died(self) -> None:
        self._process.join(1.0)  # reap it, so that the next submit sees it dead
        log.warning(
            "policy worker (pid %s) died (exit code %s) while planning request %s; it restarts on the next submit",
            self._process.pid,
            self._process.exitcode,
            self.pending_id,
        )
        self.pending_id = None
        self.dropped += 1
        return None

    def poll(self) -> ExpertPlacement | None:
        """The pending request's placement if it is ready, else ``None`` (the request stays pending)."""
        return self._receive(0.0)

    def wait(self, timeout: float) -> ExpertPlacement | None:
        """The pending request's placement if it arrives within ``timeout`` s, else ``None``; unlike
        :meth:`result` a request still pending stays pending (ask again later).  After ``None``,
        :attr:`pending_id` says whether it is still pending (``None``: the worker died, nothing will come).
        Raises :class:`PolicyWorkerError` when the policy raised."""
        if self.pending_id is None:
            return None
        placement = self._receive(max(timeout, 0.0))
        if placement is not None:
            self.late_in_a_row = 0
        return placement

    def result(self, timeout: float | None = None) -> ExpertPlacement | None:
        """Wait up to ``timeout`` s (``None``: forever) for the pending request's placement.

        Returns ``None`` when nothing is pending, the worker died, or the timeout passed; after a timeout
        the request is dropped for this round and its late answer will be discarded.
        Raises :class:`PolicyWorkerError` when the policy raised.
        """
        if self.pending_id is None:
            return None
        placement = self._receive(float("inf") if timeout is None else timeout)
        if placement is None and self.pending_id is not None:
            log.warning(
                "policy worker: request %d is later than %s s; dropped for this round",
                self.pending_id,
                timeout,
            )
            self.pending_id = None
            self.dropped += 1
            self.late_in_a_row += 1
            if self.late_in_a_row >= HUNG_AFTER_LATE:
                self._replace_hung()
        elif placement is not None:
            self.late_in_a_row = 0
        return placement

    def _replace_hung(self) -> None:
        """Kill a worker that missed its deadline :data:`HUNG_AFTER_LATE` times in a row (stopped, deadlocked,
        or far too slow) and start a new one at once (the spawn runs beside training)."""
        pid = self._process.pid if self._process is not None else None
        log.warning(
            "policy worker (pid %s) hung: it missed its deadline %d times in a row; killed, a new worker starts now",
            pid,
            self.late_in_a_row,
        )
        if self._process is not None and self._process.is_alive():
            self._process.kill()  # SIGKILL: a stopped (SIGSTOP) process cannot take the polite stop
        self._stop(timeout=1.0)
        self.hung += 1
        self.restarts += 1
        self.late_in_a_row = 0
        self._start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker process (idempotent)."""
        self.pending_id = None
        self._stop(timeout)

    def __enter__(self) -> PolicyWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self._process is not None and os.getpid() != getattr(self._process, "_parent_pid", None):
                return
            self.close(timeout=1.0)
        except Exception:
            pass


def broadcast_placement(placement: ExpertPlacement | None, src: int, group=None) -> ExpertPlacement | None:
    """Broadcast the planning rank's placement (or ``None``: no plan this round) to every rank of ``group``.

    Every rank calls it; ``placement`` is only read on ``src`` (a global rank, as in ``torch.distributed``).
    Two tensor broadcasts (a header and ``phy2log``), so it works with gloo and NCCL. Returns the same
    placement (or ``None``) on every rank.
    """
    import torch
    import torch.distributed as dist

    from .comm import collective_device

    device = collective_device(group)
    header = torch.zeros(6, dtype=torch.int64, device=device)
    if dist.get_rank() == src and placement is not None:
        header[:] = torch.tensor(
            [
                1,
                placement.num_layers,
                placement.num_slots,
                placement.num_ranks,
                placement.num_experts,
                int(placement.allow_same_rank_copies),
            ]
        )
    dist.broadcast(header, src=src, group=group)
    present, num_layers, num_slots, num_ranks, num_experts, allow = header.tolist()
    if not present:
        return None
    if dist.get_rank() == src:
        table = torch.from_numpy(np.ascontiguousarray(placement.phy2log)).to(device)
    else:
        table = torch.empty(num_layers, num_slots, dtype=torch.int64, device=device)
    dist.broadcast(table, src=src, group=group)
    if dist.get_rank() == src:
        return placement
    return ExpertPlacement(
        table.cpu().numpy(), num_ranks, num_experts, allow_same_rank_copies=bool(allow), validate=False
    )


def poll_plan(
    worker: PolicyWorker, *, submitted_at: float, timeout: float, wait: float, step: int
) -> tuple[int, ExpertPlacement | None]:
    """The planning rank's look at ``worker``: ``(verdict, placement)``.

    Waits up to ``wait`` seconds (the due step; 0 for a later look, or after a missed deadline); once
    ``timeout`` seconds have passed since ``submitted_at`` (``time.monotonic()``) the request is given up (the
    worker counts the miss and is replaced after two in a row).  A worker error is logged (at training step
    ``step``) and is a drop.
    """
    left = timeout - (time.monotonic() - submitted_at)
    try:
        if left <= wait:  # the deadline falls within this look: the last one
            placement = worker.result(timeout=max(left, 0.0))
        else:
            placement = worker.wait(wait)
    except PolicyWorkerError as exc:
        log.error("EPLB step %d: %s", step, exc)
        return PLAN_DROPPED, None
    if placement is not None:
        return PLAN_ARRIVED, placement
    return (PLAN_PENDING, None) if worker.pending_id is not None else (PLAN_DROPPED, None)


def agree_on_plan(verdict: int, src: int, group=None, every_stage: bool = False) -> int:
    """The verdict of the planning rank ``src`` (a global rank) on every rank of ``group`` (one scalar
    broadcast).  ``every_stage`` (pipeline parallelism: one planning rank per stage): every rank of the world
    takes the same branch at the same step (one more all-reduce): a plan dropped on any stage drops the round
    on all, a plan still pending on any stage keeps every stage waiting."""
    import torch
    import torch.distributed as dist

    from .comm import collective_device

    if not dist.is_initialized():
        return verdict
    t = torch.tensor([verdict], dtype=torch.int64, device=collective_device(group))
    dist.broadcast(t, src=src, group=group)
    if not every_stage:
        return int(t.item())
    flags = torch.stack([t[0] == PLAN_DROPPED, t[0] == PLAN_PENDING]).to(torch.int64)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    dropped, pending = flags.tolist()
    return PLAN_DROPPED if dropped else PLAN_PENDING if pending else PLAN_ARRIVED


def submit_plan(
    worker: PolicyWorker,
    placement: ExpertPlacement,
    load: np.ndarray,
    layers: list[int],
    config: Any,
    step_loads: np.ndarray | None = None,
) -> int:
    """Submit the layers ``layers`` of a window to ``worker``: their rows of ``load [L, E]`` and of
    ``placement`` (:meth:`ExpertPlacement.select_layers`), with the policy options of ``config``
    (``eplb_policy``, ``eplb_num_nodes``, ``eplb_num_groups``, ``eplb_churn_weight``, ``eplb_node_locality``)
    and, with ``eplb_time_resolved``, the window's steps (``step_loads [k, L, E]``, for
    ``policy.time_resolved.plan_for_steps``).  Returns the request id."""
    options = dict(
        num_nodes=config.eplb_num_nodes,
        num_groups=config.eplb_num_groups,
        policy=config.eplb_policy,
        churn_weight=config.eplb_churn_weight,
        node_locality=config.eplb_node_locality,
    )
    if step_loads is not None:
        options["step_loads"] = step_loads[:, layers].astype(np.float64)
    return worker.submit(load[layers].astype(np.float64), placement.select_layers(layers), options)


def look_for_plan(
    worker: PolicyWorker, *, submitted_at: float, late: bool, config: Any, step: int, monitor: Any = None
) -> tuple[int, ExpertPlacement | None]:
    """The planning rank's look at its submitted plan (:func:`poll_plan`, given up ``eplb_worker_timeout``
    after ``submitted_at``): the due step waits at most ``eplb_max_plan_wait``, a later look (``late``) or one
    after missed deadlines not at all.  A hung worker replaced here is counted to ``monitor``
    (``eplb/policy_worker_hung``)."""
    hung = worker.hung
    verdict = poll_plan(
        worker,
        submitted_at=submitted_at,
        timeout=config.eplb_worker_timeout,
        wait=0.0 if late or worker.late_in_a_row else config.eplb_max_plan_wait,
        step=step,
    )
    if worker.hung > hung and monitor is not None:
        monitor.log(step, {"eplb/policy_worker_hung": worker.hung})
    return verdict


def share_plan(
    verdict: int, placement: ExpertPlacement | None, src: int, group=None, every_stage: bool = False
) -> tuple[int, ExpertPlacement | None]:
    """:func:`agree_on_plan`, then, when the plan arrived, :func:`broadcast_placement`: the planning rank's
    ``(verdict, placement)`` on every rank of ``group`` (``placement`` as given when none arrived)."""
    verdict = agree_on_plan(verdict, src, group, every_stage=every_stage)
    if verdict == PLAN_ARRIVED:
        placement = broadcast_placement(placement, src=src, group=group)
    return verdict, placement
