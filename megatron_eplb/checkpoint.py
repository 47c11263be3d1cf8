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

The one logical training checkpoint (:func:`save_logical_checkpoint` / :func:`load_logical_checkpoint`,
used by ``EPLBManager.save_checkpoint`` and ``patches.deepspeed.save_checkpoint`` alike) is a directory::

    DIR/model_logical.pt   torch.save of a dict:
        "format": "megatron-eplb-logical", "version": 1,
        "model": the model's state dict with every logical expert once (CPU tensors),
        "optimizer": {logical parameter name: {"fp32"?, "exp_avg", "exp_avg_sq", ...}} whole CPU tensors
                     (``OptimizerSlots.full_state``; no ``step``),
        "optimizer_step": the optimizer's step count (Adam's ``step``, one number),
        "eplb_step_count": the manager's step (None without a manager),
        ... what the caller adds (DeepSpeed: "global_steps", "lr_scheduler");
    DIR/expert_map.json    the placement it was saved with and the [L, E] load recorded before the save.

A load chooses the placement to resume with (:func:`resume_placement`: the saved one, or a new plan for
another EP size / slot count from the recorded load), then fills every slot from its logical expert.

The conversion functions are pure over dicts of tensors; the save/load functions take the model handle
and the optimizer slots (:mod:`megatron_eplb.protocols`) and are collective over the expert-parallel
group.  No Megatron, no DeepSpeed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from .errors import CheckpointError
from .gradients import primary_expert_params
from .optimizer_state import MASTER_KEY
from .placement import ExpertPlacement

if TYPE_CHECKING:
    from .protocols import ExpertModel, OptimizerSlots

__all__ = [
    "CHECKPOINT_FILENAME",
    "CheckpointError",
    "EXPERT_MAP_FILENAME",
    "expert_map_path",
    "load_expert_map",
    "load_logical_checkpoint",
    "logical_optimizer_state",
    "logical_param_names",
    "logical_to_physical",
    "physical_to_logical",
    "read_logical_checkpoint",
    "resume_placement",
    "save_expert_map",
    "save_logical_checkpoint",
    "split_expert_key",
]

log = logging.getLogger("megatron_eplb")

EXPERT_MAP_FILENAME = "expert_map.json"
CHECKPOINT_FILENAME = "model_logical.pt"
CHECKPOINT_FORMAT = "megatron-eplb-logical"
CHECKPOINT_VERSION = 1


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


# ============================================================================ the logical checkpoint


def logical_param_names(model: torch.nn.Module, handle: Any) -> dict[str, str]:
    """``physical parameter name -> logical name`` for every parameter of ``model``: a local slot's
    parameter is named after the logical expert it holds now (``{prefix}{expert}.{name}``), any other keeps
    its name.  ``handle`` None: every name is its own."""
    names = {name: name for name, _ in model.named_parameters()}
    if handle is None:
        return names
    by_id = {id(p): name for name, p in model.named_parameters()}
    prefixes = handle.expert_key_prefixes()
    param_names = handle.slot_param_names()
    for layer in range(handle.num_layers):
        for k, slot in enumerate(handle.local_slots()):
            expert = int(handle.placement.phy2log[layer, slot])
            for pname, p in zip(param_names, handle.slot_params(layer, k)):
                names[by_id[id(p)]] = f"{prefixes[layer]}{expert}.{pname}" if expert >= 0 else ""
    return names


def logical_optimizer_state(
    model: torch.nn.Module, handle: Any, slots: Any
) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer state of the logical model: ``{logical parameter name: {key: CPU tensor}}``.

    Dense parameters from this rank (identical on every data-parallel rank; joined over tensor parallelism
    where the handle has ``dense_to_logical``), each logical expert from its first copy (gathered over
    ``handle.ep_group``).  ``slots``: :class:`megatron_eplb.protocols.OptimizerSlots`.  Collective (EP group,
    TP group, and ``slots.full_state``'s groups); complete on every rank.
    """
    names = logical_param_names(model, handle)
    primary = primary_expert_params(handle) if handle is not None else {}
    to_logical = getattr(handle, "dense_to_logical", None)
    out: dict[str, dict[str, torch.Tensor]] = {}
    experts: list[tuple[str, dict[str, torch.Tensor]]] = []
    for name, p in model.named_parameters():
        # every rank reads every parameter in one order: full_state is collective under ZeRO
        state = {k: v.detach() for k, v in slots.full_state(p).items()}
        if id(p) not in primary and to_logical is not None:
            state = {k: to_logical(p, v) for k, v in state.items()}
        state = {k: v.cpu() for k, v in state.items()}
        if id(p) not in primary:
            out[name] = state
        elif primary[id(p)]:
            experts.append((names[name], state))
    if handle is not None and dist.is_initialized() and handle.ep_size > 1:
        parts: list = [None] * handle.ep_size
        dist.all_gather_object(parts, experts, group=handle.ep_group)
        experts = [item for part in parts for item in part]
    out.update(experts)
    return out


def save_logical_checkpoint(
    directory: str | os.PathLike,
    handle: ExpertModel | None,
    slots: OptimizerSlots | None = None,
    *,
    model: torch.nn.Module | None = None,
    expert_load: np.ndarray | None = None,
    eplb_step_count: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the logical checkpoint (format in this module's docstring) to ``directory``.

    Args:
        handle: the model's :class:`megatron_eplb.protocols.ExpertModel` (None: a model without EPLB).
        slots: the optimizer's :class:`~megatron_eplb.protocols.OptimizerSlots` (None: no optimizer state).
        expert_load: ``[L, E]`` load written into the map (a resume at another EP size plans from it);
            None keeps the placement's own.
        model: the (patched) model; default ``handle.model``.
        eplb_step_count: the manager's step; ``extra``: more entries for the payload (rank 0's are written).
    Returns:
        ``directory``.  Collective over every rank; rank 0 writes.
    """
    directory = Path(directory)
    model = handle.model if model is None else model
    model_state = handle.logical_state_dict() if handle is not None else model.state_dict()
    optimizer = logical_optimizer_state(model, handle, slots) if slots is not None else {}
    if not dist.is_initialized() or dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in model_state.items()},
            "optimizer": optimizer,
            "optimizer_step": slots.optimizer_step() if slots is not None else 0,
            "eplb_step_count": eplb_step_count,
            **dict(extra or {}),
        }
        torch.save(payload, directory / CHECKPOINT_FILENAME)
        if handle is not None:
            placement = handle.placement
            save_expert_map(
                placement.with_load(expert_load) if expert_load is not None else placement, directory
            )
    if dist.is_initialized():
        dist.barrier()
    return directory


def read_logical_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """The payload of :func:`save_logical_checkpoint` in ``directory`` (on the CPU).  Local."""
    path = Path(directory) / CHECKPOINT_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no logical checkpoint in {str(directory)!r} (expected {path.name} there)")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if (
        payload.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT
        or payload.get("version", 1) > CHECKPOINT_VERSION
    ):
        raise CheckpointError(
            f"{path}: format {payload.get('format')!r} version {payload.get('version')} is not a megatron-eplb "
            f"logical checkpoint this version reads ({CHECKPOINT_FORMAT!r} <= {CHECKPOINT_VERSION})"
        )
    return payload


def load_logical_checkpoint(
    directory: str | os.PathLike,
    handle: ExpertModel | None,
    *,
    model: torch.nn.Module | None = None,
    slots: OptimizerSlots | None = None,
    config: Any = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Load :func:`save_logical_checkpoint`'s ``directory`` into the model (``model``, default
    ``handle.model``) under any placement or EP size.

    First the placement to resume with (:func:`resume_placement`, logged on rank 0; ``handle.
    set_placement`` when it changes), then every slot from its logical expert: weights, and with ``slots``
    the optimizer state (an fp32 master where the layout keeps one, from the saved master or else the saved
    weight) and the optimizer's step count.  Collective over the EP group when the placement changes.

    Returns:
        the payload without ``model`` and ``optimizer``, plus ``placement``: :func:`resume_placement`'s
        info (None without a handle).
    """
    payload = read_logical_checkpoint(directory)
    model = handle.model if model is None else model
    model_state = payload["model"]
    info = None
    if handle is not None:
        placement, info = resume_placement(load_expert_map(directory), handle, config)
        if placement is not None:
            handle.set_placement(placement)
        if not dist.is_initialized() or dist.get_rank() == 0:
            log.info("megatron-eplb: loading %s: %s", directory, info["message"])
        handle.load_logical_state_dict(model_state, strict=strict)
    else:
        model.load_state_dict(model_state, strict=strict)
    if slots is not None:
        optimizer = payload["optimizer"]
        names = logical_param_names(model, handle)
        experts = primary_expert_params(handle) if handle is not None else {}
        to_local = getattr(handle, "dense_to_local", None)
        with torch.no_grad():
            for name, p in model.named_parameters():
                logical = names[name]
                values = dict(optimizer.get(logical) or {})
                if MASTER_KEY not in values and torch.is_tensor(model_state.get(logical)):
                    values[MASTER_KEY] = model_state[logical].float()  # saved without masters (an fp32 run)
                if id(p) not in experts and to_local is not None:  # e.g. this rank's tensor-parallel part
                    values = {k: to_local(p, v) for k, v in values.items()}
                if values:
                    slots.set_full_state(p, {k: v.to(p.device) for k, v in values.items()})
        slots.set_optimizer_step(int(payload.get("optimizer_step") or 0))
    out = {k: v for k, v in payload.items() if k not in ("model", "optimizer")}
    out["placement"] = info
    return out


def resume_placement(
    saved: ExpertPlacement | None, handle: Any, config: Any = None
) -> tuple[ExpertPlacement | None, dict]:
    """Choose the placement to resume with.  Pure (no process group).

    * ``config.expert_map_path`` is given (static EPLB): that map wins, the saved one is not used;
    * the map saved beside the checkpoint fits (same EP size, slots per layer): resume with it;
    * it was saved for another EP size (e.g. one GPU lost) or slot count: a new plan for the current EP size
      and slot count with :func:`megatron_eplb.policy.rebalance` on the map's recorded ``expert_load``
      (``config``'s policy, ``low_churn`` as ``auto``: there is nothing to stay close to); without a
      recorded load keep the current (default) placement.

    Args:
        saved: the map saved beside the checkpoint (:func:`load_expert_map`), or None.
        handle: the model (``placement``, ``num_layers``, ``num_experts``, ``ep_size``, ``num_slots``).
        config: the :class:`~megatron_eplb.config.EPLBConfig` (or None: defaults).
    Returns:
        (the placement to set, or None to keep the current one;
        ``{"action": "restored" | "replanned" | "kept", "saved_ep_size", "saved_num_slots", "ep_size",
        "num_slots", "balancedness" (predicted, replanned only), "balancedness_default", "message"}``).
    Raises:
        CheckpointError: the map is for another number of MoE layers or experts.
    """
    from .stats import balance_summary

    info = {
        "action": "kept",
        "saved_ep_size": None if saved is None else saved.num_ranks,
        "saved_num_slots": None if saved is None else saved.num_slots,
        "ep_size": handle.ep_size,
        "num_slots": handle.num_slots,
        "balancedness": None,
    }
    new = None
    if saved is None:
        why = f"the checkpoint has no {EXPERT_MAP_FILENAME}; keeping the current placement"
    elif config is not None and config.expert_map_path is not None:
        why = f"expert_map_path={config.expert_map_path!r} is given; the checkpoint's map is not used"
    elif (saved.num_layers, saved.num_experts) != (handle.num_layers, handle.num_experts):
        raise CheckpointError(
            f"the checkpoint's expert map has {saved.num_layers} MoE layers x {saved.num_experts} experts, the "
            f"model {handle.num_layers} x {handle.num_experts}; it was saved for another model"
        )
    elif (saved.num_ranks, saved.num_slots) == (handle.ep_size, handle.num_slots):
        new = saved
        info["action"] = "restored"
        why = f"resuming with the saved placement ({saved.num_slots} slots on EP={saved.num_ranks})"
    elif saved.expert_load is None or not np.any(saved.expert_load > 0):
        why = (
            f"the map was saved for EP={saved.num_ranks} with {saved.num_slots} slots per layer but records no "
            f"expert_load; keeping the default placement for EP={handle.ep_size} ({handle.num_slots} slots)"
        )
    else:
        from .policy import rebalance

        load = np.asarray(saved.expert_load, dtype=np.float64)
        policy = "auto" if config is None or config.eplb_policy == "low_churn" else config.eplb_policy
        nodes = (
            config.eplb_num_nodes if config is not None and handle.ep_size % config.eplb_num_nodes == 0 else 1
        )
        groups = config.eplb_num_groups if config is not None and nodes > 1 else 1
        planned = rebalance(
            load, handle.num_slots, handle.ep_size, num_nodes=nodes, num_groups=groups, policy=policy
        )
        before = balance_summary(handle.placement, load)["mean"]
        after = balance_summary(planned, load)["mean"]
        new = planned.with_load(load)
        info.update(action="replanned", balancedness=after, balancedness_default=before)
        why = (
            f"it was saved at EP={saved.num_ranks} with {saved.num_slots} slots per layer; re-planned for "
            f"EP={handle.ep_size} with {handle.num_slots} slots per layer from its recorded [L, E] load (policy "
            f"{policy}): predicted balancedness {after:.3f} (default placement {before:.3f}); every logical "
            "expert (weights and optimizer state) is restored from the logical checkpoint"
        )
    info["message"] = why
    return new, info


def _check_prefixes(layer_prefixes: Sequence[str], num_layers: int) -> None:
    if len(layer_prefixes) != num_layers:
        raise CheckpointError(
            f"{len(layer_prefixes)} layer prefixes given for a placement of {num_layers} MoE layers"
        )
