"""Logical checkpoints of a DeepSpeed engine: :func:`save_checkpoint` / :func:`load_checkpoint`.

The checkpoint is the core's one logical format (:func:`megatron_eplb.checkpoint.save_logical_checkpoint`:
every logical expert once with its optimizer state, optimizer state by logical parameter name, the
expert map with its recorded ``[L, E]`` load, the step counts); DeepSpeed adds only what it needs: the
engine's ``global_steps`` and the lr scheduler's state, and DeepSpeed's directory layout
``save_dir/tag/`` with ``save_dir/latest`` holding the tag.  A resume at another EP size (e.g. one GPU
lost) re-plans the placement with the core's :func:`megatron_eplb.checkpoint.resume_placement`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from megatron_eplb.checkpoint import load_logical_checkpoint, save_logical_checkpoint

from .errors import DeepSpeedEPLBError
from .optimizer_state import DeepSpeedSlotState

__all__ = ["load_checkpoint", "save_checkpoint"]

LATEST_FILENAME = "latest"


def save_checkpoint(engine, manager, save_dir: str | os.PathLike, tag: str | None = None) -> Path:
    """Save a logical checkpoint of ``engine`` to ``save_dir/tag`` (default tag ``global_step<N>``) and
    write the tag to ``save_dir/latest``.  Collective over all ranks; rank 0 writes.  Returns the directory.
    """
    handle = engine.eplb_handle if manager is None else manager.handle
    if handle is None:
        raise DeepSpeedEPLBError("save_checkpoint needs an EPLB engine (initialize(eplb=...) not False)")
    tag = tag or f"global_step{engine.global_steps}"
    out = Path(save_dir) / tag
    extra = {
        "global_steps": engine.global_steps,
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
    }
    save_logical_checkpoint(
        out,
        handle,
        DeepSpeedSlotState(engine),
        model=engine.module,
        expert_load=manager.checkpoint_load() if manager is not None else None,
        eplb_step_count=manager.step_count if manager is not None else None,
        extra=extra,
    )
    if dist.get_rank() == 0:
        (Path(save_dir) / LATEST_FILENAME).write_text(tag)
    dist.barrier()
    return out


def load_checkpoint(engine, manager, load_dir: str | os.PathLike, tag: str | None = None) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (tag default: ``load_dir/latest``) into any
    placement / EP size, then the lr scheduler, ``engine.global_steps`` and the manager's step.

    Every rank reads the file; collective over the EP group.  Returns the payload's metadata
    (``global_steps``, ``optimizer_step``, ...) and ``placement``: ``{"action": "restored" | "replanned" |
    "kept", "saved_ep_size", "ep_size", ...}`` (:func:`megatron_eplb.checkpoint.resume_placement`).
    """
    handle = engine.eplb_handle if manager is None else manager.handle
    load_dir = Path(load_dir)
    if tag is None:
        latest = load_dir / LATEST_FILENAME
        if not latest.is_file():
            raise FileNotFoundError(f"{load_dir}: no {LATEST_FILENAME!r} file; pass tag=")
        tag = latest.read_text().strip()
    meta = load_logical_checkpoint(
        load_dir / tag,
        handle,
        slots=DeepSpeedSlotState(engine),
        model=engine.module,
        config=manager.config if manager is not None else None,
        strict=False,
    )
    if engine.lr_scheduler is not None and meta.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    engine.global_steps = meta.get("global_steps", 0)
    if manager is not None and meta.get("eplb_step_count") is not None:
        manager.resume_at(meta["eplb_step_count"])
    return meta
