"""The gradient of the logical model: its norm with each logical expert counted once, whatever its copies,
and clipping by that norm.

Pure over tensors (no Megatron, no DeepSpeed): the plain-torch manager and the DeepSpeed engine both hand
their gradients here.  The sums stay on the gradients' device; the one host sync is the returned float.
(The sum of a logical expert's copies' gradients is the model handle's: ``ExpertModel.sum_replica_grads``.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .comm import collective_device
from .slots import SlotParam

__all__ = ["clip_grad_norm_", "handle_grad_norm", "logical_grad_norm", "param_grad", "primary_expert_params"]


def param_grad(p: torch.Tensor) -> torch.Tensor | None:
    """The gradient Megatron accumulates into (``main_grad``) where there is one, else ``p.grad``."""
    g = getattr(p, "main_grad", None)
    return p.grad if g is None else g


def _sum_of_squares(grads: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """float64 ``[]`` on ``device``: sum over ``grads`` of the squared entries (no host sync)."""
    parts = [g.detach().to(device=device, dtype=torch.float64).pow(2).sum() for g in grads]
    if not parts:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(parts).sum()


def primary_expert_params(handle: Any) -> dict[int, list[SlotParam]]:
    """``id(param) -> [SlotParam]`` for every parameter that holds local expert slots of ``handle``: the
    parts of it whose slot holds the first copy of its logical expert (:meth:`ExpertPlacement.primary_slots`;
    empty: none).  A parameter is one slot's (``SequentialMLP``) or holds several (``GroupedMLP``)."""
    primary = handle.placement.primary_slots()
    out: dict[int, list[SlotParam]] = {}
    for layer in range(handle.num_layers):
        for k, slot in enumerate(handle.local_slots()):
            for sp in handle.slot_params(layer, k):
                parts = out.setdefault(id(sp.param), [])
                if primary[layer, slot]:
                    parts.append(sp)
    return out


def logical_grad_norm(
    grads: Iterable[tuple[torch.Tensor, torch.Tensor]],
    expert_params: dict[int, bool | Sequence[SlotParam]],
    ep_group=None,
    device: torch.device | str | None = None,
    dense_group=None,
) -> float:
    """L2 norm of the logical model's gradient, each logical expert counted once.

    Args:
        grads: ``(param, gradient)`` pairs of this rank (the full gradient under ZeRO).
        expert_params: for expert parameters, ``id(param) ->`` the parts of its gradient that are a
            primary copy's (:func:`primary_expert_params`: a list of :class:`SlotParam`; ``True``: all of it,
            ``False``: none): those are summed over ``ep_group``; the other copies hold the same summed
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
        elif primary is True:
            expert.append(g)
        elif primary is not False:
            expert.extend(sp.of(g) for sp in primary)
    expert_sq = _sum_of_squares(expert, device)
    if ep_group is not None and dist.is_initialized() and dist.get_world_size(ep_group) > 1:
        dist.all_reduce(expert_sq, group=ep_group)
    dense_sq = _sum_of_squares(dense, device)
    if dense_group is not None and dist.is_initialized() and dist.get_world_size(dense_group) > 1:
        dist.all_reduce(dense_sq, group=dense_group)
    return float((dense_sq + expert_sq).sqrt())


def handle_grad_norm(handle: Any, device: torch.device | str | None = None) -> float:
    """L2 norm of the logical gradient of ``handle.model`` (:func:`logical_grad_norm`): dense gradients once
    (already data-parallel reduced, identical on every rank), each logical expert once (its first copy;
    copies hold the same summed gradient after ``handle.sum_replica_grads()``).  ``device``: where the sums
    live.  Collective over ``handle.ep_group``."""
    grads = ((p, param_grad(p)) for p in handle.model.parameters())
    return logical_grad_norm(
        ((p, g) for p, g in grads if g is not None),
        primary_expert_params(handle),
        handle.ep_group if handle.ep_size > 1 else None,
        device,
    )


def clip_grad_norm_(handle: Any, max_norm: float, device: torch.device | str | None = None) -> float:
    """Scale every gradient of ``handle.model`` so that :func:`handle_grad_norm` is at most ``max_norm``;
    returns the norm before.  Collective over ``handle.ep_group``."""
    norm = handle_grad_norm(handle, device)
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for p in handle.model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm
