"""Pieces the benchmark scripts share (imported as ``bench_common``: each script's folder is on ``sys.path``)."""

from __future__ import annotations

import functools
import os
import socket

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["count_calls", "init_single_rank", "rotate_policy", "time_stats"]


def init_single_rank() -> torch.device:
    """One process, one device: Megatron's parallel state at TP = PP = EP = 1, NCCL on GPU, gloo on CPU."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron_eplb.patches import megatron as eplb_mcore

    cuda = torch.cuda.is_available()
    eplb_mcore.enable_cpu()  # on CUDA only the version fixes (ensure_compat), unpatched models included
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    model_parallel_cuda_manual_seed(1234)
    return torch.device("cuda", 0) if cuda else torch.device("cpu")


def count_calls(owner, name: str, events: dict[str, int]) -> None:
    """Wrap ``owner.name`` (once) so that each call adds 1 to ``events[name]``."""
    original = getattr(owner, name)
    if getattr(original, "_bench_counted", False):
        return

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        events[name] = events.get(name, 0) + 1
        return original(*args, **kwargs)

    wrapper._bench_counted = True
    setattr(owner, name, wrapper)


def time_stats(ms: list[float]) -> dict:
    """Summary of ``ms`` (times in milliseconds): n, median, p10, p90, max (``median_ms`` None when empty)."""
    if not ms:
        return {"n": 0, "median_ms": None}
    a = np.asarray(ms)
    return {
        "n": len(ms),
        "median_ms": float(np.median(a)),
        "p10_ms": float(np.percentile(a, 10)),
        "p90_ms": float(np.percentile(a, 90)),
        "max_ms": float(a.max()),
    }


def rotate_policy(load, num_slots, num_ranks, previous=None, **kwargs):
    """Test policy: every rank's slots go to the next rank (``phy2log [L, P]`` rolled by the slots per rank),
    so every slot whose expert is not already on its new rank is sent over the network: forced moves.

    Here, in an importable module rather than in a benchmark's ``__main__``, so the policy worker process
    can load it without re-running the benchmark script."""
    return np.roll(previous.phy2log, previous.phy2log.shape[1] // num_ranks, axis=1)
