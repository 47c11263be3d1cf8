"""The engine hooks: what runs inside a DeepSpeed engine's step for placement-aware MoE layers.

DeepSpeed has no public after-step callback and decides MoE handling inside the engine's constructor, so:

* while ``deepspeed.initialize`` builds the engine, it is told it has MoE layers (:func:`engine_has_moe`:
  optimizer param groups split into MoE / dense);
* ``engine.allreduce_gradients`` first sums the gradients of every logical expert's copies
  (``manager.before_optimizer_step()``) at the accumulation boundary, before DeepSpeed reduces; under ZeRO 2
  (and ZeRO 1 with ``overlap_comm``), where DeepSpeed reduces each gradient in a backward hook as soon as it
  is ready, the expert gradients are held back in that hook (:func:`hold_back_reductions`) and handed to
  DeepSpeed right after the sum, on every micro-step;
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
import sys
from typing import Any

import torch

from megatron_eplb import gradients
from megatron_eplb.gradients import primary_expert_params

from .errors import DeepSpeedEPLBError

__all__ = [
    "disable_ds_clipping",
    "engine_has_moe",
    "hold_back_reductions",
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
    """The L2 norm of the gradient of the *logical* model (each logical expert once, each TP-sharded
    parameter whole, each TP-replicated one once): see :func:`megatron_eplb.gradients.logical_grad_norm`.
    Sums stay on the device; one host sync.  Collective over ``ep_group``, the TP group (TP > 1) and, under
    ZeRO, DeepSpeed's gradient partitions."""
    if norm_type != 2.0:
        raise DeepSpeedEPLBError("only the L2 gradient norm is supported")
    experts = _expert_params(model, handle)
    if "megatron.core" not in sys.modules:  # not a Megatron-core model (deepspeed.moe): no Megatron TP
        return gradients.logical_grad_norm(_full_grads(model), experts, ep_group)
    from megatron_eplb.patches.megatron import tp

    group = tp.tp_group()
    grads = ((p, g) for p, g in _full_grads(model) if id(p) in experts or tp.counted_once(p, group))
    return gradients.logical_grad_norm(grads, experts, ep_group, dense_group=group)


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


def hold_back_reductions(engine, params: list[torch.nn.Parameter]):
    """Hold DeepSpeed's in-backward reduction of ``params``' gradients back; return ``release()`` (or None
    where DeepSpeed reduces only after backward: ZeRO 0, ZeRO 1 without ``overlap_comm``).

    ZeRO 2 (and ZeRO 1 with ``overlap_comm`` at the accumulation boundary) reduce-scatters a gradient inside
    backward, in the hook that fires when it is ready (``process_gradients``), and frees it: too early for the
    replica-gradient sum.  The hook keeps these parameters' gradients in place instead; ``release()`` hands
    them to DeepSpeed's own ``process_gradients`` in the order their hooks fired (the same on every rank).
    Call it after the sum, before ``engine.allreduce_gradients``' epilogue reduces the last bucket.
    """
    opt = engine.optimizer
    if not params or not hasattr(opt, "process_gradients"):
        return None
    if not (getattr(opt, "partition_gradients", False) or getattr(opt, "overlap_comm", False)):
        return None
    ids = {id(p) for p in params}
    original = opt.process_gradients
    held: list = []

    def process_gradients(param, i):
        if id(param) in ids and not getattr(opt, "_coalesce_grad_reduction", False):
            held.append((param, i))
            return
        original(param, i)

    def release() -> None:
        items = list(held)
        held.clear()
        for param, i in items:
            original(param, i)

    opt.process_gradients = process_gradients
    return release


def install_hooks(
    engine, manager, handle, model, clip: float, ep_group, layers, grad_sync=None, expert_params=None
) -> None:
    """Wrap ``engine.allreduce_gradients`` (replica-gradient sum first), ``engine._take_model_step`` (logical
    clipping at ``clip``) and ``engine.step`` (expert bias and ``manager.step()`` after applied steps).

    ``layers``: ``[(name, MoELayer)]`` of Megatron-core (their experts' gradients are held back, their routers'
    expert bias updated); ``expert_params``: the expert parameters to hold back instead (layers of another
    kind, e.g. ``deepspeed.moe``: pass ``layers=[]``).  ``grad_sync``: ``(params, fn)`` — gradients that must
    be summed before DeepSpeed reduces them besides the experts' (the sequence-parallel ones over the TP
    group), ``fn()`` sums them (collective)."""
    original_allreduce = engine.allreduce_gradients
    original_take_step = engine._take_model_step
    original_step = engine.step
    sync_params, sync = grad_sync if grad_sync is not None else ([], None)
    # held back with and without EPLB alike: the same buckets, the same reduction order (comparable runs)
    if expert_params is None:
        expert_params = [p for _, layer in layers for p in layer.experts.parameters()]
    expert_params = list(expert_params)
    release = hold_back_reductions(engine, expert_params + list(sync_params))
    # ZeRO 2 reduces (and frees) the gradients of every micro-step; ZeRO 0/1 accumulate them up to the boundary
    every_micro_step = bool(getattr(engine.optimizer, "partition_gradients", False))

    def allreduce_gradients(*args, **kwargs):
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary or every_micro_step:
            if sync is not None:
                sync()
            if manager is not None and boundary:
                manager.before_optimizer_step()  # replica sum first: DeepSpeed then reduces identical copies
            elif handle is not None:
                handle.sum_replica_grads()
        if release is not None:
            release()
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
