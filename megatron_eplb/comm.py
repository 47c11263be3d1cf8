"""Process groups: where a group's collectives run (the one rule every collective of the package follows),
and dedicated copies of a group."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["collective_device", "new_group_like"]


def collective_device(group=None) -> torch.device:
    """The device a collective over ``group`` needs its tensors on: this rank's CUDA device for NCCL,
    the CPU for gloo (and without an initialised process group)."""
    if not dist.is_initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def new_group_like(group):
    """A new process group with the ranks of ``group`` (e.g. the EP group), so traffic on it never queues
    behind the model's collectives; None without an initialised process group.  Collective over the world:
    every rank creates every group's copy (all ranks' ``group`` s), in one order."""
    if not dist.is_initialized():
        return None
    mine = dist.get_process_group_ranks(group)
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    me, made = dist.get_rank(), None
    for ranks in sorted({tuple(r) for r in every}):
        copy = dist.new_group(list(ranks))
        if me in ranks:
            made = copy
    return made
