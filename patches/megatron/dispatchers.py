"""Seam: token dispatchers — one adapter per Megatron dispatcher class, and the routing onto slots.

The patch leaves a dispatcher's code alone: it rebuilds the layer's dispatcher for ``P`` physical
"experts" with ``S = P / EP`` local ones, and feeds it the ``[T, P]`` physical routing that
:func:`route_to_slots` makes from the router's logical ``[T, E]`` routing.

Owns :data:`ADAPTERS` (keyed by ``moe_token_dispatcher_type``; looked up by the dispatcher's exact class),
:func:`rebuild_dispatcher`; re-exports the pure :func:`route_to_slots` and its per-placement :class:`SlotTables`
(:mod:`megatron_eplb.slot_routing`: the torch functions, and the fused Triton kernels on CUDA).

A new dispatcher: one :class:`DispatcherAdapter` entry in :data:`ADAPTERS` naming its class; give it its own
``rebuild`` when its constructor differs from ``(num_local, local_expert_indices, config=, pg_collection=)``.
(CPU shims a dispatcher needs live in ``cpu.py``.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_eplb.slot_routing import SlotTables, route_to_slots, slot_tables

from .compat import process_groups

__all__ = [
    "ADAPTERS",
    "SUPPORTED_DISPATCHERS",
    "DispatcherAdapter",
    "SlotTables",
    "rebuild_dispatcher",
    "route_to_slots",
    "slot_tables",
]


def _rebuild(layer: torch.nn.Module, num_slots: int, num_local: int, ep_rank: int):
    """A new token dispatcher of ``layer``'s class for ``num_slots`` physical "experts", ``num_local`` local
    (this rank's slots ``ep_rank * num_local ..``); the shared experts are carried over."""
    import copy

    old = layer.token_dispatcher
    config = copy.copy(layer.config)  # the dispatcher reads num_moe_experts from its config
    config.num_moe_experts = num_slots
    pgc = process_groups(ep=old.ep_group, expt_tp=old.tp_group, tp_ep=old.tp_ep_group)
    local = list(range(ep_rank * num_local, (ep_rank + 1) * num_local))
    new = type(old)(num_local, local, config=config, pg_collection=pgc)
    if getattr(old, "shared_experts", None) is not None:
        new.set_shared_experts(old.shared_experts)
    return new


@dataclass(frozen=True)
class DispatcherAdapter:
    """How the patch rebuilds one Megatron dispatcher class for physical slots."""

    name: str
    """The ``moe_token_dispatcher_type`` value, e.g. ``"alltoall"``."""
    class_name: str
    """The class in ``megatron.core.transformer.moe.token_dispatcher``."""
    rebuild: Callable[[torch.nn.Module, int, int, int], object] = _rebuild
    """``(layer, num_slots P, num_local S, ep_rank) -> dispatcher`` for ``P`` slots, ``S`` of them local."""

    def dispatcher_class(self) -> type | None:
        """The Megatron class (``None`` where this release lacks it)."""
        from megatron.core.transformer.moe import token_dispatcher

        return getattr(token_dispatcher, self.class_name, None)


ADAPTERS: dict[str, DispatcherAdapter] = {
    a.name: a
    for a in (
        DispatcherAdapter("allgather", "MoEAllGatherTokenDispatcher"),
        DispatcherAdapter("alltoall", "MoEAlltoAllTokenDispatcher"),
    )
}
SUPPORTED_DISPATCHERS = tuple(ADAPTERS)


def adapter_for(layer: torch.nn.Module) -> DispatcherAdapter | None:
    """The adapter of ``layer.token_dispatcher``'s exact class (a subclass is not assumed to behave alike)."""
    cls = type(layer.token_dispatcher)
    return next((a for a in ADAPTERS.values() if a.dispatcher_class() is cls), None)


def dispatcher_kind(layer: torch.nn.Module) -> str:
    """The dispatcher's ``moe_token_dispatcher_type`` name, or its class name when no adapter knows it."""
    adapter = adapter_for(layer)
    return adapter.name if adapter is not None else type(layer.token_dispatcher).__name__


def rebuild_dispatcher(layer: torch.nn.Module, num_slots: int, num_local: int, ep_rank: int):
    """``layer``'s dispatcher rebuilt for ``num_slots`` physical "experts", ``num_local`` of them local."""
    return adapter_for(layer).rebuild(layer, num_slots, num_local, ep_rank)
