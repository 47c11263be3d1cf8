"""Logical checkpoints of a DeepSpeed engine: :func:`save_checkpoint` / :func:`load_checkpoint`.

The checkpoint is the core's one logical format (:func:`megatron_eplb.checkpoint.save_logical_checkpoint`:
every logical expert once with its optimizer state, optimizer state by logical parameter name, the
expert map with its recorded ``[L, E]`` load, the step counts, checksums, the model's shape facts); DeepSpeed
adds only what it needs: the engine's ``global_steps`` and the lr scheduler's state, and the directory layout
of Megatron and DeepSpeed: ``save_dir/iter_0000040/`` (tag by step), ``save_dir/latest`` holding the tag of
the last complete save (written after the tag, atomically).  An existing tag is replaced only with
``overwrite=True``.  A resume at another EP size (e.g. one GPU lost) re-plans the placement with the core's
:func:`megatron_eplb.checkpoint.resume_placement`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from megatron_eplb.checkpoint import (
    CHECKPOINT_FILENAME,
    load_logical_checkpoint,
    save_logical_checkpoint,
)
from megatron_eplb.checkpoint_files import atomic_write_text
from megatron_eplb.checkpoint_manager import manager_entries, resume_manager
from megatron_eplb.errors import CheckpointError

from .errors import DeepSpeedEPLBError
from .optimizer_state import DeepSpeedSlotState

__all__ = [
    "LATEST_FILENAME",
    "checkpoint_tags",
    "load_checkpoint",
    "resolve_tag",
    "save_checkpoint",
    "step_tag",
]

LATEST_FILENAME = "latest"


def step_tag(step: int) -> str:
    """The tag of a checkpoint saved after ``step`` steps: ``iter_0000040`` (Megatron's name)."""
    return f"iter_{int(step):07d}"


def checkpoint_tags(save_dir: str | os.PathLike) -> list[str]:
    """The tags under ``save_dir`` that hold a checkpoint, sorted (``iter_`` tags by step)."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    return sorted(
        (
            p.name
            for p in root.iterdir()
            if not p.name.startswith(".") and (p / CHECKPOINT_FILENAME).is_file()
        ),
        key=lambda t: (0, int(t[5:]), t) if t.startswith("iter_") and t[5:].isdigit() else (1, 0, t),
    )


def resolve_tag(load_dir: str | os.PathLike, tag: str | None = None) -> str:
    """The tag to load from ``load_dir``: ``tag``, else the one in ``load_dir/latest``.

    Raises:
        CheckpointError: ``load_dir`` does not exist, the tag (given or in ``latest``) holds no checkpoint,
            or there is no ``latest`` (the message lists the tags there, or says ``load_dir`` is itself a tag).
    """
    load_dir = Path(load_dir)
    if not load_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {str(load_dir)!r} does not exist")
    tags = checkpoint_tags(load_dir)
    listing = f"tags there: {', '.join(tags)}" if tags else "it holds no checkpoint tag"
    if tag is None:
        latest = load_dir / LATEST_FILENAME
        if not latest.is_file():
            if (load_dir / CHECKPOINT_FILENAME).is_file():
                raise CheckpointError(
                    f"{str(load_dir)!r} is a checkpoint tag itself, not a save directory: load "
                    f"{str(load_dir.parent)!r} with tag {load_dir.name!r} (examples/train.py and generate.py: "
                    f"--load {load_dir.parent} --tag {load_dir.name})"
                )
            raise CheckpointError(
                f"{str(load_dir)!r} has no {LATEST_FILENAME!r} file ({listing}); choose one with --tag "
                "(examples/train.py, generate.py) or tag= (load_checkpoint)"
            )
        tag = latest.read_text().strip()
        where = f"{latest} names tag {tag!r}"
    else:
        where = f"tag {tag!r}"
    if not tag or tag not in tags:
        raise CheckpointError(f"{str(load_dir)!r}: {where}, which holds no checkpoint ({listing})")
    return tag


def save_checkpoint(
    engine,
    manager,
    save_dir: str | os.PathLike,
    tag: str | None = None,
    *,
    overwrite: bool = False,
    extra: dict | None = None,
) -> Path:
    """Save a logical checkpoint of ``engine`` to ``save_dir/tag`` (default tag ``iter_<global steps>``, 7
    digits) and then write the tag to ``save_dir/latest`` (atomically).  ``extra``: more payload entries
    (e.g. the training loop's iteration and data position; :func:`load_checkpoint` returns them).
    Collective over all ranks; rank 0 writes.  Returns the directory.

    Raises:
        CheckpointError: on every rank, with nothing written, when the tag already holds a checkpoint and
            ``overwrite`` is False, or when the write failed (the previous tag and ``latest`` are unchanged).
    """
    handle = engine.eplb_handle if manager is None else manager.handle
    if handle is None:
        raise DeepSpeedEPLBError("save_checkpoint needs an EPLB engine (initialize(eplb=...) not False)")
    tag = step_tag(engine.global_steps) if tag is None else str(tag)
    if not tag or tag.startswith(".") or "/" in tag or os.sep in tag or tag == LATEST_FILENAME:
        raise CheckpointError(
            f"checkpoint tag {tag!r} must be a plain directory name (e.g. {step_tag(40)!r})"
        )
    out = Path(save_dir) / tag
    extra = {
        **dict(extra or {}),
        "global_steps": engine.global_steps,
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
    }
    save_logical_checkpoint(
        out,
        handle,
        DeepSpeedSlotState(engine),
        model=engine.module,
        **manager_entries(manager),
        extra=extra,
        overwrite=overwrite,
    )
    error = None
    if dist.get_rank() == 0:
        try:
            atomic_write_text(Path(save_dir) / LATEST_FILENAME, tag + "\n")
        except OSError as exc:
            error = f"saved {out}, but could not write {Path(save_dir) / LATEST_FILENAME} ({exc})"
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise CheckpointError(box[0])
    return out


def load_checkpoint(engine, manager, load_dir: str | os.PathLike, tag: str | None = None) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (tag default: ``load_dir/latest``) into any
    placement / EP size, then the lr scheduler, ``engine.global_steps`` and the manager's step.

    Every rank reads the file; collective over every rank.  Everything is checked (the tag, the file, its
    checksums, the model facts and shapes) before the engine changes.  Returns the payload's metadata
    (``global_steps``, ``optimizer_step``, ...), ``tag`` and ``placement``: ``{"action": "restored" |
    "replanned" | "kept", "saved_ep_size", "ep_size", ...}`` (:func:`megatron_eplb.checkpoint.resume_placement`).
    """
    handle = engine.eplb_handle if manager is None else manager.handle
    load_dir = Path(load_dir)
    tag = resolve_tag(load_dir, tag)
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
    resume_manager(manager, meta)
    meta["tag"] = tag
    return meta
