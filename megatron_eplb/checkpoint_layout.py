"""Key layout of logical checkpoints with per-expert keys: a physical slot's state-dict key <-> its logical
expert's key (``{layer prefix}{expert}.{name}``), under a placement.  Used by the checkpoint module and the
DeepSpeed-MoE handle.

Pure torch + numpy: no Megatron, no DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .errors import CheckpointError

__all__ = ["logical_to_physical", "physical_to_logical", "split_expert_key"]


def split_expert_key(key: str, layer_prefixes: Sequence[str]) -> tuple[int, int, str] | None:
    """Parse an expert key.

    Args:
        key: a state-dict key.
        layer_prefixes: ``[L]`` key prefix of each MoE layer's experts (up to the expert/slot index).
    Returns:
        ``(layer, index, name)`` (``index`` is a slot or an expert, as the dict is physical or logical,
        ``name`` the rest of the key after ``"."``), or ``None`` when ``key`` is not an expert key.
    """
    for layer, prefix in enumerate(layer_prefixes):
        if key.startswith(prefix):
            index, dot, name = key[len(prefix) :].partition(".")
            if dot and index.isdigit():
                return layer, int(index), name
    return None


def physical_to_logical(
    slot_state: Mapping[str, torch.Tensor],
    phy2log: np.ndarray,
    layer_prefixes: Sequence[str],
    *,
    check_copies: bool = True,
) -> dict[str, torch.Tensor]:
    """Deduplicate a physical state dict into the logical layout.

    Args:
        slot_state: state dict whose expert keys are ``{layer_prefixes[l]}{s}.{name}`` for *global* slots
            ``s`` in ``[0, P)`` (all ranks' slots gathered); other keys pass through.
        phy2log: int64 ``[L, P]`` logical expert of each slot (``-1`` = empty slot, skipped).
        layer_prefixes: ``[L]`` expert key prefix of each MoE layer.
        check_copies: raise :class:`CheckpointError` when two copies of one expert differ.
    Returns:
        state dict with expert keys ``{layer_prefixes[l]}{e}.{name}`` for every logical expert ``e``
        (taken from its lowest slot), other keys unchanged.
    """
    phy2log = np.asarray(phy2log)
    _check_prefixes(layer_prefixes, phy2log.shape[0])
    out: dict[str, torch.Tensor] = {}
    for key, value in slot_state.items():
        parsed = split_expert_key(key, layer_prefixes)
        if parsed is None:
            out[key] = value
            continue
        layer, slot, name = parsed
        if slot >= phy2log.shape[1]:
            raise CheckpointError(
                f"{key}: slot {slot} is out of range for {phy2log.shape[1]} slots per layer"
            )
        expert = int(phy2log[layer, slot])
        if expert < 0:
            continue
        new_key = f"{layer_prefixes[layer]}{expert}.{name}"
        if new_key not in out:
            out[new_key] = value
        elif check_copies and torch.is_tensor(value) and not torch.equal(out[new_key], value):
            raise CheckpointError(
                f"layer {layer} slot {slot}: copy of expert {expert} differs from another copy ({name}); "
                "copies must stay identical (sum replica gradients before the optimizer step)"
            )
    return out


def logical_to_physical(
    logical_state: Mapping[str, torch.Tensor],
    phy2log: np.ndarray,
    layer_prefixes: Sequence[str],
    *,
    rank: int | None = None,
    slots_per_rank: int | None = None,
    clone: bool = False,
) -> dict[str, torch.Tensor]:
    """Fill physical slots from a logical state dict.

    Args:
        logical_state: state dict with expert keys ``{layer_prefixes[l]}{e}.{name}`` for every logical
            expert ``e`` of every layer; other keys pass through.
        phy2log: int64 ``[L, P]`` logical expert of each slot (``-1`` = empty slot, left out).
        layer_prefixes: ``[L]`` expert key prefix of each MoE layer.
        rank: when given, return only this rank's slots under their *local* index ``k`` in ``[0, S)``
            (the keys of that rank's model); otherwise every slot under its global index.
        slots_per_rank: ``S``; required with ``rank``.
        clone: copy tensors instead of sharing them between the copies of one expert.
    Returns:
        state dict with expert keys ``{layer_prefixes[l]}{slot}.{name}``, other keys unchanged.
    """
    phy2log = np.asarray(phy2log)
    num_layers, num_slots = phy2log.shape
    _check_prefixes(layer_prefixes, num_layers)
    if rank is None:
        first, count = 0, num_slots
    else:
        if slots_per_rank is None or slots_per_rank < 1:
            raise CheckpointError("logical_to_physical(rank=...) needs slots_per_rank >= 1")
        first, count = rank * slots_per_rank, slots_per_rank
        if first + count > num_slots:
            raise CheckpointError(
                f"rank {rank} with {slots_per_rank} slots per rank exceeds {num_slots} slots"
            )
    by_expert: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in logical_state.items():
        parsed = split_expert_key(key, layer_prefixes)
        if parsed is None:
            out[key] = value
        else:
            layer, expert, name = parsed
            by_expert.setdefault((layer, expert), {})[name] = value
    names: set[str] | None = None
    for layer in range(num_layers):
        for k in range(count):
            expert = int(phy2log[layer, first + k])
            if expert < 0:
                continue
            tensors = by_expert.get((layer, expert))
            if tensors is None:
                raise CheckpointError(
                    f"layer {layer}: the checkpoint has no logical expert {expert} (keys "
                    f"{layer_prefixes[layer]}{expert}.*); it was saved for a model with other experts"
                )
            if names is None:
                names = set(tensors)
            elif set(tensors) != names:
                raise CheckpointError(
                    f"layer {layer} expert {expert}: tensors {sorted(tensors)} differ from other experts' {sorted(names)}"
                )
            index = k if rank is not None else first + k
            for name, value in tensors.items():
                out[f"{layer_prefixes[layer]}{index}.{name}"] = value.clone() if clone else value
    return out


def _check_prefixes(layer_prefixes: Sequence[str], num_layers: int) -> None:
    if len(layer_prefixes) != num_layers:
        raise CheckpointError(
            f"{len(layer_prefixes)} layer prefixes given for a placement of {num_layers} MoE layers"
        )
