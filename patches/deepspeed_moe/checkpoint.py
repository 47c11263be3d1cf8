"""Checkpoints of models with ``deepspeed.moe`` layers: the logical format, and DeepSpeed's own one.

Two ways, both lossless for the same model and both loadable by the model without EPLB:

* **The logical checkpoint** (:func:`save_checkpoint` / :func:`load_checkpoint`): the core's one format
  (``model_logical.pt``: every logical expert once, the optimizer state by logical parameter name, the step
  counts, DeepSpeed's ``global_steps`` and lr scheduler; ``expert_map.json`` beside it).  Any placement, any
  EP size, and the unpatched model (through :func:`~.apply.attach`, ``initialize(eplb=False)``) load it,
  optimizer state included.
* **``engine.save_checkpoint`` / ``engine.load_checkpoint``** (what Megatron-DeepSpeed calls), wrapped by
  :func:`install_checkpoint_hooks`.  The save writes DeepSpeed's checkpoint as usual, then rewrites the
  expert files in the logical layout (``layer_<l>_expert_<e>_...`` holds logical expert ``e``, as the model
  without EPLB writes it; no file per redundant slot), and adds ``<tag>/eplb/`` with the placement
  (``expert_map.json``) and the logical checkpoint.  The load re-places the model to the saved placement and
  reads each slot's weights from its logical expert's file, then DeepSpeed restores everything else
  (optimizer partitions, lr scheduler, steps, ``client_state``) exactly; a checkpoint saved for another EP
  size or slot count is loaded from ``<tag>/eplb/`` instead.  A checkpoint written without EPLB (no
  ``eplb/``) loads its weights into any placement; its optimizer state only where the layout is DeepSpeed's
  own (no redundant slots: the model is re-placed to it first).

A plain ``deepspeed.initialize`` model loads an EPLB model's ``engine.save_checkpoint`` weights (the expert
files are logical); its optimizer state needs the same slot count (no redundant slots), else pass
``load_optimizer_states=False`` or load through ``initialize(eplb=False)``, which reads ``<tag>/eplb/``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from megatron_eplb.checkpoint import (
    CHECKPOINT_FILENAME,
    load_expert_map,
    load_logical_checkpoint,
    save_logical_checkpoint,
)
from megatron_eplb.checkpoint_manager import manager_entries, resume_manager
from megatron_eplb.errors import CheckpointError
from megatron_eplb.placement import ExpertPlacement

__all__ = ["EPLB_DIRNAME", "install_checkpoint_hooks", "load_checkpoint", "save_checkpoint"]

log = logging.getLogger("megatron_eplb")

EPLB_DIRNAME = "eplb"
"""``<save_dir>/<tag>/eplb/``: the placement and the logical checkpoint beside DeepSpeed's files."""
LATEST_FILENAME = "latest"
_CLIENT_KEY = "megatron_eplb_step_count"  # the manager's step, carried in DeepSpeed's client_state


def save_checkpoint(engine, manager, save_dir: str | os.PathLike, tag: str | None = None) -> Path:
    """Save the logical checkpoint to ``save_dir/tag`` (default tag ``global_step<N>``) and write the tag
    to ``save_dir/latest``.  Collective; rank 0 writes.  Works with and without EPLB (``engine.eplb_handle``)."""
    from megatron_eplb.patches.deepspeed.checkpoint import save_checkpoint as save

    return save(engine, manager, save_dir, tag)


def load_checkpoint(
    engine,
    manager,
    load_dir: str | os.PathLike,
    tag: str | None = None,
    *,
    load_optimizer_states: bool = True,
    load_lr_scheduler_states: bool = True,
) -> dict:
    """Load a logical checkpoint (:func:`save_checkpoint`'s, or the ``eplb/`` part of an
    ``engine.save_checkpoint``) into ``engine``'s model under any placement or EP size; the model without
    EPLB keeps DeepSpeed's own layout.  Collective over the EP group.  Returns the payload's metadata and
    ``placement`` (:func:`megatron_eplb.checkpoint.resume_placement`'s info)."""
    from megatron_eplb.patches.deepspeed.optimizer_state import DeepSpeedSlotState

    handle = engine.eplb_handle
    directory = _logical_dir(Path(load_dir), tag)
    config = manager.config if manager is not None else None
    if not handle.patched:  # DeepSpeed's own layout cannot change: fill it, never re-plan it
        config = SimpleNamespace(expert_map_path="(DeepSpeed's own layout, no EPLB)")
    meta = load_logical_checkpoint(
        directory,
        handle,
        model=engine.module,
        slots=DeepSpeedSlotState(engine) if load_optimizer_states else None,
        config=config,
    )
    if load_lr_scheduler_states and engine.lr_scheduler is not None and meta.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    engine.global_steps = int(meta.get("global_steps") or 0)
    resume_manager(manager, meta)
    return meta


_load_logical = load_checkpoint  # the engine hook's name shadows it


def _logical_dir(load_dir: Path, tag: str | None) -> Path:
    """The directory holding ``model_logical.pt``: ``load_dir/tag`` or ``load_dir/tag/eplb``."""
    if tag is None:
        if (load_dir / CHECKPOINT_FILENAME).is_file() or (load_dir / EPLB_DIRNAME).is_dir():
            tag_dir = load_dir
        else:
            latest = load_dir / LATEST_FILENAME
            if not latest.is_file():
                raise FileNotFoundError(f"{load_dir}: no {LATEST_FILENAME!r} file; pass tag=")
            tag_dir = load_dir / latest.read_text().strip()
    else:
        tag_dir = load_dir / str(tag)
    for candidate in (tag_dir, tag_dir / EPLB_DIRNAME):
        if (candidate / CHECKPOINT_FILENAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"no logical checkpoint ({CHECKPOINT_FILENAME}) in {tag_dir} or {tag_dir / EPLB_DIRNAME}"
    )


# ============================================================================ engine.save/load_checkpoint


def install_checkpoint_hooks(engine, manager, handle) -> None:
    """Wrap ``engine.save_checkpoint`` / ``engine.load_checkpoint`` (this module's docstring)."""
    original_save = engine.save_checkpoint
    original_load = engine.load_checkpoint

    def save_checkpoint(save_dir, tag=None, client_state=None, save_latest=True, **kwargs):
        tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
        client_state = dict(client_state or {})
        if manager is not None:
            client_state[_CLIENT_KEY] = manager.step_count
        out = original_save(save_dir, tag=tag, client_state=client_state, save_latest=save_latest, **kwargs)
        if handle.patched:
            _write_logical_expert_files(engine, handle, Path(save_dir), tag)
        save_logical_checkpoint(
            Path(save_dir) / tag / EPLB_DIRNAME,
            handle,
            _slot_state(engine),
            model=engine.module,
            **manager_entries(manager),
            extra={
                "global_steps": engine.global_steps,
                "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
            },
        )
        return out

    def load_checkpoint(load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):  # fmt: skip
        load_dir = Path(load_dir)
        if tag is None:
            latest = load_dir / LATEST_FILENAME
            if not latest.is_file():
                log.warning("megatron-eplb: %s has no %r file; nothing loaded", load_dir, LATEST_FILENAME)
                return None, None
            tag = latest.read_text().strip()
        eplb_dir = load_dir / str(tag) / EPLB_DIRNAME
        saved = load_expert_map(eplb_dir) if eplb_dir.is_dir() else None
        fits = saved is not None and (saved.num_ranks, saved.num_slots) == (handle.ep_size, handle.num_slots)
        if saved is not None and not fits:
            _log0(
                "megatron-eplb: %s was saved with %d slots on EP=%d, this model has %d on EP=%d: loading its "
                "logical checkpoint (every logical expert, its optimizer state, the steps)",
                eplb_dir, saved.num_slots, saved.num_ranks, handle.num_slots, handle.ep_size,
            )  # fmt: skip
            meta = _load_logical(
                engine,
                manager,
                load_dir,
                tag,
                load_optimizer_states=load_optimizer_states,
                load_lr_scheduler_states=load_lr_scheduler_states,
            )
            return str(load_dir / str(tag)), meta
        target = saved
        if target is None:  # written without EPLB: DeepSpeed's own layout
            own = ExpertPlacement.default(handle.num_layers, handle.num_experts, handle.ep_size, 0)
            if handle.num_slots == handle.num_experts:
                target = own
            elif load_optimizer_states and not load_module_only:
                _log0(
                    "megatron-eplb: %s was written without EPLB (DeepSpeed's layout, %d experts); this model has "
                    "%d slots: its weights load into every slot, its optimizer state does not "
                    "(load_optimizer_states=False)",
                    load_dir / str(tag), handle.num_experts, handle.num_slots, level=logging.WARNING,
                )  # fmt: skip
                load_optimizer_states = False
        if target is not None and target != handle.placement:
            handle.set_placement(target)  # the slots DeepSpeed's optimizer files were saved for
        with _logical_expert_files(handle):
            out = original_load(
                str(load_dir), tag=tag, load_module_strict=load_module_strict,
                load_optimizer_states=load_optimizer_states, load_lr_scheduler_states=load_lr_scheduler_states,
                load_module_only=load_module_only, custom_load_fn=custom_load_fn,
            )  # fmt: skip
        client_state = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if isinstance(client_state, dict):
            step = client_state.pop(_CLIENT_KEY, None)
            if manager is not None and step is not None:
                manager.resume_at(int(step))
        return out

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


def _slot_state(engine):
    from megatron_eplb.patches.deepspeed.optimizer_state import DeepSpeedSlotState

    return DeepSpeedSlotState(engine)


def _log0(msg: str, *args: Any, level: int = logging.INFO) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.log(level, msg, *args)


def _expert_file(engine_cls, save_dir: Path, layer: int, expert: int, tag: str, mp_rank: int) -> str:
    return engine_cls._get_expert_ckpt_name(str(save_dir), layer, expert, tag, checkpoint_mp_rank=mp_rank)


def _write_logical_expert_files(engine, handle, save_dir: Path, tag: str) -> None:
    """Replace DeepSpeed's per-slot expert files ``layer_<l>_expert_<slot>_...`` by per-logical-expert
    files ``layer_<l>_expert_<e>_...`` (the layout the model without EPLB writes and reads).  Collective;
    rank 0 writes."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    dist.barrier()  # DeepSpeed's writers are done
    state = handle.logical_state_dict()
    mp_rank = engine.checkpoint_mp_rank if getattr(engine, "checkpoint_mp_rank", None) is not None else 0
    if dist.get_rank() == 0:
        prefixes = handle.expert_key_prefixes()
        for layer, prefix in enumerate(prefixes):
            for e in range(handle.num_experts):
                head = f"{prefix}{e}."
                part = {k: v.detach().cpu().clone() for k, v in state.items() if k.startswith(head)}
                torch.save(part, _expert_file(DeepSpeedEngine, save_dir, layer, e, tag, mp_rank))
            for slot in range(handle.num_experts, handle.num_slots):  # no file per redundant slot
                path = Path(_expert_file(DeepSpeedEngine, save_dir, layer, slot, tag, mp_rank))
                path.unlink(missing_ok=True)
    dist.barrier()


class _logical_expert_files:
    """While DeepSpeed loads: read each local slot's weights from its logical expert's file
    (``DeepSpeedEngine.load_moe_state_dict`` replaced for the duration)."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def __enter__(self):
        from deepspeed.runtime.engine import DeepSpeedEngine

        self._original = DeepSpeedEngine.__dict__["load_moe_state_dict"]
        handle = self.handle

        def load_moe_state_dict(checkpoint_path, tag, state_dict, old_moe_load, model=None, mpu=None,
                                num_experts=1, checkpoint_engine=None, autoep_layers=None, folding_spec=None,
                                checkpoint_mp_rank=None):  # fmt: skip
            if old_moe_load:
                raise CheckpointError(
                    f"{checkpoint_path}: DeepSpeed's legacy MoE checkpoint layout (expert_<e>_... files without "
                    "layer ids) is not supported with EPLB"
                )
            mp_rank = checkpoint_mp_rank if checkpoint_mp_rank is not None else 0
            prefixes = handle.expert_key_prefixes()
            for layer, prefix in enumerate(prefixes):
                row = handle.placement.phy2log[layer]
                for k, slot in enumerate(handle.local_slots()):
                    e = int(row[slot])
                    if e < 0:
                        continue
                    path = _expert_file(DeepSpeedEngine, Path(checkpoint_path), layer, e, tag, mp_rank)
                    if checkpoint_engine is not None:
                        part = checkpoint_engine.load(path, map_location=torch.device("cpu"))
                    else:
                        part = torch.load(path, map_location="cpu", weights_only=False)
                    for key, value in part.items():
                        state_dict[key.replace(f"{prefix}{e}.", f"{prefix}{k}.", 1)] = value

        DeepSpeedEngine.load_moe_state_dict = staticmethod(load_moe_state_dict)
        return self

    def __exit__(self, *exc) -> None:
        from deepspeed.runtime.engine import DeepSpeedEngine

        DeepSpeedEngine.load_moe_state_dict = self._original
