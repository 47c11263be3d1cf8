"""A manager's checkpoint and record map: what a manager adds to a logical checkpoint (its window's ``[L, E]``
load and its step, :func:`manager_entries`; :func:`resume_manager`), its save and load
(:func:`save_manager_checkpoint`, :func:`load_manager_checkpoint`, over :mod:`megatron_eplb.checkpoint`) and
the map it records (:func:`record_map`, :func:`write_record_map`: ``expert_map_record_path``, rank 0).
No Megatron, no DeepSpeed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from .checkpoint import load_logical_checkpoint, save_logical_checkpoint
from .pipeline import global_placement
from .placement import ExpertPlacement

if TYPE_CHECKING:
    from .manager import EPLBManager

__all__ = [
    "load_manager_checkpoint",
    "manager_entries",
    "record_map",
    "resume_manager",
    "save_manager_checkpoint",
    "write_record_map",
]

log = logging.getLogger("megatron_eplb")


def manager_entries(manager: EPLBManager | None) -> dict[str, Any]:
    """A manager's keywords of :func:`save_logical_checkpoint`: ``expert_load``, the ``[L, E]`` load the map
    records (a resume at another EP size plans from it: the manager's window summed over every rank that
    routes tokens, else the placement's own), and ``eplb_step_count``; both None without a manager.
    Collective over the manager's ``load_group``."""
    if manager is None:
        return {"expert_load": None, "eplb_step_count": None}
    window, _ = manager.gather_window()
    load = window if window.sum() > 0 else manager.handle.placement.expert_load
    return {"expert_load": load, "eplb_step_count": manager.step_count}


def resume_manager(manager: EPLBManager | None, meta: Mapping[str, Any]) -> None:
    """Continue ``manager``'s step count from a loaded payload's ``eplb_step_count`` (nothing without a
    manager or a saved count)."""
    if manager is not None and meta.get("eplb_step_count") is not None:
        manager.resume_at(int(meta["eplb_step_count"]))


def save_manager_checkpoint(
    manager: EPLBManager,
    directory: str | os.PathLike,
    extra: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """:func:`save_logical_checkpoint` of a manager's model and optimizer slots to ``directory``: the model
    with each logical expert once, the optimizer state by logical parameter name, the optimizer's step count
    and the manager's step, plus ``extra``, with checksums and the model's shape facts, and ``expert_map.json``
    (the placement with :func:`manager_entries`' ``[L, E]`` load), written all or nothing.  A checkpoint
    already in ``directory`` is replaced only with ``overwrite=True`` (else :class:`CheckpointError`, nothing
    written).  Any placement or EP size loads it (:func:`load_manager_checkpoint`).  Collective over every
    rank; rank 0 writes."""
    return save_logical_checkpoint(
        directory,
        manager.handle,
        manager.optimizer_state,
        extra=extra,
        overwrite=overwrite,
        **manager_entries(manager),
    )


def load_manager_checkpoint(manager: EPLBManager, directory: str | os.PathLike, strict: bool = True) -> dict:
    """Load :func:`save_manager_checkpoint`'s ``directory`` into a manager's model and optimizer slots,
    whatever the current placement or EP size (:func:`load_logical_checkpoint`: the placement to resume with,
    then every slot from its logical expert, Adam state and step count included); the manager continues
    counting from the saved step (:func:`resume_manager`).  Collective over every rank.  Returns the
    payload's metadata and ``placement``."""
    meta = load_logical_checkpoint(
        directory, manager.handle, slots=manager.optimizer_state, config=manager.config, strict=strict
    )
    resume_manager(manager, meta)
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.info(
            "EPLB: resumed from %s at step %d into %r",
            directory,
            manager.step_count,
            manager.handle.placement,
        )
    return meta


def record_map(manager: EPLBManager) -> Path | None:
    """Write a manager's placement now (with PP the whole model's), with :func:`manager_entries`' ``[L, E]``
    load, to ``expert_map_record_path`` (the map a run ends or stops with).  Collective; rank 0 writes
    (atomically).  Returns the path, None without a record path."""
    path = manager.config.expert_map_record_path
    if not path:
        return None
    load = manager_entries(manager)["expert_load"]
    return write_record_map(path, global_placement(manager.handle.placement, manager.stage, load))


def write_record_map(path: str | os.PathLike | None, placement: ExpertPlacement) -> Path | None:
    """Write ``placement`` to ``path`` (``expert_map_record_path``; nothing without one) on rank 0,
    atomically.  Returns the path, None without one."""
    if not path:
        return None
    if not dist.is_initialized() or dist.get_rank() == 0:
        placement.to_json(path)
    return Path(path)
