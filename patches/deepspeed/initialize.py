"""``initialize``: ``deepspeed.initialize`` for a Megatron-core MoE model with EPLB, and the config checks.

Usage (instead of ``deepspeed.initialize``)::

    from megatron_eplb.patches import deepspeed as eplb_ds

    engine, optimizer, _, lr_scheduler, manager = eplb_ds.initialize(
        model=model, config="configs/ds_config.json", eplb=eplb_config, args=args
    )
    loss = engine(batch); engine.backward(loss); engine.step()   # EPLB runs inside engine.step()

It checks the ds_config and the parallel layout, patches the model (``megatron_eplb.patches.megatron.apply``),
makes DeepSpeed's expert groups from Megatron's (:mod:`.groups`), builds the engine with MoE param groups,
builds the manager with :class:`.optimizer_state.DeepSpeedSlotState` and installs the engine hooks
(:mod:`.engine`).

Supported: ZeRO stage 0, 1 and 2, fp32 and bf16 (bf16 gradient accumulation, DeepSpeed's default; masters
and Adam moments fp32), gradient accumulation, TP >= 1 with sequence parallelism and expert TP = 1
(Megatron's parallel state passed to DeepSpeed as ``mpu``), PP = 1.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_eplb.config import EPLBConfig
from megatron_eplb.placement import ExpertPlacement

from .engine import disable_ds_clipping, engine_has_moe, install_hooks
from .errors import DeepSpeedEPLBError
from .groups import MegatronMPU, megatron_groups, register_expert_groups, routing_group, tag_expert_params
from .optimizer_state import DeepSpeedSlotState

__all__ = ["SUPPORTED_ZERO_STAGES", "check_ds_config", "initialize"]

log = logging.getLogger("megatron_eplb")

SUPPORTED_ZERO_STAGES = (0, 1, 2)


def _load_ds_config(config: Any, args: Any) -> dict:
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if config is None:
        raise DeepSpeedEPLBError("no DeepSpeed config: pass config=dict|path or --deepspeed_config FILE")
    if isinstance(config, dict):
        return dict(config)
    path = Path(config)
    if not path.is_file():
        raise DeepSpeedEPLBError(f"DeepSpeed config {str(path)!r} does not exist")
    return json.loads(path.read_text())


def _resolve_eplb(eplb: Any, ds_config: dict, args: Any) -> EPLBConfig | None:
    if eplb is False:
        return None
    if isinstance(eplb, EPLBConfig):
        return eplb
    if isinstance(eplb, dict):
        return EPLBConfig.from_dict(eplb, base=EPLBConfig.from_ds_config(ds_config), source="eplb=")
    if eplb is None:
        if args is not None:
            return EPLBConfig.from_args(args, ds_config)
        return EPLBConfig.from_ds_config(ds_config)
    raise DeepSpeedEPLBError(f"eplb must be an EPLBConfig, a dict, None or False, got {type(eplb).__name__}")


def check_ds_config(ds_config: dict) -> int:
    zero = ds_config.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0)) if isinstance(zero, dict) else 0
    if stage not in SUPPORTED_ZERO_STAGES:
        raise DeepSpeedEPLBError(
            f"zero_optimization.stage={stage} is not supported with megatron-eplb; supported stages: "
            f"{', '.join(map(str, SUPPORTED_ZERO_STAGES))} (stage 3 partitions the weights themselves, "
            "so an expert slot has no whole tensor to move)"
        )
    if (ds_config.get("fp16", {}) or {}).get("enabled", False):
        raise DeepSpeedEPLBError("fp16 is not supported with megatron-eplb; use fp32 or bf16")
    bf16 = (ds_config.get("bf16", {}) or {}).get("enabled", False)
    accum = str((ds_config.get("data_types", {}) or {}).get("grad_accum_dtype") or "").lower()
    if bf16 and accum in ("fp32", "float32", "float", "torch.float32"):
        raise DeepSpeedEPLBError(
            "bf16 with data_types.grad_accum_dtype=fp32 is not supported with megatron-eplb (DeepSpeed's "
            "BF16_Optimizer copies gradients into fp32 partitions inside backward, before replica gradients "
            "can be summed); leave grad_accum_dtype unset (bf16): masters and Adam moments stay fp32"
        )
    return stage


def _check_parallel_layout(ep_size: int) -> None:
    world = dist.get_world_size()
    if world % ep_size:
        raise DeepSpeedEPLBError(
            f"expert-parallel size {ep_size} does not divide the world size {world}; choose EP in "
            f"{[d for d in range(1, world + 1) if world % d == 0]}"
        )


def _moe_param_groups(model: torch.nn.Module, model_parameters: Any) -> list[dict]:
    from deepspeed.moe.utils import configure_moe_param_groups

    params = (
        model_parameters
        if model_parameters is not None
        else [p for p in model.parameters() if p.requires_grad]
    )
    return configure_moe_param_groups(list(params))


def _to_accelerator(model: torch.nn.Module) -> None:
    """Move the model to DeepSpeed's device now (the engine would, later): ``apply`` gathers the experts
    over the expert-parallel group, whose NCCL collectives need them on the GPU."""
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())
    if device.type != "cpu":
        model.to(device)


def initialize(
    model: torch.nn.Module | None = None,
    config: dict | str | os.PathLike | None = None,
    eplb: EPLBConfig | dict | None | bool = None,
    handle: Any = None,
    args: Any = None,
    *,
    placement: ExpertPlacement | None = None,
    monitor: Any = None,
    policy_fn: Any = None,
    model_parameters: Any = None,
    **kwargs: Any,
):
    """``deepspeed.initialize`` for a Megatron-core MoE model with EPLB.

    Args:
        model: a Megatron-core model (e.g. ``GPTModel``) with ``MoELayer`` s; ``parallel_state`` initialised.
        config: the ds_config (dict or JSON path; default ``args.deepspeed_config``).  Its ``"eplb"``
            section is one EPLB config source.
        eplb: an :class:`EPLBConfig`, a dict of keys (over the ds_config section), ``None`` (all sources from
            ``args``: ds_config < ``--eplb-config`` < ``--additional-config`` < flags), or ``False``:
            no EPLB (the model keeps Megatron's own experts; DeepSpeed MoE wiring and logical clipping only).
        handle: an existing handle of ``megatron_eplb.patches.megatron.apply``; else ``apply`` is called.
        args: argparse namespace (DeepSpeed's ``--deepspeed_config`` and the EPLB flags).
        placement: start placement for ``apply`` (default from ``eplb``).
        monitor: a :class:`megatron_eplb.monitor.Monitor` for the manager.
        policy_fn: a placement policy for the manager's worker (default: ``eplb_policy``).
        model_parameters, **kwargs: as for ``deepspeed.initialize`` (``optimizer``, ``lr_scheduler`` ...).
    Returns:
        ``(engine, optimizer, dataloader, lr_scheduler, manager)``; ``manager`` is None with ``eplb=False``.
    """
    import deepspeed
    from megatron_eplb.patches import megatron as eplb_mcore

    from megatron_eplb.manager import EPLBManager

    if model is None:
        raise DeepSpeedEPLBError("initialize() needs model=")
    ds_config = _load_ds_config(config, args)
    check_ds_config(ds_config)
    eplb_config = _resolve_eplb(eplb, ds_config, args)
    ds_config.pop("eplb", None)  # DeepSpeed accepts it, but it is ours
    ep_group, expert_dp_group = megatron_groups()
    ep_size = dist.get_world_size(ep_group)
    tp_size = eplb_mcore.tp.tp_size()
    _check_parallel_layout(ep_size)
    layers = eplb_mcore.find_moe_layers(model)
    if not layers:
        raise DeepSpeedEPLBError(f"{type(model).__name__} has no Megatron-core MoELayer; nothing to balance")
    eplb_mcore.ensure_compat()
    _to_accelerator(model)
    num_experts = int(layers[0][1].config.num_moe_experts)
    if eplb_config is not None:
        eplb_config.validate_for(len(layers), num_experts, ep_size)
        if handle is None:
            handle = eplb_mcore.apply(model, placement, eplb_config)
    group_name = register_expert_groups(ep_group, expert_dp_group)
    num_layers, num_experts = tag_expert_params(model, group_name)
    if kwargs.get("optimizer") is None or callable(kwargs.get("optimizer")):
        model_parameters = _moe_param_groups(model, model_parameters)
    kwargs.setdefault("mpu", MegatronMPU())  # dense gradients reduced over Megatron's DP group, not over TP
    with engine_has_moe(num_layers, num_experts):
        engine, optimizer, dataloader, lr_scheduler = deepspeed.initialize(
            model=model, config=ds_config, model_parameters=model_parameters, args=None, **kwargs
        )
    clip = disable_ds_clipping(engine)
    manager = None
    if eplb_config is not None:
        manager = EPLBManager(
            handle,
            eplb_config,
            optimizer_state=DeepSpeedSlotState(engine),
            load_group=routing_group(),
            monitor=monitor,
            policy_fn=policy_fn,
        )
    summed, averaged = eplb_mcore.tp.tp_replicated_params(model, layers[0][1].config)
    grad_sync = (summed + averaged, lambda: eplb_mcore.tp.allreduce_tp_replicated_grads(summed, averaged))
    install_hooks(engine, manager, handle, model, clip, ep_group, layers, grad_sync=grad_sync)
    if dist.get_rank() == 0:
        log.info(
            "megatron-eplb: DeepSpeed engine with %d MoE layers x %d experts, EP=%d (group %s), TP=%d, ZeRO %d, "
            "clipping %.3g (logical experts once), EPLB %s",
            num_layers,
            num_experts,
            ep_size,
            group_name,
            tp_size,
            engine.zero_optimization_stage(),
            clip,
            "off" if eplb_config is None else eplb_config.to_json(),
        )
        gas = engine.gradient_accumulation_steps()
        if eplb_config is not None and eplb_config.dynamic_eplb and gas > 1:
            every = eplb_config.num_iterations_eplb_update
            log.info(
                "megatron-eplb: EPLB counts optimizer steps; with gradient_accumulation_steps=%d a rebalance every "
                "num_iterations_eplb_update=%d optimizer steps is every %d micro-batches (engine.step() calls), "
                "and the window of eplb_window_size=%d optimizer steps spans %d micro-batches",
                gas,
                every,
                every * gas,
                eplb_config.eplb_window_size,
                eplb_config.eplb_window_size * gas,
            )
    return engine, optimizer, dataloader, lr_scheduler, manager
