"""``initialize``: ``deepspeed.initialize`` for a model with ``deepspeed.moe.layer.MoE`` layers, with EPLB.

It checks the ds_config (the same checks as the Megatron-core path: ZeRO stages, fp16 refused, bf16
gradient accumulation), creates DeepSpeed's expert groups as the engine would (EP and expert-DP, with the
ds_config's ``use_data_before_expert_parallelism``), patches the model (:func:`.apply.apply`; with
``eplb=False`` it only attaches a read-only handle), builds the engine, the manager with
:class:`megatron_eplb.patches.deepspeed.DeepSpeedSlotState`, and installs the engine hooks of
``patches/deepspeed/engine.py`` (replica-gradient sum before DeepSpeed reduces, logical clipping,
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


def _supported_stages() -> tuple[int, ...]:
    from megatron_eplb.patches.deepspeed.initialize import SUPPORTED_ZERO_STAGES

    return tuple(SUPPORTED_ZERO_STAGES)


SUPPORTED_ZERO_STAGES = _supported_stages()


def initialize(
    model: torch.nn.Module | None = None,
    config: dict | str | os.PathLike | None = None,
    eplb: EPLBConfig | dict | None | bool = None,
    args: Any = None,
    *,
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
            from ``args``), or ``False``: no EPLB (the model is not changed; a read-only handle is attached
            so that the logical checkpoint functions and the checkpoint hooks work).
        args: argparse namespace (``--deepspeed_config`` and the EPLB flags).
        placement: the start placement (default from ``eplb``).
        monitor, policy_fn: for the manager.
        model_parameters, **kwargs: as for ``deepspeed.initialize``.
    Returns:
        ``(engine, optimizer, dataloader, lr_scheduler, manager)``; ``manager`` is None with ``eplb=False``.
        ``engine.eplb_handle`` is the :class:`~.handle.DeepSpeedMoEEPLB`.
    """
    import deepspeed
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
    check_ds_config(ds_config)
    eplb_config = _resolve_eplb(eplb, ds_config, args)
    ds_config.pop("eplb", None)  # DeepSpeed accepts it, but it is ours
    layers = find_moe_layers(model)
    if not layers:
        raise DeepSpeedEPLBError(f"{type(model).__name__} has no deepspeed.moe.layer.MoE; nothing to balance")
    before = bool(ds_config.get(USE_DATA_BEFORE_EXPERT_PARALLEL, False))
    _to_accelerator(model)
    if eplb_config is not None:
        first = layers[0][1]
        eplb_config.validate_for(len(layers), first.num_experts, first.ep_size)
        handle = apply(model, placement, eplb_config, use_data_before_expert_parallel=before)
    else:
        handle = attach(model, use_data_before_expert_parallel=before)
    if model_parameters is None and kwargs.get("optimizer") is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, dataloader, lr_scheduler = deepspeed.initialize(
        model=model, config=ds_config, model_parameters=model_parameters, args=None, **kwargs
    )
    manager = None
    if eplb_config is not None:
        clip = disable_ds_clipping(engine)
        manager = EPLBManager(
            handle,
            eplb_config,
            optimizer_state=DeepSpeedSlotState(engine),
            load_group=dense_dp_group(),
            monitor=monitor,
            policy_fn=policy_fn,
        )
        install_hooks(engine, manager, handle, model, clip, handle.ep_group, [])
    else:
        engine.eplb_handle = handle
        engine.eplb_last_record = None
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
