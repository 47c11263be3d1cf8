"""The optimizer-state half of the logical checkpoint: the optimizer state of the logical model, and that
state put back into any placement.

In the payload of :func:`megatron_eplb.checkpoint.save_logical_checkpoint` the optimizer state is
``{logical parameter name: {"fp32"?, "exp_avg", "exp_avg_sq", ...}}`` of whole CPU tensors, named and shaped
as the model without EP holds its parameters: dense parameters once (joined over tensor parallelism where the
handle has ``dense_to_logical``), each logical expert once (from its first copy; ``handle.logical_entries``:
one tensor per expert, or stacked over the experts).  The optimizer's step count (Adam's ``step``) is one
number beside it.  A load fills every slot from its logical expert; where no fp32 master was saved (an fp32
run) the saved weights stand in for it.

Terms as in :mod:`megatron_eplb.placement` (``L`` MoE layers, ``E`` logical experts, ``S`` slots per rank).
``slots`` is the optimizer's :class:`megatron_eplb.protocols.OptimizerSlots`, ``handle`` the model's
:class:`~megatron_eplb.protocols.ExpertModel` (None: a model without EPLB).  No Megatron, no DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from .errors import CheckpointError
from .optimizer_state import MASTER_KEY

__all__ = [
    "check_optimizer_state_fits",
    "expert_param_ids",
    "load_optimizer_state",
    "logical_optimizer_state",
]


def expert_param_ids(handle: Any) -> set[int]:
    """``id`` of every parameter that holds local expert slots of ``handle``."""
    return {
        id(sp.param)
        for layer in range(handle.num_layers)
        for k in range(handle.slots_per_rank)
        for sp in handle.slot_params(layer, k)
    }


def logical_optimizer_state(
    model: torch.nn.Module, handle: Any, slots: Any
) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer state of the logical model: ``{logical parameter name: {key: CPU tensor}}``.

    Dense parameters from this rank (identical on every data-parallel rank; joined over tensor parallelism
    where the handle has ``dense_to_logical``), each logical expert from its first copy (gathered over
    ``handle.ep_group``), named and shaped as the unpatched model without EP holds its experts
    (``handle.logical_entries``: one tensor per expert, or stacked over the experts).  ``slots``:
    :class:`megatron_eplb.protocols.OptimizerSlots`.  Collective (EP group, TP group, and
    ``slots.full_state``'s groups); complete on every rank.
    """
    expert_ids = expert_param_ids(handle) if handle is not None else set()
    to_logical = getattr(handle, "dense_to_logical", None)
    out: dict[str, dict[str, torch.Tensor]] = {}
    expert_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, p in model.named_parameters():
        # every rank reads every parameter in one order: full_state is collective under ZeRO
        state = slots.full_state(p)
        if id(p) in expert_ids:
            expert_state[id(p)] = state
        else:
            if to_logical is not None:  # e.g. joined over tensor parallelism (collective)
                state = {k: to_logical(p, v.detach()) for k, v in state.items()}
            out[name] = {k: v.detach().cpu() for k, v in state.items()}
    if handle is None:
        return out
    primary = handle.placement.primary_slots()
    # (layer, logical expert, {key: [the slot's tensors]}) of the first copies on this rank
    mine: list[tuple[int, int, dict[str, list[torch.Tensor]]]] = []
    for layer in range(handle.num_layers):
        for k, slot in enumerate(handle.local_slots()):
            if not primary[layer, slot]:
                continue
            per_key: dict[str, list[torch.Tensor]] = {}
            for sp in handle.slot_params(layer, k):
                for key, value in expert_state[id(sp.param)].items():
                    per_key.setdefault(key, []).append(sp.of(value).detach().cpu().clone())
            mine.append((layer, int(handle.placement.phy2log[layer, slot]), per_key))
    if dist.is_initialized() and handle.ep_size > 1:
        parts: list = [None] * handle.ep_size
        dist.all_gather_object(parts, mine, group=handle.ep_group)
        mine = [item for part in parts for item in part]
    by_expert = {(layer, e): per_key for layer, e, per_key in mine}
    for layer in range(handle.num_layers):
        keys = sorted({key for (lyr, _), per_key in by_expert.items() if lyr == layer for key in per_key})
        for key in keys:
            experts = [by_expert[(layer, e)][key] for e in range(handle.num_experts)]
            for name, tensor in handle.logical_entries(layer, experts).items():
                out.setdefault(name, {})[key] = tensor
    return out


def _expert_full_states(
    handle: Any, optimizer: Mapping[str, Mapping[str, torch.Tensor]], model_state: Mapping[str, Any]
) -> dict[int, dict[str, torch.Tensor]]:
    """``id(param) -> {key: full tensor shaped like the parameter}`` for every parameter holding local expert
    slots: each slot's part from its logical expert in the saved ``optimizer`` state; where no master
    (``fp32``) was saved, the saved weights stand in for it."""
    keys = sorted({key for state in optimizer.values() for key in state})
    out: dict[int, dict[str, torch.Tensor]] = {}
    for layer in range(handle.num_layers):
        per_key: dict[str, list[list[torch.Tensor]]] = {}
        for key in keys:
            try:
                per_key[key] = handle.split_logical_entries(
                    layer, {name: state[key] for name, state in optimizer.items() if key in state}
                )
            except CheckpointError:
                continue  # this layer's experts have no such state (e.g. no master saved)
        if MASTER_KEY not in per_key:
            weights = {k: v for k, v in model_state.items() if torch.is_tensor(v)}
            per_key[MASTER_KEY] = handle.split_logical_entries(layer, weights)
        for k, slot in enumerate(handle.local_slots()):
            expert = int(handle.placement.phy2log[layer, slot])
            if expert < 0:
                continue
            for i, sp in enumerate(handle.slot_params(layer, k)):
                full = out.setdefault(id(sp.param), {})
                for key, experts in per_key.items():
                    value = experts[expert][i]
                    if key not in full:
                        dtype = torch.float32 if key == MASTER_KEY else value.dtype
                        full[key] = torch.zeros(sp.param.shape, dtype=dtype)
                    sp.of(full[key]).copy_(value)
    return out


def check_optimizer_state_fits(
    optimizer: Mapping[str, Mapping[str, Any]], model: torch.nn.Module, handle: Any, *, source: str
) -> None:
    """Check that the saved dense ``optimizer`` state (by logical parameter name) fits ``model``'s
    parameters before anything is loaded (the experts' state is checked where it is split, in
    :func:`load_optimizer_state`).  Local.

    Raises:
        CheckpointError: a tensor's shape (this rank's part, e.g. its TP shard) differs from its parameter's;
            the message names ``source``, the key and the parameter.
    """
    experts = expert_param_ids(handle) if handle is not None else set()
    to_local = getattr(handle, "dense_to_local", None)
    for name, p in model.named_parameters():
        if id(p) in experts:  # the experts' state is checked where it is split (_expert_full_states)
            continue
        for key, value in (optimizer.get(name) or {}).items():
            if torch.is_tensor(value) and to_local is not None:  # this rank's part (e.g. its TP shard)
                value = to_local(p, value)
            if torch.is_tensor(value) and value.shape != p.shape:
                raise CheckpointError(
                    f"{source}: optimizer state {key!r} of {name!r} has shape {list(value.shape)} but "
                    f"the parameter {list(p.shape)}"
                )


def load_optimizer_state(
    model: torch.nn.Module,
    handle: Any,
    slots: Any,
    optimizer: Mapping[str, Mapping[str, torch.Tensor]],
    model_state: Mapping[str, Any],
    optimizer_step: int,
) -> None:
    """Set ``slots``' state of every parameter of ``model`` from the saved logical ``optimizer`` state (each
    expert slot from its logical expert under ``handle``'s current placement; dense parameters by name, cut
    to this rank's part with ``handle.dense_to_local`` where there is one), an fp32 master from the saved
    master or else from the saved weight in ``model_state``; then the optimizer's step count.  Collective
    where ``slots.set_full_state`` is (e.g. ZeRO).
    """
    experts = _expert_full_states(handle, optimizer, model_state) if handle is not None else {}
    to_local = getattr(handle, "dense_to_local", None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            values = experts.get(id(p))
            if values is None:
                values = dict(optimizer.get(name) or {})
                if MASTER_KEY not in values and torch.is_tensor(model_state.get(name)):
                    values[MASTER_KEY] = model_state[name].float()  # saved without masters (an fp32 run)
                if to_local is not None:  # e.g. this rank's tensor-parallel part
                    values = {k: to_local(p, v) for k, v in values.items()}
            if values:
                slots.set_full_state(p, {k: v.to(p.device) for k, v in values.items()})
    slots.set_optimizer_step(optimizer_step)
