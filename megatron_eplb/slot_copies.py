"""Whole-slot copies between EP ranks through a collective: what an :class:`~megatron_eplb.protocols.ExpertModel`
implementation needs to re-place every layer at once (``set_placement``), to gather its logical experts
(checkpoints, conversion) and to tell a forward from its activation-recompute re-run.  Shared by the
Megatron-core and the DeepSpeed-MoE handles.

Pure torch + ``torch.distributed``: no Megatron, no DeepSpeed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .comm import collective_device

__all__ = ["all_gather_rows", "flatten", "gather_logical", "recomputing", "refill_slots", "unflatten_into"]


def recomputing() -> bool:
    """Whether this forward is a re-run inside backward (activation recompute): not counted."""
    return torch._C._current_graph_task_id() != -1


def all_gather_rows(local: torch.Tensor, group) -> torch.Tensor:
    """Concatenate ``local [k, n]`` of every rank of ``group`` in rank order: ``[k * ranks, n]`` (on the
    group's collective device)."""
    size = dist.get_world_size(group)
    if size == 1:
        return local.clone()
    local = local.contiguous().to(collective_device(group))
    out = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(out, local, group=group)
    return torch.cat(out)


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat vector of ``tensors`` (in the dtype of the widest float among them)."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def unflatten_into(tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy ``flat`` (as made by :func:`flatten`) back into ``tensors`` in place."""
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def gather_logical(
    handle: Any, layer: int, get: Callable[[int, int], Sequence[torch.Tensor]] | None = None
) -> torch.Tensor:
    """``[E, n]`` flat tensors (``get(layer, slot)``, default ``handle.slot_tensors``) of every logical expert
    of ``layer``, each from its primary copy ``placement.log2phy[layer, :, 0]``, on the slots' device
    (collective over ``handle.ep_group``)."""
    get = get or handle.slot_tensors
    local = torch.stack([flatten(get(layer, k)) for k in range(handle.slots_per_rank)])
    every = all_gather_rows(local, handle.ep_group)  # [P, n]
    first = torch.tensor(handle.placement.log2phy[layer, :, 0], device=every.device)
    return every[first].to(local.device)


def refill_slots(handle: Any, phy2log: np.ndarray, optimizer: Any = None) -> None:
    """Fill every local slot of each layer whose row of ``phy2log`` (``[L, P]``) differs from the handle's
    placement with its new logical expert, from the expert's current primary copy: weights, and with
    ``optimizer`` (an :class:`~megatron_eplb.protocols.OptimizerSlots`) its optimizer state.  Collective over
    ``handle.ep_group``; the caller switches the placement afterwards."""
    for layer in range(handle.num_layers):
        row = phy2log[layer]
        if np.array_equal(row, handle.placement.phy2log[layer]):
            continue
        getters = [handle.slot_tensors]
        if optimizer is not None and optimizer.tensors(handle.slot_params(layer, 0)):
            getters.append(lambda lyr, k: optimizer.tensors(handle.slot_params(lyr, k)))
        for get in getters:
            logical = gather_logical(handle, layer, get)
            for k, slot in enumerate(handle.local_slots()):
                if row[slot] >= 0:
                    unflatten_into(get(layer, k), logical[int(row[slot])])
