"""One small launcher for multi-process tests: gloo on CPU, a free port, results and errors collected.

Usage (the function must be importable by the child processes: define it at module level)::

    from dist import run_distributed

    def _check(rank, world_size, n):        # runs in every rank, process group already initialised
        return rank * n

    def test_something():
        assert run_distributed(_check, 2, 10) == [0, 10]

Each rank's return value comes back in rank order (it must pickle).  If any rank raises, the others are
stopped and :class:`DistributedTestError` carries every failed rank's traceback.  Share one launch
between several checks (spawning costs seconds): return a dict of results and assert on it in the test.

DeepSpeed's CPU shared-memory allreduce (``DS_ACCELERATOR=cpu``) creates one 66 MB file per rank,
``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, and never removes it: 230 of them (15 GB
of RAM) after one session's runs.  Every port a test gets from :func:`free_port` is remembered; the files of
those ports are removed when :func:`run_distributed` returns and, for launcher runs, after each test
(``tests/conftest.py`` calls :func:`remove_shm_buffers`).  Files of other ports (other jobs) are left alone.
"""

from __future__ import annotations

import glob
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

__all__ = ["DistributedTestError", "free_port", "remove_shm_buffers", "run_distributed", "used_ports"]

SHM_PATTERN = "/dev/shm/deepspeed_allreduce_buffer_{uid}_*_{port}_*"
_PORTS: set[int] = set()  # every port handed out by free_port() in this process, not yet cleaned


class DistributedTestError(RuntimeError):
    """One or more ranks failed (their tracebacks are in the message) or timed out."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (remembered for :func:`remove_shm_buffers`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _PORTS.add(port)
    return port


def used_ports() -> set[int]:
    """The ports :func:`free_port` handed out whose shared-memory files were not removed yet."""
    return set(_PORTS)


def remove_shm_buffers(ports=None) -> list[str]:
    """Remove DeepSpeed's shared-memory allreduce files of ``ports`` (default: every port :func:`free_port`
    handed out); call it once the processes on those ports have ended.  Returns the paths removed."""
    ports = used_ports() if ports is None else set(ports)
    removed = []
    for port in ports:
        for path in glob.glob(SHM_PATTERN.format(uid=os.getuid(), port=port)):
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
        _PORTS.discard(port)
    return removed


def _worker(
    rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict, results, env: dict
) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args, **kwargs)
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` in ``world_size`` spawned processes.

    Args:
        fn: a module-level function; the default process group (gloo) is initialised before it runs.
        world_size: number of processes.
        timeout: seconds for all ranks together before :class:`DistributedTestError`.
        env: extra environment variables for the children.
    Returns:
        ``[world_size]`` return values in rank order.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, fn, args, kwargs, results, dict(env or {})),
            daemon=False,  # ranks may start processes of their own (the policy worker)
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(values) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(values) - set(errors))
                errors.update({r: f"timed out after {timeout:.0f} s" for r in missing})
                break
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [
                    r for r, p in enumerate(procs) if not p.is_alive() and r not in values and r not in errors
                ]
                # A rank that died without reporting (segfault, os._exit) is an error once its queue is drained.
                if dead and all(not p.is_alive() for p in procs):
                    for r in dead:
                        errors[r] = f"exited with code {procs[r].exitcode} without a result"
                continue
            (values if ok else errors)[rank] = value
            if errors:  # stop early: the others likely hang in a collective
                break
    finally:
        for p in procs:
            if p.is_alive() and (errors or len(values) < world_size):
                p.terminate()
        for p in procs:
            p.join(timeout=10)
        if not any(p.is_alive() for p in procs):
            remove_shm_buffers([port])
    if errors:
        text = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(errors.items()))
        raise DistributedTestError(f"{len(errors)} of {world_size} ranks failed:\n{text}")
    return [values[r] for r in range(world_size)]
