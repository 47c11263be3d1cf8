"""Where a process group's collectives run: the one rule every collective of the package follows."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["collective_device"]


def collective_device(group=None) -> torch.device:
    """The device a collective over ``group`` needs its tensors on: this rank's CUDA device for NCCL,
    the CPU for gloo (and without an initialised process group)."""
    if not dist.is_initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
