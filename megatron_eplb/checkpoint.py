"""Physical ⇄ logical conversion of expert state dicts, and the expert map saved beside a checkpoint.

A checkpoint stays *logical*: each logical expert of each MoE layer once, under the key it has in a
model without EP (``SequentialMLP``: ``{layer_prefix}{expert}.{name}``, e.g. ``decoder.layers.1.mlp.experts.
local_experts.5.linear_fc1.weight``; ``GroupedMLP``: stacked over the experts in ``...experts.weight1``,
``weight2``: ``ExpertModel.logical_entries``), replicas not duplicated, and the placement it was saved with
in a JSON file next to it.  Any placement (other redundancy, other EP size) loads it: every physical slot is filled from its
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
        "model_facts": the model's shape facts (``handle.model_facts()``: hidden_size, num_experts, ...),
        "checksums": {path of every tensor in the payload: crc32, "<metadata>": crc32 of its scalars},
        "expert_map_sha256": the SHA-256 of expert_map.json's text,
        ... what the caller adds (DeepSpeed: "global_steps", "lr_scheduler");
    DIR/expert_map.json    the placement it was saved with and the [L, E] load recorded before the save.

A save is all or nothing (:func:`megatron_eplb.checkpoint_files.publish_directory`: a partial directory
beside ``DIR``, renamed into place) and never replaces an existing checkpoint unless asked
(``overwrite=True``).  A load checks everything before it changes anything: the file reads, every tensor
matches its checksum (checkpoints saved before checksums load unverified, with a log line), the model facts
and every tensor's shape fit the model; then it chooses the placement to resume with
(:func:`resume_placement`: the saved one, or a new plan for another EP size / slot count from the recorded
load) and fills every slot from its logical expert.

The conversion functions are pure over dicts of tensors; the save/load functions take the model handle
and the optimizer slots (:mod:`megatron_eplb.protocols`) and are collective over the expert-parallel
group; a manager's checkpoint calls them from :mod:`megatron_eplb.checkpoint_manager`.  This module owns the format, the weights and the map; the optimizer state's half (gathered by
logical parameter, checked, put back into any placement) is :mod:`megatron_eplb.checkpoint_optimizer`.
No Megatron, no DeepSpeed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint_files import (
    CHECKSUMS_KEY,
    FACTS_KEY,
    MAP_SHA256_KEY,
    describe_facts,
    facts_mismatch,
    payload_checksums,
    publish_directory,
    read_payload,
    sha256_text,
    verify_checksums,
)
from .checkpoint_layout import logical_to_physical, physical_to_logical, split_expert_key
from .checkpoint_optimizer import check_optimizer_state_fits, load_optimizer_state, logical_optimizer_state
from .errors import CheckpointError
from .pipeline import gather_over_stages, global_placement, stage_of, stage_placement
from .placement import ExpertPlacement

if TYPE_CHECKING:
    from .protocols import ExpertModel, OptimizerSlots

__all__ = [
    "CHECKPOINT_FILENAME",
    "CheckpointError",
    "check_state_fits",
    "EXPERT_MAP_FILENAME",
    "expert_map_path",
    "load_expert_map",
    "load_logical_checkpoint",
    "logical_optimizer_state",
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


def load_expert_map(
    checkpoint: str | os.PathLike, expected_sha256: str | None = None
) -> ExpertPlacement | None:
    """The placement saved beside ``checkpoint``, or ``None`` when there is none.

    ``expected_sha256``: the payload's ``expert_map_sha256`` (a map that is not the one saved with the
    payload, e.g. after a save interrupted while replacing a checkpoint, is a :class:`CheckpointError`)."""
    path = expert_map_path(checkpoint)
    if not path.is_file():
        return None
    text = path.read_text()
    if expected_sha256 is not None and sha256_text(text) != expected_sha256:
        raise CheckpointError(
            f"{path} is not the expert map saved with {CHECKPOINT_FILENAME} (its SHA-256 differs): it was changed "
            "after the save, or a save that replaced this checkpoint was interrupted; load another checkpoint "
            "(an earlier tag), or pass expert_map_path to start from a map of your choice"
        )
    return ExpertPlacement.from_json(text, allow_same_rank_copies=True, source=str(path))


# ============================================================================ the logical checkpoint


def save_logical_checkpoint(
    directory: str | os.PathLike,
    handle: ExpertModel | None,
    slots: OptimizerSlots | None = None,
    *,
    model: torch.nn.Module | None = None,
    expert_load: np.ndarray | None = None,
    eplb_step_count: int | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the logical checkpoint (format in this module's docstring) to ``directory``, all or nothing.

    Args:
        handle: the model's :class:`megatron_eplb.protocols.ExpertModel` (None: a model without EPLB).
        slots: the optimizer's :class:`~megatron_eplb.protocols.OptimizerSlots` (None: no optimizer state).
        expert_load: ``[L, E]`` load written into the map (a resume at another EP size plans from it);
            None keeps the placement's own.
        model: the (patched) model; default ``handle.model``.
        eplb_step_count: the manager's step; ``extra``: more entries for the payload (rank 0's are written).
        overwrite: replace a checkpoint already in ``directory`` (else that is an error and nothing is written).
    Returns:
        ``directory``.  Collective over every rank; rank 0 writes.
    Raises:
        CheckpointError: on every rank, when ``directory`` already holds a checkpoint (without ``overwrite``)
            or is not a directory (checked before anything is gathered), or when the write failed (the
            previous contents of ``directory`` are then unchanged).
    """
    directory = Path(directory)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    problem = _from_rank0(_save_target_problem(directory, overwrite) if rank0 else None)
    if problem:
        raise CheckpointError(problem)
    model = handle.model if model is None else model
    model_state = handle.logical_state_dict() if handle is not None else model.state_dict()
    optimizer = logical_optimizer_state(model, handle, slots) if slots is not None else {}
    stage = stage_of(handle)
    if stage is not None:  # PP: every stage's part under the whole model's names, gathered (rank 0 writes)
        parts = gather_over_stages(
            (handle.state_to_global(_to_cpu(model_state)), handle.state_to_global(optimizer)), stage
        )
        model_state = {k: v for state, _ in parts for k, v in state.items()}
        optimizer = {k: v for _, opt in parts for k, v in opt.items()}
    placement = None
    if handle is not None:  # the whole model's map (PP: every stage's rows; collective over the stages)
        placement = global_placement(handle.placement, stage, expert_load)
    error = None
    if rank0:
        files: dict[str, Any] = {}
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in model_state.items()},
            "optimizer": optimizer,
            "optimizer_step": slots.optimizer_step() if slots is not None else 0,
            "eplb_step_count": eplb_step_count,
            FACTS_KEY: _model_facts(handle),
            **dict(extra or {}),
        }
        if placement is not None:
            files[EXPERT_MAP_FILENAME] = placement.to_json()
            payload[MAP_SHA256_KEY] = sha256_text(files[EXPERT_MAP_FILENAME])
        payload[CHECKSUMS_KEY] = payload_checksums(payload)
        try:
            publish_directory(directory, {CHECKPOINT_FILENAME: payload, **files})
        except OSError as exc:
            error = (
                f"could not write the checkpoint {str(directory)!r} ({type(exc).__name__}: {exc}); nothing was "
                "replaced: a checkpoint already there is unchanged"
            )
    error = _from_rank0(error)
    if error:
        raise CheckpointError(error)
    return directory


def _to_cpu(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}


def _save_target_problem(directory: Path, overwrite: bool) -> str | None:
    """Why ``directory`` cannot take a checkpoint now, or None."""
    if directory.exists() and not directory.is_dir():
        return f"cannot save a checkpoint to {str(directory)!r}: it exists and is not a directory"
    for parent in directory.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"cannot save a checkpoint to {str(directory)!r}: {str(parent)!r} is not a directory"
            break
    if not overwrite and (directory / CHECKPOINT_FILENAME).exists():
        return (
            f"{str(directory)!r} already holds a checkpoint ({CHECKPOINT_FILENAME}); nothing was written: save "
            "under another directory or tag, or pass overwrite=True to replace it"
        )
    return None


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (collective over the world; the value itself without a group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _model_facts(handle: Any) -> dict[str, Any]:
    """The model's shape facts (``handle.model_facts()`` where the handle has them), else the MoE counts."""
    if handle is None:
        return {}
    facts = getattr(handle, "model_facts", None)
    if callable(facts):
        return dict(facts())
    return {"num_moe_layers": handle.num_layers, "num_experts": handle.num_experts}


def read_logical_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """The payload of :func:`save_logical_checkpoint` in ``directory`` (on the CPU), its checksums verified.
    Local.

    Raises:
        FileNotFoundError: ``directory`` holds no ``model_logical.pt``.
        CheckpointError: the file is empty, truncated or corrupt (a tensor fails its checksum: the message
            names the file and the tensor), or it is not a logical checkpoint this version reads.
    """
    path = Path(directory) / CHECKPOINT_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no logical checkpoint in {str(directory)!r} (expected {path.name} there)")
    payload = read_payload(path)
    if (
        not isinstance(payload, dict)
        or payload.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT
        or payload.get("version", 1) > CHECKPOINT_VERSION
        or not isinstance(payload.get("model"), dict)
    ):
        what = (
            f"format {payload.get('format')!r} version {payload.get('version')}"
            if isinstance(payload, dict)
            else f"a {type(payload).__name__}"
        )
        raise CheckpointError(
            f"{path}: {what} is not a megatron-eplb logical checkpoint this version reads "
            f"({CHECKPOINT_FORMAT!r} <= {CHECKPOINT_VERSION})"
        )
    if verify_checksums(payload, path):
        log.debug("megatron-eplb: %s: every tensor matches its checksum", path)
    return payload


def check_state_fits(
    state: Mapping[str, Any],
    model: torch.nn.Module,
    *,
    source: str,
    saved_facts: Mapping[str, Any] | None = None,
    facts: Mapping[str, Any] | None = None,
    strict: bool = False,
) -> None:
    """Check that the (physical, this rank's) ``state`` loads into ``model`` before anything is loaded.

    Args:
        source: the checkpoint, for the message.
        saved_facts: the shape facts the checkpoint records (its ``model_facts``); ``facts``: the model's.
        strict: keys the model has and ``state`` lacks (or the other way round) are errors too.
    Raises:
        CheckpointError: the facts differ ("the checkpoint was trained with hidden_size=64 ...; this model has
            ..."), a tensor's shape differs, or (``strict``) keys are missing or unexpected.
    """
    mismatch = facts_mismatch(saved_facts, facts)
    if mismatch:
        raise CheckpointError(f"{source}: {mismatch}")
    own = model.state_dict()
    shapes = [
        (k, list(v.shape), list(own[k].shape))
        for k, v in state.items()
        if torch.is_tensor(v) and torch.is_tensor(own.get(k)) and v.shape != own[k].shape
    ]
    trained = (
        f"the checkpoint was trained with {describe_facts(saved_facts)}"
        if saved_facts
        else "the checkpoint records no model facts (saved by a megatron-eplb before they were stored)"
    )
    if shapes:
        key, saved, mine = shapes[0]
        more = f" (and {len(shapes) - 1} more)" if len(shapes) > 1 else ""
        raise CheckpointError(
            f"{source}: tensor {key!r} has shape {saved} in the checkpoint but {mine} in this model{more}; "
            f"{trained}: build the model with the checkpoint's settings"
        )
    if strict:
        missing = [k for k in own if k not in state and not k.endswith("_extra_state")]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            first = (
                f"the model's {missing[0]!r} is missing"
                if missing
                else f"{unexpected[0]!r} is not in the model"
            )
            raise CheckpointError(
                f"{source}: {len(missing)} of the model's keys are missing from the checkpoint and "
                f"{len(unexpected)} of its keys are not in the model ({first}); {trained}"
            )


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

    First everything is checked, on every rank, and the ranks agree (a rank that cannot read the file stops
    them all): the file reads and its checksums match (:func:`read_logical_checkpoint`), the expert map is
    the one saved with it, the model facts and every tensor fit the model (:func:`check_state_fits`), the
    optimizer state fits the parameters.  Only then the placement to resume with (:func:`resume_placement`,
    logged on rank 0; ``handle.set_placement`` when it changes) and every slot from its logical expert:
    weights, and with ``slots`` the optimizer state (an fp32 master where the layout keeps one, from the saved
    master or else the saved weight) and the optimizer's step count.  Collective over every rank.

    Returns:
        the payload without ``model`` and ``optimizer``, plus ``placement``: :func:`resume_placement`'s
        info (None without a handle).
    Raises:
        CheckpointError (FileNotFoundError for a directory without a checkpoint): on every rank, before the
            model, the optimizer or the placement changed.
    """
    model = handle.model if model is None else model
    payload = placement = info = None
    failure: BaseException | None = None
    try:
        payload = read_logical_checkpoint(directory)
        if stage_of(handle) is not None:  # PP: this stage's part of the whole model's checkpoint
            payload = dict(payload)
            payload["model"] = handle.state_to_stage(payload["model"])
            payload["optimizer"] = handle.state_to_stage(payload.get("optimizer") or {})
        placement, info = _check_before_load(directory, payload, model, handle, slots, config, strict)
    except (CheckpointError, FileNotFoundError, OSError) as exc:
        failure = exc
    _agree(failure)
    model_state = payload["model"]
    if handle is not None:
        if placement is not None:
            handle.set_placement(placement)
        if not dist.is_initialized() or dist.get_rank() == 0:
            log.info("megatron-eplb: loading %s: %s", directory, info["message"])
        handle.load_logical_state_dict(model_state, strict=strict)
    else:
        model.load_state_dict(model_state, strict=strict)
    if slots is not None:
        load_optimizer_state(
            model, handle, slots, payload["optimizer"], model_state, int(payload.get("optimizer_step") or 0)
        )
    out = {k: v for k, v in payload.items() if k not in ("model", "optimizer", CHECKSUMS_KEY)}
    out["placement"] = info
    return out


def _check_before_load(directory, payload, model, handle, slots, config, strict):
    """Everything :func:`load_logical_checkpoint` checks before it changes anything (local); returns
    :func:`resume_placement`'s ``(placement or None, info)`` (``(None, None)`` without a handle)."""
    source = str(Path(directory) / CHECKPOINT_FILENAME)
    model_state = payload["model"]
    saved_facts = payload.get(FACTS_KEY)
    placement, info, phy2log = None, None, None
    if handle is not None:
        mismatch = facts_mismatch(saved_facts, _model_facts(handle))
        if mismatch:
            raise CheckpointError(f"{source}: {mismatch}")
        uses_saved_map = config is None or config.expert_map_path is None
        saved_map = load_expert_map(directory, payload.get(MAP_SHA256_KEY) if uses_saved_map else None)
        if saved_map is not None:  # PP: this stage's rows of the whole model's map
            saved_map = stage_placement(saved_map, stage_of(handle))
        placement, info = resume_placement(saved_map, handle, config)
        phy2log = (placement or handle.placement).phy2log
        physical = handle.physical_state_dict(
            model_state, phy2log
        )  # as it will load once the placement is set
    else:
        physical = model_state
    check_state_fits(physical, model, source=source, saved_facts=saved_facts, strict=strict)
    if slots is not None:
        check_optimizer_state_fits(payload["optimizer"], model, handle, source=source)
    return placement, info


def _agree(failure: BaseException | None) -> None:
    """Raise on every rank when any rank failed (its own error where it failed; elsewhere a
    :class:`CheckpointError` naming the first failed rank and its message).  Collective over the world."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if failure is not None:
            raise failure
        return
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, None if failure is None else str(failure))
    if failure is not None:
        raise failure
    for rank, message in enumerate(every):
        if message is not None:
            raise CheckpointError(f"rank {rank} cannot load the checkpoint: {message}")


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
