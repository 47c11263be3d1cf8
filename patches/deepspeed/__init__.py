"""DeepSpeed engine wiring for placement-aware Megatron-core MoE models.

Usage (instead of ``deepspeed.initialize``)::

    from megatron_eplb.patches import deepspeed as eplb_ds

    engine, optimizer, _, lr_scheduler, manager = eplb_ds.initialize(
        model=model, config="configs/ds_config.json", eplb=eplb_config, args=args
    )
    loss = engine(batch); engine.backward(loss); engine.step()   # EPLB runs inside engine.step()
    eplb_ds.save_checkpoint(engine, manager, "ckpt")  # ckpt/iter_0000040 (by step), then ckpt/latest

One file per job:

* :mod:`.groups` — DeepSpeed's expert groups made from Megatron's (the only writes into DeepSpeed's private
  group dicts), expert parameters tagged with their group;
* :mod:`.optimizer_state` — :class:`DeepSpeedSlotState`, the per-slot optimizer tensors (fp32 masters, Adam
  moments) of the optimizers DeepSpeed builds at ZeRO 0, 1 and 2, the core's ``OptimizerSlots`` interface;
* :mod:`.engine` — the engine hooks: replica-gradient sum before DeepSpeed reduces, logical clipping,
  ``manager.step()`` after applied steps, Megatron's expert-bias update;
* :mod:`.initialize` — :func:`initialize` and the ds_config checks;
* :mod:`.checkpoint` — :func:`save_checkpoint` / :func:`load_checkpoint`: the core's logical checkpoint
  plus DeepSpeed's engine steps and lr scheduler.

Supported: ZeRO stage 0, 1 and 2, fp32 and bf16 (bf16 gradient accumulation, DeepSpeed's default; masters
and Adam moments fp32), gradient accumulation, TP >= 1 with sequence parallelism and expert TP = 1, PP = 1.  Every import of ``deepspeed`` in this package
is the real DeepSpeed (absolute imports).
"""

from __future__ import annotations

from .checkpoint import checkpoint_tags, load_checkpoint, resolve_tag, save_checkpoint, step_tag
from .engine import logical_grad_norm
from .errors import DeepSpeedEPLBError
from .groups import expert_group_name
from .initialize import SUPPORTED_ZERO_STAGES, check_ds_config, initialize
from .optimizer_state import DeepSpeedSlotState

_check_ds_config = check_ds_config  # the name tests and older callers use

__all__ = [
    "DeepSpeedEPLBError",
    "DeepSpeedSlotState",
    "SUPPORTED_ZERO_STAGES",
    "check_ds_config",
    "checkpoint_tags",
    "expert_group_name",
    "initialize",
    "load_checkpoint",
    "logical_grad_norm",
    "resolve_tag",
    "save_checkpoint",
    "step_tag",
]
