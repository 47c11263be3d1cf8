"""The gradient norm of the logical model: each logical expert counted once, whatever its copies.

Pure over tensors (no Megatron, no DeepSpeed): the plain-torch manager and the DeepSpeed engine both hand
their gradients here.  The sums stay on the gradients' device; the one host sync is the returned float.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from .comm import collective_device

__all__ = ["logical_grad_norm", "primary_expert_params"]


def _sum_of_squares(grads: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """float64 ``[]`` on ``device``: sum over ``grads`` of the squared entries (no host sync)."""
    parts = [g.detach().to(device=device, dtype=torch.float64).pow(2).sum() for g in grads]
    if not parts:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(parts).sum()


def primary_expert_params(handle: Any) -> dict[int, bool]:
    """``id(param) -> bool`` for every local expert-slot parameter of ``handle``: whether its slot holds
    the first copy of its logical expert (:meth:`ExpertPlacement.primary_slots`)."""
    primary = handle.placement.primary_slots()
    out: dict[int, bool] = {}
    for layer in range(handle.num_layers):
        for k, slot in enumerate(handle.local_slots()):
            for p in handle.slot_params(layer, k):
                out[id(p)] = bool(primary[layer, slot])
    return out


def logical_grad_norm(
    grads: Iterable[tuple[torch.Tensor, torch.Tensor]],
    expert_params: dict[int, bool],
    ep_group=None,
    device: torch.device | str | None = None,
    dense_group=None,
) -> float:
    """L2 norm of the logical model's gradient, each logical expert counted once.

    Args:
        grads: ``(param, gradient)`` pairs of this rank (the full gradient under ZeRO).
        expert_params: ``id(param) -> primary`` for expert parameters (:func:`primary_expert_params`):
            a primary copy's gradient is summed over ``ep_group``; the other copies hold the same summed
            gradient and are left out.  Any other parameter is dense: identical on every rank (already
            data-parallel reduced), counted once locally.
        ep_group: the expert-parallel group the expert part is summed over (None: no reduction).
        device: where the sums live (default: the device ``ep_group``'s collectives need, CUDA for NCCL).
        dense_group: the group the dense part is summed over (tensor parallelism: pass each TP shard on its
            rank and each TP-replicated parameter on one rank only); None: no reduction.
    Returns:
        ``sqrt(all_reduce_dense(sum dense^2) + all_reduce_EP(sum primary^2))`` as a Python float: the only
        host sync.
    """
    device = collective_device(ep_group) if device is None else torch.device(device)
    dense, expert = [], []
    for p, g in grads:
        primary = expert_params.get(id(p))
        if primary is None:
            dense.append(g)
        elif primary:
            expert.append(g)
    expert_sq = _sum_of_squares(expert, device)
    if ep_group is not None and dist.is_initialized() and dist.get_world_size(ep_group) > 1:
        dist.all_reduce(expert_sq, group=ep_group)
    dense_sq = _sum_of_squares(dense, device)
    if dense_group is not None and dist.is_initialized() and dist.get_world_size(dense_group) > 1:
        dist.all_reduce(dense_sq, group=dense_group)
    return float((dense_sq + expert_sq).sqrt())
