"""EPLB for models built on DeepSpeed's own MoE layer (``deepspeed.moe.layer.MoE``: Megatron-DeepSpeed).

Usage (instead of ``deepspeed.initialize``)::

    from megatron_eplb.patches import deepspeed_moe as eplb_dsmoe

    deepspeed.init_distributed()
    model = GPT(...)                    # any module with deepspeed.moe.layer.MoE layers
    engine, optimizer, _, lr_scheduler, manager = eplb_dsmoe.initialize(
        model=model, config="ds_config.json", eplb=eplb_config, args=args
    )
    loss = engine(batch); engine.backward(loss); engine.step()   # EPLB runs inside engine.step()
    engine.save_checkpoint("ckpt")      # DeepSpeed's checkpoint + the expert map and a logical checkpoint

What :func:`apply` changes in each ``MoE`` layer (MoE layer ids count ``MoE`` modules in module order):

* the gate stays logical (``TopKGate``: weight ``[E, H]``, top-1/top-2/top-k, capacity, ``drop_tokens``,
  random token selection, aux loss): its decision is taken as is, recorded (``[L, E]`` routed pairs, and the
  pairs the capacity dropped), and each kept route is mapped to a physical slot and a row of the
  ``[P, C, M]`` dispatch buffer (``routing.py``); ``MOELayer``'s own forward then dispatches to ``P`` slots;
* ``Experts`` holds ``S = P / EP`` slots (copies of the expert module) filled from their logical experts.

Replica dispatch (``eplb_replica_dispatch``): ``balanced`` (default) splits each batch's kept routes of a
replicated expert over its copies from every EP rank's counts (one all-gather of ``[E]`` per layer and
forward), so that the batch's busiest rank is as light as the placement allows; ``even`` round-robin;
``local_first``.  Each copy's rows stay ``< C``: the split only decides which copy computes a kept route.

Capacity (``eplb_capacity``): ``logical`` (default) keeps the gate's capacity per logical expert, so
exactly the tokens the unpatched layer drops are dropped and the layer computes the same function;
``per_slot`` gives every physical slot the capacity of one expert, so ``c`` copies of a hot expert keep up
to ``c`` times as many of its tokens (the math changes: fewer drops, tokens dropped by position).

One module per seam: ``routing.py`` (pure routing onto slots), ``handle.py`` (:class:`DeepSpeedMoEEPLB`, the
:class:`megatron_eplb.protocols.ExpertModel`), ``apply.py`` (:func:`apply`, :func:`attach`, DeepSpeed's
expert groups, the checks), ``initialize.py`` (:func:`initialize`: the engine, the manager and the hooks of
``patches/deepspeed``), ``checkpoint.py`` (logical checkpoints; ``engine.save_checkpoint`` /
``load_checkpoint`` wrapped).
"""

from __future__ import annotations

from .apply import REPLICA_DISPATCH, apply, attach, expert_groups, find_moe_layers
from .checkpoint import install_checkpoint_hooks, load_checkpoint, save_checkpoint
from .handle import CAPACITY_MODES, DeepSpeedMoEEPLB
from .initialize import SUPPORTED_ZERO_STAGES, initialize
from .routing import per_slot_capacity, routes_to_slots, split_routes_to_slots

__all__ = [
    "CAPACITY_MODES",
    "DeepSpeedMoEEPLB",
    "REPLICA_DISPATCH",
    "apply",
    "attach",
    "expert_groups",
    "find_moe_layers",
    "initialize",
    "install_checkpoint_hooks",
    "load_checkpoint",
    "per_slot_capacity",
    "routes_to_slots",
    "save_checkpoint",
    "SUPPORTED_ZERO_STAGES",
    "split_routes_to_slots",
]
