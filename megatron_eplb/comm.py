"""Process groups: where a group's collectives run (the one rule every collective of the package follows),
and dedicated copies of a group."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_counts", "any_rank", "collective_device", "new_group_like", "warm_up"]


def collective_device(group=None) -> torch.device:
    """The device a collective over ``group`` needs its tensors on: this rank's CUDA device for NCCL,
    the CPU for gloo (and without an initialised process group)."""
    if not dist.is_initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool, group=None, device: torch.device | None = None) -> bool:
    """True on every rank of ``group`` (None: the world) when ``flag`` is True on any of them: one
    all-reduce of one element on ``device`` (``flag`` itself without an initialised process group)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


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
    warm_up(made)
    return made


def warm_up(group) -> None:
    """Create ``group``'s communicators now: one all-reduce and one ring of batched sends/receives of one
    element.  NCCL builds a communicator at its first use, which takes hundreds of milliseconds; without
    this the first rebalance's transfer step paid for it (817 ms instead of ~180 ms on two H200s).
    Collective over ``group``."""
    if group is None:
        return
    device = collective_device(group)
    dist.all_reduce(torch.zeros(1, device=device), group=group)
    size = dist.get_world_size(group)
    if size < 2:
        return
    me = dist.get_rank(group)
    to = dist.get_global_rank(group, (me + 1) % size)
    src = dist.get_global_rank(group, (me - 1) % size)
    out, inp = torch.zeros(1, device=device), torch.empty(1, device=device)
    ops = [dist.P2POp(dist.isend, out, to, group=group), dist.P2POp(dist.irecv, inp, src, group=group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()


def all_gather_counts(counts: torch.Tensor, group, size: int) -> torch.Tensor:
    """int64 ``[size, E]``: ``counts [E]`` of every rank of ``group`` (``size`` ranks), in rank order; one
    collective, no host sync (the per-batch replica split of both MoE adapters)."""
    if size == 1:
        return counts.unsqueeze(0)
    out = counts.new_empty(size * counts.shape[0])  # the concatenated form (gloo takes no stacked output)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, counts, group=group)
    return out.view(size, -1)
