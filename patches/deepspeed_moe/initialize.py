"""``initialize``: ``deepspeed.initialize`` for a model with ``deepspeed.moe.layer.MoE`` layers, with EPLB.

It checks the ds_config as the Megatron-core path does (ZeRO 0, 1 and 2, each with and without redundant
slots; fp16 refused; bf16 with DeepSpeed's bf16 gradient accumulation), creates DeepSpeed's expert groups as
the engine would (EP and expert-DP, with the ds_config's ``use_data_before_expert_parallelism``), patches the
model (:func:`.apply.apply`; with ``eplb=False`` it only attaches a read-only handle), builds the engine, the
manager with :class:`megatron_eplb.patches.deepspeed.DeepSpeedSlotState`, and installs the engine hooks of
``patches/deepspeed/engine.py`` (replica-gradient sum before DeepSpeed reduces — under ZeRO 2 the experts'
gradients held back in DeepSpeed's backward hook until then, on every micro-step —, logical clipping,
``manager.step()`` after applied steps) and the checkpoint hooks of :mod:`.checkpoint`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from megatron_eplb.config import EPLBConfig
from megatron_eplb.errors import DeepSpeedEPLBError
from megatron_eplb.placement import ExpertPlacement

from .apply import apply, attach, find_moe_layers

__all__ = ["SUPPORTED_ZERO_STAGES", "initialize"]

log = logging.getLogger("megatron_eplb")

USE_DATA_BEFORE_EXPERT_PARALLEL = "use_data_before_expert_parallelism"  # DeepSpeed's ds_config key


SUPPORTED_ZERO_STAGES = (0, 1, 2)
"""ZeRO stages of this path, each with and without redundant slots (checked by
:func:`megatron_eplb.patches.deepspeed.check_ds_config`, the Megatron-core path's check).  Under stage 2 the
expert gradients are held back in DeepSpeed's backward hook until the copies of a replicated expert have
summed theirs (:func:`megatron_eplb.patches.deepspeed.engine.hold_back_reductions`).  Stage 3 is refused:
DeepSpeed's MoE layer does not support it, and it partitions the expert weights a slot transfer moves."""


def initialize(
    model: torch.nn.Module | None = None,
    config: dict | str | os.PathLike | None = None,
    eplb: EPLBConfig | dict | None | bool = None,
    args: Any = None,
    *,
    handle: Any = None,
    placement: ExpertPlacement | None = None,
    monitor: Any = None,
    policy_fn: Any = None,
    model_parameters: Any = None,
    **kwargs: Any,
):
    """``deepspeed.initialize`` for a model with DeepSpeed ``MoE`` layers, with EPLB.

    Args:
        model: a module with ``deepspeed.moe.layer.MoE`` layers, not yet wrapped by DeepSpeed; the process
            group initialised (``deepspeed.init_distributed()``).
        config: the ds_config (dict or JSON path; default ``args.deepspeed_config``); its ``"eplb"`` section
            is one EPLB config source.
        eplb: an :class:`EPLBConfig`, a dict of keys (over the ds_config section), ``None`` (every source
            from ``args``), or ``False``: no EPLB (the model is not changed; a read-only handle is attached:
            it records loads and drops, and the logical checkpoint functions and the checkpoint hooks work).

    Gradient clipping (``gradient_clipping``) is by the norm of the logical model's gradient (each logical
    expert once, summed over the EP group), with and without EPLB: DeepSpeed's own clipping would average
    the ranks' local norms, which counts a replicated expert once per copy.
        args: argparse namespace (``--deepspeed_config`` and the EPLB flags).
        handle: the handle of an earlier :func:`.apply.apply` (Megatron-DeepSpeed builds its optimizer before
            ``deepspeed.initialize``: call ``apply`` on the model first, then build the optimizer, then pass
            both here); else ``apply`` is called here.
        placement: the start placement (default from ``eplb``).
        monitor, policy_fn: for the manager.
        model_parameters, **kwargs: as for ``deepspeed.initialize``.
    Returns:
        ``(engine, optimizer, dataloader, lr_scheduler, manager)``; ``manager`` is None with ``eplb=False``.
        ``engine.eplb_handle`` is the :class:`~.handle.DeepSpeedMoEEPLB`.
    """
    import deepspeed
    from deepspeed.runtime.pipe.module import PipelineModule
    from megatron_eplb.patches.deepspeed.engine import disable_ds_clipping, install_hooks
    from megatron_eplb.patches.deepspeed.groups import dense_dp_group
    from megatron_eplb.patches.deepspeed.initialize import (
        _load_ds_config,
        _resolve_eplb,
        _to_accelerator,
        check_ds_config,
    )
    from megatron_eplb.patches.deepspeed.optimizer_state import DeepSpeedSlotState

    from megatron_eplb.manager import EPLBManager

    from .checkpoint import install_checkpoint_hooks

    if model is None:
        raise DeepSpeedEPLBError("initialize() needs model=")
    if not dist.is_initialized():
        raise DeepSpeedEPLBError("call deepspeed.init_distributed() before initialize()")
    ds_config = _load_ds_config(config, args)
    eplb_config = _resolve_eplb(eplb, ds_config, args)
    ds_config.pop("eplb", None)  # DeepSpeed accepts it, but it is ours
    if isinstance(model, PipelineModule):
        raise DeepSpeedEPLBError("a PipelineModule (pipeline parallel) is not supported; supported: PP = 1")
    mpu = kwargs.get("mpu")
    if mpu is not None and mpu.get_tensor_model_parallel_world_size() > 1:
        raise DeepSpeedEPLBError("tensor parallel size > 1 is not supported; supported: TP = 1")
    layers = find_moe_layers(model)
    if not layers:
        raise DeepSpeedEPLBError(f"{type(model).__name__} has no deepspeed.moe.layer.MoE; nothing to balance")
    first = layers[0][1]
    if eplb_config is not None:
        eplb_config.validate_for(len(layers), first.num_experts, first.ep_size)
    if handle is not None:
        placement = handle.placement
    check_ds_config(ds_config)  # ZeRO stage, fp16, bf16 accumulation: the Megatron-core path's rules
    before = bool(ds_config.get(USE_DATA_BEFORE_EXPERT_PARALLEL, False))
    _to_accelerator(model)
    if handle is not None:
        if eplb_config is None or not handle.patched:
            raise DeepSpeedEPLBError("handle= is an apply() handle for EPLB; with eplb=False pass no handle")
    elif eplb_config is not None:
        handle = apply(model, placement, eplb_config, use_data_before_expert_parallel=before)
    else:
        handle = attach(model, use_data_before_expert_parallel=before)
    if model_parameters is None and kwargs.get("optimizer") is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, dataloader, lr_scheduler = deepspeed.initialize(
        model=model, config=ds_config, model_parameters=model_parameters, args=None, **kwargs
    )
    clip = disable_ds_clipping(engine)  # clipped by the logical norm instead (with and without EPLB alike)
    manager = None
    if eplb_config is not None:
        manager = EPLBManager(
            handle,
            eplb_config,
            optimizer_state=DeepSpeedSlotState(engine),
            load_group=dense_dp_group(),
            monitor=monitor,
            policy_fn=policy_fn,
        )
    # ZeRO 2 reduce-scatters expert gradients inside backward: held back until the replica sum (the Megatron
    # path's hooks; held with and without EPLB alike, so both reduce in the same order)
    experts = [p for _, layer in layers for p in layer.deepspeed_moe.experts.parameters()]
    install_hooks(engine, manager, handle, model, clip, handle.ep_group, [], expert_params=experts)
    install_checkpoint_hooks(engine, manager, handle)
    if dist.get_rank() == 0:
        log.info(
            "megatron-eplb: DeepSpeed engine with %d deepspeed.moe layers x %d experts, EP=%d, ZeRO %d, EPLB %s",
            handle.num_layers,
            handle.num_experts,
            handle.ep_size,
            engine.zero_optimization_stage(),
            "off" if eplb_config is None else eplb_config.to_json(),
        )
    return engine, optimizer, dataloader, lr_scheduler, manager
