"""DeepSpeed engine wiring for placement-aware Megatron-core MoE models.

Usage (instead of ``deepspeed.initialize``)::

    from megatron_eplb.patches import deepspeed as eplb_ds

    engine, optimizer, _, lr_scheduler, manager = eplb_ds.initialize(
        model=model, config="configs/ds_config.json", eplb=eplb_config, args=args
    )
    loss = engine(batch); engine.backward(loss); engine.step()   # EPLB runs inside engine.step()

What it does, because DeepSpeed decides MoE handling inside the engine's constructor:

* DeepSpeed's expert groups (``ep_size_<EP>``) are Megatron's expert-parallel and expert-data-parallel
  groups; every expert parameter is tagged ``allreduce=False`` with that ``group_name``, so its gradient is
  reduced over the expert-DP group only and the initial broadcast does not overwrite other ranks' experts;
* the engine is told it has MoE layers (optimizer param groups split into MoE / dense);
* ``engine.allreduce_gradients`` first sums the gradients of every logical expert's copies
  (``manager.before_optimizer_step()``) at the accumulation boundary, before DeepSpeed reduces;
* gradient clipping counts each logical expert once (DeepSpeed's own clipping is switched off: with EP it
  would clip each rank with its own norm and count a replicated expert once per copy);
* ``engine.step`` runs ``manager.step()`` after every *applied* optimizer step (not on skipped/overflow
  steps, not on accumulation micro-steps), and Megatron's aux-loss-free expert-bias update;
* slot optimizer state (fp32 master + Adam moments) moves with the weights through
  :class:`DeepSpeedSlotState` (in-place views of DeepSpeed's partitions).

Supported: ZeRO stage 0 and 1, fp32 and bf16 (bf16 gradient accumulation, DeepSpeed's default; masters
and Adam moments fp32), gradient accumulation, TP = PP = 1.  Checkpoints: :func:`save_checkpoint` /
:func:`load_checkpoint` keep every logical expert (weights and optimizer state) and the expert map with the
recorded ``[L, E]`` load; a resume at another EP size (e.g. one GPU lost) re-plans the placement for the new
EP size from that load and fills every slot from the logical checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_eplb import gradients
from megatron_eplb.config import EPLBConfig, EPLBConfigError
from megatron_eplb.gradients import primary_expert_params
from megatron_eplb.placement import ExpertPlacement

__all__ = [
    "DeepSpeedEPLBError",
    "DeepSpeedSlotState",
    "SUPPORTED_ZERO_STAGES",
    "initialize",
    "load_checkpoint",
    "logical_grad_norm",
    "save_checkpoint",
]

log = logging.getLogger("megatron_eplb")

SUPPORTED_ZERO_STAGES = (0, 1)
_OPTIM_KEYS = ("exp_avg", "exp_avg_sq")


class DeepSpeedEPLBError(EPLBConfigError):
    """The DeepSpeed configuration or parallel layout cannot be used with megatron-eplb."""


# ============================================================================ configuration


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


def _check_ds_config(ds_config: dict) -> int:
    zero = ds_config.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0)) if isinstance(zero, dict) else 0
    if stage not in SUPPORTED_ZERO_STAGES:
        raise DeepSpeedEPLBError(
            f"zero_optimization.stage={stage} is not supported with megatron-eplb; supported stages: "
            f"{', '.join(map(str, SUPPORTED_ZERO_STAGES))} (stage 2/3 partition gradients/weights inside "
            "backward hooks, before replica gradients can be summed)"
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


# ============================================================================ expert groups


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for an expert group (it parses the EP size out of it)."""
    return f"ep_size_{ep_size}"


def _register_expert_groups(ep_group, expert_dp_group) -> str:
    """Make Megatron's EP / expert-DP groups DeepSpeed's expert groups; return the group name."""
    from deepspeed.utils import groups

    ep_size = dist.get_world_size(ep_group)
    name = expert_group_name(ep_size)
    groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ep_group)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = expert_dp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(expert_dp_group)
    return name


def _megatron_groups():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise DeepSpeedEPLBError(
            "Megatron's parallel_state is not initialised: call deepspeed.init_distributed() and "
            "megatron.core.parallel_state.initialize_model_parallel(expert_model_parallel_size=EP) first"
        )
    if ps.get_tensor_model_parallel_world_size() > 1 or ps.get_pipeline_model_parallel_world_size() > 1:
        raise DeepSpeedEPLBError("tensor/pipeline parallel size > 1 is not supported; supported: TP = PP = 1")
    return ps.get_expert_model_parallel_group(), ps.get_expert_data_parallel_group()


def _tag_expert_params(model: torch.nn.Module, group_name: str) -> tuple[int, int]:
    """Tag every expert parameter for DeepSpeed; return (MoE layers, experts per layer)."""
    from megatron_eplb.patches.megatron import find_moe_layers

    layers = find_moe_layers(model)
    if not layers:
        raise DeepSpeedEPLBError(f"{type(model).__name__} has no Megatron-core MoELayer")
    for _, layer in layers:
        for p in layer.experts.parameters():
            p.allreduce = False
            p.group_name = group_name
    return len(layers), int(layers[0][1].config.num_moe_experts)


@contextlib.contextmanager
def _engine_has_moe(num_layers: int, num_experts: int):
    """Inside ``deepspeed.initialize``: tell the engine (before its optimizer is built) that it has MoE layers."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._configure_distributed_model

    def configure(self, model):
        original(self, model)
        self.has_moe_layers = True
        self.num_experts = [num_experts] * num_layers

    DeepSpeedEngine._configure_distributed_model = configure
    try:
        yield
    finally:
        DeepSpeedEngine._configure_distributed_model = original


def _moe_param_groups(model: torch.nn.Module, model_parameters: Any) -> list[dict]:
    from deepspeed.moe.utils import configure_moe_param_groups

    params = (
        model_parameters
        if model_parameters is not None
        else [p for p in model.parameters() if p.requires_grad]
    )
    return configure_moe_param_groups(list(params))


# ============================================================================ gradients


def _full_grads(model: torch.nn.Module):
    """``(param, gradient)`` of every trainable parameter that has one; the full gradient under ZeRO."""
    from deepspeed.utils import safe_get_full_grad

    for p in model.parameters():
        if p.requires_grad:
            g = safe_get_full_grad(p)
            if g is not None:
                yield p, g


def _expert_params(model: torch.nn.Module, handle: Any) -> dict[int, bool]:
    """``id(param) -> primary`` of every expert parameter: each slot's first-copy flag with EPLB; without,
    every expert parameter (``allreduce=False``, one copy per expert) is primary."""
    if handle is not None:
        return primary_expert_params(handle)
    return {id(p): True for p in model.parameters() if not getattr(p, "allreduce", True)}


def logical_grad_norm(model: torch.nn.Module, handle: Any, ep_group, norm_type: float = 2.0) -> float:
    """The L2 norm of the gradient of the *logical* model (each logical expert once): see
    :func:`megatron_eplb.gradients.logical_grad_norm`.  Sums stay on the device; one host sync.
    Collective over ``ep_group`` (and, under ZeRO 1, DeepSpeed's gradient partitions)."""
    if norm_type != 2.0:
        raise DeepSpeedEPLBError("only the L2 gradient norm is supported")
    return gradients.logical_grad_norm(_full_grads(model), _expert_params(model, handle), ep_group)


def _scale_grads(model: torch.nn.Module, coef: float) -> None:
    from deepspeed.utils import safe_set_full_grad

    for p, g in _full_grads(model):
        if p.grad is not None and g is p.grad:
            p.grad.mul_(coef)
        else:
            safe_set_full_grad(p, g * coef)


# ============================================================================ optimizer state


class DeepSpeedSlotState:
    """Per-slot optimizer tensors under DeepSpeed, the interface of ``manager.OptimizerSlotState``.

    ``tensors(params)`` returns tensors that *are* the optimizer's storage (writing them writes the state),
    for each of the optimizers DeepSpeed builds at ZeRO 0 and 1:

    * ZeRO 0, fp32 (a plain torch optimizer): its per-parameter state (``exp_avg``, ``exp_avg_sq``);
    * ZeRO 0, bf16 (DeepSpeed's ``FP16_UnfusedOptimizer`` in bf16): each parameter's fp32 master copy
      (``optimizer.fp32_groups``) and the torch optimizer's state of that master;
    * ZeRO 1, fp32 or bf16 (``DeepSpeedZeroOptimizer``): for each parameter its fp32 master fragment
      (``param._hp_mapping``, what ``deepspeed.utils.safe_get_full_fp32_param`` reads) and the matching
      slices of the Adam moments of DeepSpeed's flat fp32 partition (``safe_get_full_optimizer_state``'s
      source).  Fragments of one (layer, slot) have the same shape on every EP rank (identical parameter
      layout), so they are exchanged between EP ranks in place.

    Per parameter the order is ``fp32`` (when there is a master) then the moment keys sorted, the same on
    every rank.  ``full_state`` / ``set_full_state`` read/write whole tensors (collective over the
    parameter's DeepSpeed DP group under ZeRO) for logical checkpoints.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._group_of: dict[int, int] | None = None
        self._master_of: dict[int, torch.Tensor] | None = None

    # ----------------------------------------------------------- layouts
    def _torch_optimizer(self):
        """The torch optimizer whose ``state`` is keyed by the model's own parameters (ZeRO 0 fp32)."""
        opt = self.engine.optimizer
        if hasattr(opt, "bit16_groups") or hasattr(opt, "fp32_groups"):
            return None
        return opt if isinstance(getattr(opt, "state", None), dict) else None

    def master(self, p) -> torch.Tensor | None:
        """The fp32 master copy of ``p`` kept per parameter (ZeRO 0 bf16), else None."""
        if self._master_of is None:
            opt = self.engine.optimizer
            self._master_of = {}
            lp_groups, hp_groups = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
            if isinstance(lp_groups, list) and isinstance(hp_groups, list):
                for lp_group, hp_group in zip(lp_groups, hp_groups):
                    if not isinstance(hp_group, (list, tuple)):
                        continue  # the fused FP16_Optimizer keeps flat groups: not a per-parameter layout
                    for lp, hp in zip(lp_group, hp_group):
                        if hp.shape == lp.shape:
                            self._master_of[id(lp)] = hp
        return self._master_of.get(id(p))

    def _master_state(self, p) -> dict[str, torch.Tensor] | None:
        hp = self.master(p)
        if hp is None:
            return None
        state = self.engine.optimizer.optimizer.state.get(hp, {})
        out = {"fp32": hp.data}
        out.update((k, v) for k, v in sorted(state.items()) if torch.is_tensor(v) and v.shape == hp.shape)
        return out

    def _flat_state(self, p) -> tuple[torch.Tensor | None, dict]:
        opt = self.engine.optimizer
        if self._group_of is None:
            self._group_of = {
                id(q): i for i, group in enumerate(getattr(opt, "bit16_groups", [])) for q in group
            }
        i = self._group_of.get(id(p))
        if i is None:
            return None, {}
        flat = opt.single_partition_of_fp32_groups[i]
        return flat, opt.optimizer.state.get(flat, {})

    def state_keys(self) -> list[str]:
        """Moment keys of DeepSpeed's flat partitions (same on every rank; empty before the first step)."""
        opt = self.engine.optimizer
        for flat in getattr(opt, "single_partition_of_fp32_groups", []):
            state = opt.optimizer.state.get(flat, {})
            keys = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)
            if keys:
                return keys
        return []

    def ensure_state(self, step: int, keys: tuple[str, ...] = _OPTIM_KEYS) -> None:
        """Create zero Adam moments on DeepSpeed's flat partitions when none exist yet (before the first
        step), so that a checkpoint can be loaded into them; ``step`` is the optimizer step count."""
        opt = self.engine.optimizer
        for flat in getattr(opt, "single_partition_of_fp32_groups", []):
            state = opt.optimizer.state[flat]
            if not state:
                state["step"] = torch.tensor(float(step))
                for key in keys:
                    state[key] = torch.zeros_like(flat)
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def fragments(self, p) -> dict[str, torch.Tensor]:
        """``{"fp32": master, "exp_avg": ..., ...}``: this rank's in-place fragments of ``p`` (ZeRO)."""
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return {}
        out = {"fp32": mapping.get_hp_fragment()}
        flat, state = self._flat_state(p)
        addr = mapping.get_hp_fragment_address()
        for key in self.state_keys():
            value = state.get(key)
            if torch.is_tensor(value) and flat is not None and value.shape == flat.shape:
                out[key] = value.narrow(0, addr.start, addr.numel)
        return out

    # ----------------------------------------------------------- in place
    def tensors(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The optimizer storage of ``params`` (masters and moments), in a fixed order."""
        out: list[torch.Tensor] = []
        for p in params:
            if hasattr(p, "_hp_mapping"):
                frags = self.fragments(p)
                out.extend(frags[k] for k in sorted(frags))
                continue
            master = self._master_state(p)
            if master is not None:
                out.extend(master.values())
                continue
            opt = self._torch_optimizer()
            if opt is not None:
                state = opt.state.get(p, {})
                out.extend(v for _, v in sorted(state.items()) if torch.is_tensor(v) and v.dim() > 0)
        return out

    # ---------------------------------------------------------- whole tensors
    def full_state(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """Full fp32 master and optimizer state of ``p`` (copies; collective over ``p._dp_group`` under ZeRO)."""
        if hasattr(p, "_hp_mapping"):
            frags = self.fragments(p)
            out = {}
            for key in ["fp32", *self.state_keys()]:
                buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                if key in frags:
                    addr = p._hp_mapping.lp_fragment_address
                    buf.narrow(0, addr.start, addr.numel).copy_(frags[key].reshape(-1))
                dist.all_reduce(buf, group=p._dp_group)
                out[key] = buf.reshape(p.shape)
            return out
        master = self._master_state(p)
        if master is not None:
            out = {k: v.detach().clone() for k, v in master.items()}
            step = self.engine.optimizer.optimizer.state.get(self.master(p), {}).get("step")
            if torch.is_tensor(step):
                out["step"] = step.detach().clone()
            return out
        opt = self._torch_optimizer()
        state = opt.state.get(p, {}) if opt is not None else {}
        return {k: v.detach().clone() for k, v in state.items() if torch.is_tensor(v)}

    def set_full_state(self, p: torch.nn.Parameter, values: dict[str, torch.Tensor]) -> None:
        """Write full tensors (as :meth:`full_state` returns) into this rank's fragments / state. Local."""
        if hasattr(p, "_hp_mapping"):
            frags = self.fragments(p)
            if not frags:
                return
            addr = p._hp_mapping.lp_fragment_address
            for key, value in values.items():
                if key in frags:
                    frags[key].copy_(value.reshape(-1).narrow(0, addr.start, addr.numel).to(frags[key].dtype))
            return
        hp = self.master(p)
        if hp is not None:
            state = self.engine.optimizer.optimizer.state.setdefault(hp, {})
            for key, value in values.items():
                if key == "fp32":
                    hp.data.copy_(value.reshape(hp.shape))
                elif key in state and torch.is_tensor(state[key]):
                    state[key].copy_(value)
                else:
                    state[key] = value.clone()
            return
        opt = self._torch_optimizer()
        if opt is None:
            return
        state = opt.state.setdefault(p, {})
        for key, value in values.items():
            if key in state and torch.is_tensor(state[key]):
                state[key].copy_(value)
            else:
                state[key] = value.clone()


# ============================================================================ the engine hooks


def _update_expert_bias(layers: list) -> None:
    """Megatron's aux-loss-free expert-bias update, once per applied optimizer step.

    Megatron runs it in ``finalize_model_grads`` (which DeepSpeed never calls): the router's
    ``local_tokens_per_expert`` of the global batch, all-reduced over TP x CP x DP, moves each bias by
    ``moe_router_bias_update_rate`` towards the mean.  Megatron's own ``get_updated_expert_bias`` computes it.
    """
    from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

    routers = [layer.router for _, layer in layers if getattr(layer.router, "expert_bias", None) is not None]
    if not routers:
        return
    tokens = torch.stack([r.local_tokens_per_expert for r in routers])
    bias = torch.stack([r.expert_bias for r in routers])
    updated = get_updated_expert_bias(tokens, bias, routers[0].config.moe_router_bias_update_rate)
    with torch.no_grad():
        for r, b in zip(routers, updated):
            r.expert_bias.copy_(b)
            r.local_tokens_per_expert.zero_()


def _install_hooks(engine, manager, handle, model, clip: float, ep_group, layers) -> None:
    original_allreduce = engine.allreduce_gradients
    original_take_step = engine._take_model_step
    original_step = engine.step

    def allreduce_gradients(*args, **kwargs):
        if manager is not None and engine.is_gradient_accumulation_boundary():
            manager.before_optimizer_step()  # replica sum first: DeepSpeed then reduces identical copies
        elif handle is not None and engine.is_gradient_accumulation_boundary():
            handle.sum_replica_grads()
        return original_allreduce(*args, **kwargs)

    def take_model_step(*args, **kwargs):
        if clip > 0:
            norm = logical_grad_norm(model, handle, ep_group)
            engine._eplb_grad_norm = norm
            if math.isfinite(norm) and norm > clip:
                _scale_grads(model, clip / (norm + 1e-6))
        return original_take_step(*args, **kwargs)

    def step(*args, **kwargs):
        boundary = engine.is_gradient_accumulation_boundary()
        engine.eplb_last_record = None  # a record belongs to the one step() that completed it
        out = original_step(*args, **kwargs)
        if boundary and engine.was_step_applied():
            _update_expert_bias(layers)
            if manager is not None:
                engine.eplb_last_record = manager.step()
        return out

    engine.allreduce_gradients = allreduce_gradients
    engine._take_model_step = take_model_step
    engine.step = step
    engine.eplb_manager = manager
    engine.eplb_handle = handle
    engine.eplb_last_record = None
    engine._eplb_grad_norm = None


def _to_accelerator(model: torch.nn.Module) -> None:
    """Move the model to DeepSpeed's device now (the engine would, later): ``apply`` gathers the experts
    over the expert-parallel group, whose NCCL collectives need them on the GPU."""
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())
    if device.type != "cpu":
        model.to(device)


def _dense_dp_group():
    from deepspeed.utils import groups

    return groups._get_data_parallel_group()


def _disable_ds_clipping(engine) -> float:
    clip = float(engine.gradient_clipping() or 0.0)
    engine._config.gradient_clipping = 0.0
    opt = engine.optimizer
    if hasattr(opt, "clip_grad"):
        opt.clip_grad = 0.0
    return clip


# ============================================================================ initialize


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
    _check_ds_config(ds_config)
    eplb_config = _resolve_eplb(eplb, ds_config, args)
    ds_config.pop("eplb", None)  # DeepSpeed accepts it, but it is ours
    ep_group, expert_dp_group = _megatron_groups()
    ep_size = dist.get_world_size(ep_group)
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
    group_name = _register_expert_groups(ep_group, expert_dp_group)
    num_layers, num_experts = _tag_expert_params(model, group_name)
    if kwargs.get("optimizer") is None or callable(kwargs.get("optimizer")):
        model_parameters = _moe_param_groups(model, model_parameters)
    with _engine_has_moe(num_layers, num_experts):
        engine, optimizer, dataloader, lr_scheduler = deepspeed.initialize(
            model=model, config=ds_config, model_parameters=model_parameters, args=None, **kwargs
        )
    clip = _disable_ds_clipping(engine)
    manager = None
    if eplb_config is not None:
        manager = EPLBManager(
            handle,
            eplb_config,
            optimizer_state=DeepSpeedSlotState(engine),
            load_group=_dense_dp_group(),
            monitor=monitor,
            policy_fn=policy_fn,
        )
    _install_hooks(engine, manager, handle, model, clip, ep_group, layers)
    if dist.get_rank() == 0:
        log.info(
            "megatron-eplb: DeepSpeed engine with %d MoE layers x %d experts, EP=%d (group %s), ZeRO %d, "
            "clipping %.3g (logical experts once), EPLB %s",
            num_layers,
            num_experts,
            ep_size,
            group_name,
            engine.zero_optimization_stage(),
            clip,
            "off" if eplb_config is None else eplb_config.to_json(),
        )
    return engine, optimizer, dataloader, lr_scheduler, manager


# ============================================================================ checkpoints


def _all_model_params(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters()]


def save_checkpoint(engine, manager, save_dir: str | os.PathLike, tag: str | None = None) -> Path:
    """Save a logical checkpoint: every logical expert once (weights and optimizer state), dense weights,
    optimizer state of dense params, and the expert map.  Collective over all ranks; rank 0 writes.

    Layout: ``save_dir/tag/model_logical.pt`` (state dicts + optimizer state by parameter name) and
    ``save_dir/tag/expert_map.json``; ``save_dir/latest`` holds the tag.
    """
    from megatron_eplb.checkpoint import save_expert_map

    handle = engine.eplb_handle if manager is None else manager.handle
    if handle is None:
        raise DeepSpeedEPLBError("save_checkpoint needs an EPLB engine (initialize(eplb=...) not False)")
    tag = tag or f"global_step{engine.global_steps}"
    out = Path(save_dir) / tag
    slot_state = DeepSpeedSlotState(engine)
    model_state = handle.logical_state_dict()
    optim_state = _logical_optimizer_state(engine, handle, slot_state)
    # The [L, E] load of the manager's window goes into the map: a resume at another EP size plans from it.
    load = handle.placement.expert_load
    if manager is not None:
        window, _ = manager.gather_window()  # collective over every rank that routes tokens
        if window.sum() > 0:
            load = window
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "model": {
                k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                for k, v in model_state.items()
                if torch.is_tensor(v)
            },
            "optimizer": optim_state,
            "global_steps": engine.global_steps,
            "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
            "eplb_step_count": manager.step_count if manager is not None else None,
        }
        torch.save(payload, out / "model_logical.pt")
        save_expert_map(handle.placement.with_load(load), out)
        (Path(save_dir) / "latest").write_text(tag)
    dist.barrier()
    return out


def _logical_optimizer_state(
    engine, handle, slot_state: DeepSpeedSlotState
) -> dict[str, dict[str, torch.Tensor]]:
    """Optimizer state by logical parameter name (collective; complete on rank 0)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    expert_ids = set()
    if handle is not None:
        prefixes = handle.expert_key_prefixes()
        names = handle.slot_param_names()
        for layer in range(handle.num_layers):
            for k in range(handle.slots_per_rank):
                for p in handle.slot_params(layer, k):
                    expert_ids.add(id(p))
            gathered = _gather_layer_state(handle, layer, slot_state)
            for e, per_param in gathered.items():
                for name, state in zip(names, per_param):
                    out[f"{prefixes[layer]}{e}.{name}"] = state
    for name, p in _all_model_params(engine):
        if id(p) in expert_ids:
            continue
        out[name] = {k: v.cpu() for k, v in slot_state.full_state(p).items()}
    return out


def _gather_layer_state(handle, layer: int, slot_state: DeepSpeedSlotState) -> dict[int, list[dict]]:
    """``expert -> [per-param state dict]`` of one MoE layer, from each expert's first copy (collective)."""
    placement = handle.placement
    primary = placement.primary_slots()[layer]
    local = []
    for k, slot in enumerate(handle.local_slots()):
        # full_state is collective under ZeRO: every rank reads every local slot, then keeps first copies
        states = [
            {n: v.cpu() for n, v in slot_state.full_state(p).items()} for p in handle.slot_params(layer, k)
        ]
        if primary[slot]:
            local.append((int(placement.phy2log[layer, slot]), states))
    gathered = [None] * dist.get_world_size(handle.ep_group)
    dist.all_gather_object(gathered, local, group=handle.ep_group)
    return {e: st for part in gathered for e, st in part}


def load_checkpoint(engine, manager, load_dir: str | os.PathLike, tag: str | None = None) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into any placement / EP size.

    First the placement to resume with (:func:`_restore_placement`): the saved one when it fits, else a new
    plan for the current EP size and slot count from the map's recorded load (logged on rank 0).  Then
    every slot is filled from its logical expert (weights, fp32 master, optimizer state).  Every rank reads
    the file; collective over the EP group.  Returns the payload's metadata (``global_steps``, ...) and
    ``placement``: ``{"action": "restored" | "replanned" | "kept", "saved_ep_size", "ep_size", ...}``.
    """
    handle = engine.eplb_handle if manager is None else manager.handle
    load_dir = Path(load_dir)
    if tag is None:
        latest = load_dir / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"{load_dir}: no 'latest' file; pass tag=")
        tag = latest.read_text().strip()
    path = load_dir / tag / "model_logical.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model_state = payload["model"]
    placement_info = _restore_placement(handle, manager, path.parent) if handle is not None else None
    if handle is not None:
        handle.load_logical_state_dict(model_state, strict=False)
    else:
        engine.module.load_state_dict(model_state, strict=False)
    slot_state = DeepSpeedSlotState(engine)
    optim = payload["optimizer"]
    slot_state.ensure_state(int(payload.get("global_steps") or 0))
    physical_names = _physical_names(engine, handle)
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            logical = physical_names.get(name, name)
            values = dict(optim.get(logical) or {})
            has_master = hasattr(p, "_hp_mapping") or slot_state.master(p) is not None
            if has_master and "fp32" not in values and logical in model_state:
                values["fp32"] = model_state[logical].float()  # saved without masters (an fp32 run)
            if values:
                slot_state.set_full_state(p, {k: v.to(p.device) for k, v in values.items()})
    if engine.lr_scheduler is not None and payload.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(payload["lr_scheduler"])
    engine.global_steps = payload.get("global_steps", 0)
    if manager is not None and payload.get("eplb_step_count") is not None:
        manager.resume_at(payload["eplb_step_count"])
    out = {k: v for k, v in payload.items() if k not in ("model", "optimizer")}
    out["placement"] = placement_info
    return out


def _restore_placement(handle, manager, ckpt_dir: Path) -> dict:
    """Choose the placement to resume with (collective over the EP group when it changes); return what happened.

    * the map saved beside the checkpoint fits (same EP size, slots, layers, experts): resume with it;
    * it was saved for another EP size (e.g. one GPU lost) or slot count: plan a new placement for the
      current EP size and slot count with :func:`megatron_eplb.policy.rebalance` on the map's recorded
      ``expert_load``; without a recorded load keep the current (default) placement;
    * ``expert_map_path`` was given: that map wins (static EPLB), the saved one is ignored.

    Every slot is then filled from its logical expert by the caller.
    """
    from megatron_eplb.checkpoint import expert_map_path, load_expert_map
    from megatron_eplb.stats import balance_summary

    config = manager.config if manager is not None else None
    current = handle.placement
    saved = load_expert_map(ckpt_dir)
    info = {
        "action": "kept",
        "saved_ep_size": None if saved is None else saved.num_ranks,
        "saved_num_slots": None if saved is None else saved.num_slots,
        "ep_size": handle.ep_size,
        "num_slots": handle.num_slots,
        "balancedness": None,
    }
    if saved is None:
        why = f"the checkpoint has no {expert_map_path(ckpt_dir).name}; keeping the current placement"
    elif config is not None and config.expert_map_path is not None:
        why = f"expert_map_path={config.expert_map_path!r} is given; the checkpoint's map is not used"
    elif (saved.num_layers, saved.num_experts) != (handle.num_layers, handle.num_experts):
        raise DeepSpeedEPLBError(
            f"{ckpt_dir}: the checkpoint's expert map has {saved.num_layers} MoE layers x {saved.num_experts} "
            f"experts, the model {handle.num_layers} x {handle.num_experts}; it was saved for another model"
        )
    elif (saved.num_ranks, saved.num_slots) == (handle.ep_size, handle.num_slots):
        handle.set_placement(saved)
        info["action"] = "restored"
        why = f"resuming with the saved placement ({saved.num_slots} slots on EP={saved.num_ranks})"
    elif saved.expert_load is None or not np.any(saved.expert_load > 0):
        why = (
            f"the map was saved for EP={saved.num_ranks} with {saved.num_slots} slots per layer but records no "
            f"expert_load; keeping the default placement for EP={handle.ep_size} ({handle.num_slots} slots)"
        )
    else:
        from megatron_eplb.policy import rebalance

        load = np.asarray(saved.expert_load, dtype=np.float64)
        policy = "auto" if config is None or config.eplb_policy == "low_churn" else config.eplb_policy
        nodes = (
            config.eplb_num_nodes if config is not None and handle.ep_size % config.eplb_num_nodes == 0 else 1
        )
        groups = config.eplb_num_groups if config is not None and nodes > 1 else 1
        new = rebalance(
            load, handle.num_slots, handle.ep_size, num_nodes=nodes, num_groups=groups, policy=policy
        )
        before = balance_summary(current, load)["mean"]
        after = balance_summary(new, load)["mean"]
        handle.set_placement(new.with_load(load))
        info.update(action="replanned", balancedness=after, balancedness_default=before)
        why = (
            f"it was saved at EP={saved.num_ranks} with {saved.num_slots} slots per layer; re-planned for "
            f"EP={handle.ep_size} with {handle.num_slots} slots per layer from its recorded [L, E] load (policy "
            f"{policy}): predicted balancedness {after:.3f} (default placement {before:.3f}); every logical "
            "expert (weights and optimizer state) is restored from the logical checkpoint"
        )
    if dist.get_rank() == 0:
        log.info("megatron-eplb: loading %s: %s", ckpt_dir, why)
    info["message"] = why
    return info


def _physical_names(engine, handle) -> dict[str, str]:
    """``physical param name -> logical name`` for every local expert slot."""
    out: dict[str, str] = {}
    if handle is None:
        return out
    names = dict((id(p), n) for n, p in engine.module.named_parameters())
    prefixes = handle.expert_key_prefixes()
    pnames = handle.slot_param_names()
    for layer in range(handle.num_layers):
        for k, slot in enumerate(handle.local_slots()):
            expert = int(handle.placement.phy2log[layer, slot])
            for pname, p in zip(pnames, handle.slot_params(layer, k)):
                out[names[id(p)]] = f"{prefixes[layer]}{expert}.{pname}"
    return out
