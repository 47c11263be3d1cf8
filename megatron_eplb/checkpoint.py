"""Physical ⇄ logical conversion of expert state dicts, and the expert map saved beside a checkpoint.

A checkpoint stays *logical*: each logical expert of each MoE layer once, under the key it has in a
model without EP (``{layer_prefix}{expert}.{name}``, e.g. ``decoder.layers.1.mlp.experts.local_experts.5.
linear_fc1.weight``), replicas not duplicated, and the placement it was saved with in a JSON file next
to it.  Any placement (other redundancy, other EP size) loads it: every physical slot is filled from its
logical expert.

Terms as in :mod:`megatron_eplb.placement`: ``L`` MoE layers, ``E`` logical experts, ``P`` physical
slots per layer, ``S`` slots per rank; slot ``s`` lives on rank ``s // S`` as local slot ``s % S``.

``layer_prefixes[l]`` is the state-dict key prefix of MoE layer ``l``'s experts up to the expert index,
e.g. ``"decoder.layers.1.mlp.experts.local_experts."``.  Keys without one of these prefixes are not
expert keys and pass through unchanged.

Pure functions over dicts of tensors: no process group, no Megatron, no DeepSpeed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .placement import ExpertPlacement

__all__ = [
    "CheckpointError",
    "EXPERT_MAP_FILENAME",
    "expert_map_path",
    "load_expert_map",
    "logical_to_physical",
    "physical_to_logical",
    "save_expert_map",
    "split_expert_key",
]

EXPERT_MAP_FILENAME = "expert_map.json"


class CheckpointError(ValueError):
    """A state dict does not hold what the placement needs (a missing expert, copies that differ, ...)."""


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


def expert_map_path(checkpoint: str | os.PathLike) -> Path:
    """Where the expert map of a checkpoint lives: ``DIR/expert_map.json`` for a checkpoint directory,
    ``FILE.expert_map.json`` beside a checkpoint file."""
    path = Path(checkpoint)
    if path.is_dir() or not path.suffix:
        return path / EXPERT_MAP_FILENAME
    return path.with_name(path.name + "." + EXPERT_MAP_FILENAME)


def save_expert_map(placement: ExpertPlacement, checkpoint: str | os.PathLike) -> Path:
    """Write ``placement`` as the expert map beside ``checkpoint``; return the map's path."""
    path = expert_map_path(checkpoint)
    placement.to_json(path)
    return path


def load_expert_map(checkpoint: str | os.PathLike) -> ExpertPlacement | None:
    """The placement saved beside ``checkpoint``, or ``None`` when there is none."""
    path = expert_map_path(checkpoint)
    if not path.is_file():
        return None
    return ExpertPlacement.from_json(path, allow_same_rank_copies=True)


def _check_prefixes(layer_prefixes: Sequence[str], num_layers: int) -> None:
    if len(layer_prefixes) != num_layers:
        raise CheckpointError(
            f"{len(layer_prefixes)} layer prefixes given for a placement of {num_layers} MoE layers"
        )
