"""The engine hooks: what runs inside a DeepSpeed engine's step for placement-aware MoE layers.

DeepSpeed has no public after-step callback and decides MoE handling inside the engine's constructor, so:

* while ``deepspeed.initialize`` builds the engine, it is told it has MoE layers (:func:`engine_has_moe`:
  optimizer param groups split into MoE / dense);
* ``engine.allreduce_gradients`` first sums the gradients of every logical expert's copies
  (``manager.before_optimizer_step()``) at the accumulation boundary, before DeepSpeed reduces;
* gradient clipping counts each logical expert once (:func:`logical_grad_norm`; DeepSpeed's own clipping is
  switched off by :func:`disable_ds_clipping`: with EP it would clip each rank with its own norm and count a
  replicated expert once per copy);
* ``engine.step`` runs ``manager.step()`` after every *applied* optimizer step (not on skipped/overflow
  steps, not on accumulation micro-steps), and Megatron's aux-loss-free expert-bias update
  (:func:`update_expert_bias`).

:func:`install_hooks` wraps the engine's methods; it sets ``engine.eplb_handle`` and ``engine.eplb_last_record``
(the record ``manager.step()`` returned in the last ``engine.step()``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from megatron_eplb import gradients
from megatron_eplb.gradients import primary_expert_params

from .errors import DeepSpeedEPLBError

__all__ = [
    "disable_ds_clipping",
    "engine_has_moe",
    "install_hooks",
    "logical_grad_norm",
    "update_expert_bias",
]


def _full_grads(model: torch.nn.Module):
    """``(param, gradient)`` of every trainable parameter that has one; the full gradient under ZeRO."""
    from deepspeed.utils import safe_get_full_grad

    for p in model.parameters():
        if p.requires_grad:
            g = safe_get_full_grad(p)
            if g is not None:
                yield p, g


def _expert_params(model: torch.nn.Module, handle: Any) -> dict:
    """``id(param) ->`` its primary parts for every expert parameter: with EPLB the first copies' slots
    (:func:`primary_expert_params`); without, all of every expert parameter (``allreduce=False``, one copy
    per expert: ``True``)."""
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


@contextlib.contextmanager
def engine_has_moe(num_layers: int, num_experts: int):
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


def update_expert_bias(layers: list) -> None:
    """Megatron's aux-loss-free expert-bias update, once per applied optimizer step.

    Megatron runs it in ``finalize_model_grads`` (which DeepSpeed never calls): the router's
    ``local_tokens_per_expert`` of the global batch, all-reduced over TP x CP x DP, moves each bias by
    ``moe_router_bias_update_rate`` towards the mean.  Megatron's own ``get_updated_expert_bias`` computes it.
    """
    routers = [layer.router for _, layer in layers if getattr(layer.router, "expert_bias", None) is not None]
    if not routers:  # also: no Megatron-core layers (deepspeed.moe models need no megatron-core installed)
        return
    from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

    tokens = torch.stack([r.local_tokens_per_expert for r in routers])
    bias = torch.stack([r.expert_bias for r in routers])
    updated = get_updated_expert_bias(tokens, bias, routers[0].config.moe_router_bias_update_rate)
    with torch.no_grad():
        for r, b in zip(routers, updated):
            r.expert_bias.copy_(b)
            r.local_tokens_per_expert.zero_()


def install_hooks(engine, manager, handle, model, clip: float, ep_group, layers) -> None:
    """Wrap ``engine.allreduce_gradients`` (replica-gradient sum first), ``engine._take_model_step`` (logical
    clipping at ``clip``) and ``engine.step`` (expert bias and ``manager.step()`` after applied steps)."""
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
            if math.isfinite(norm) and norm > clip:
                _scale_grads(model, clip / (norm + 1e-6))
        return original_take_step(*args, **kwargs)

    def step(*args, **kwargs):
        boundary = engine.is_gradient_accumulation_boundary()
        engine.eplb_last_record = None  # a record belongs to the one step() that completed it
        out = original_step(*args, **kwargs)
        if boundary and engine.was_step_applied():
            update_expert_bias(layers)
            if manager is not None:
                engine.eplb_last_record = manager.step()
        return out

    engine.allreduce_gradients = allreduce_gradients
    engine._take_model_step = take_model_step
    engine.step = step
    engine.eplb_handle = handle
    engine.eplb_last_record = None


def disable_ds_clipping(engine) -> float:
    """Switch DeepSpeed's own gradient clipping off; return the configured clip (0: none)."""
    clip = float(engine.gradient_clipping() or 0.0)
    engine._config.gradient_clipping = 0.0
    opt = engine.optimizer
    if hasattr(opt, "clip_grad"):
        opt.clip_grad = 0.0
    return clip
