"""Seam: token dispatchers — one adapter per Megatron dispatcher class, and the routing onto slots.

The patch leaves a dispatcher's code alone: it rebuilds the layer's dispatcher for ``P`` physical
"experts" with ``S = P / EP`` local ones, and feeds it the ``[T, P]`` physical routing that
:func:`route_to_slots` makes from the router's logical ``[T, E]`` routing.

Owns :data:`ADAPTERS` (keyed by ``moe_token_dispatcher_type``; looked up by the dispatcher's exact class),
:func:`rebuild_dispatcher` and the pure :func:`route_to_slots` with its per-placement :class:`SlotTables`.

A new dispatcher: one :class:`DispatcherAdapter` entry in :data:`ADAPTERS` naming its class; give it its own
``rebuild`` when its constructor differs from ``(num_local, local_expert_indices, config=, pg_collection=)``.
(CPU shims a dispatcher needs live in ``cpu.py``.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

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


class SlotTables(NamedTuple):
    """One layer's placement as :func:`route_to_slots` reads it (made by :func:`slot_tables`, once per placement).

    Attributes:
        fixed: int64 ``[E]`` the slot every pair of expert ``e`` goes to when that does not depend on the pair
            (one copy, or ``local_slot``); for a spread expert its first copy (never read).
        spread: int64 ``[K]`` the experts whose pairs are spread over their copies (ascending).
        spread_slots: int64 ``[K, C]`` their slots (``log2phy`` rows, ``-1`` padded).
        spread_count: int64 ``[K, 1]`` their copies.
    """

    fixed: torch.Tensor
    spread: torch.Tensor
    spread_slots: torch.Tensor
    spread_count: torch.Tensor


def slot_tables(
    log2phy: torch.Tensor,
    replica_count: torch.Tensor,
    local_slot: torch.Tensor | None = None,
    *,
    spread: torch.Tensor | None = None,
) -> SlotTables:
    """The :class:`SlotTables` of one layer's placement (pure; on the tensors' device).

    Args:
        log2phy: int64 ``[E, C]`` slots of each expert (``-1`` padded, ascending).
        replica_count: int64 ``[E]`` copies of each expert (>= 1).
        local_slot: optional int64 ``[E]``: the slot every pair of ``e`` goes to where it is ``>= 0``.
        spread: int64 ``[K]`` the experts to spread (ascending); default: those with several copies and no
            ``local_slot``, found with ``nonzero`` (a host sync on CUDA: build the tables on the host, once per
            placement).  Experts of one copy may be listed (their pairs all take copy 0), so per-batch tables
            made on the device pass every expert (then ``local_slot`` must be None).
    """
    fixed = log2phy[:, 0]
    if local_slot is not None:
        fixed = torch.where(local_slot >= 0, local_slot, fixed)
    if spread is None:
        several = replica_count > 1
        if local_slot is not None:
            several &= local_slot < 0
        spread = several.nonzero().flatten()
    return SlotTables(
        fixed.contiguous(),
        spread,
        log2phy.index_select(0, spread),
        replica_count.index_select(0, spread).unsqueeze(1),
    )


def route_to_slots(
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    tables: SlotTables,
    num_slots: int,
    *,
    offset: int = 0,
    split: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map logical routing to physical slots (a pure function, differentiable in ``probs``; no host sync, so
    it can be captured in a CUDA graph).

    A pair of an expert with one copy (or a ``local_slot``) goes to that slot.  The ``i``-th pair (in token
    order) of a spread expert ``e`` goes to copy ``(i + offset) % c_e``, or with ``split = (first, bounds)``
    (per-batch shares, :mod:`megatron_eplb.replica_split`) to copy ``#{c : bounds[e, c] <= first[e] + i}``.
    Only the ``K`` spread experts' columns are scanned; the outputs are made by one scatter each.

    Args:
        probs: ``[T, E]`` routing probabilities (those of unrouted pairs are dropped).
        routing_map: bool ``[T, E]``.
        tables: the layer's :class:`SlotTables` (``K`` spread experts).
        num_slots: ``P``.
        offset: round-robin start (the EP rank, so leftovers spread over copies).
        split: optional ``(first [E], bounds [E, C-1])`` int64: the global position of this rank's first pair
            of each expert, and where each copy's run of the expert's pairs ends
            (:func:`~megatron_eplb.replica_split.source_offsets`, :func:`~megatron_eplb.replica_split.copy_bounds`
            of shares that sum to the experts' global pairs: every position then falls in a real copy's run).
    Returns:
        probs ``[T, P]`` and bool routing map ``[T, P]``.
    """
    num_tokens, num_experts = routing_map.shape
    slot = tables.fixed.expand(num_tokens, num_experts)  # [T, E]
    spread = tables.spread
    if spread.numel():
        # Pairs so far [K, T] of the spread experts only: the scan runs along the contiguous last dim (CUDA's
        # scan over dim 0 of a [T, E] tensor took 1.5 ms per layer at T = 8192, E = 32 on an H200).
        pairs = routing_map.t().index_select(0, spread).cumsum(dim=1)  # int64: pair i has i + 1
        if split is None:
            copy = (pairs + (offset - 1)) % tables.spread_count
        else:
            first, bounds = split  # bounds[e, c] <= first[e] + i  <=>  bounds[e, c] - first[e] < i + 1
            copy = torch.searchsorted((bounds - first.unsqueeze(1)).index_select(0, spread), pairs)
        slot = slot.index_copy(1, spread, tables.spread_slots.gather(1, copy).t())
    # Every pair, routed or not, has a slot of its own expert (an unrouted pair: the copy of the pair before it,
    # or copy 0), so no two pairs of a token share a slot: one scatter each, unrouted pairs carrying False / 0
    # (their probs dropped: the gradient of probs is the slot's where routed, else 0, as a gather gives it).
    phys_map = routing_map.new_zeros(num_tokens, num_slots).scatter_(1, slot, routing_map)
    phys_probs = probs.new_zeros(num_tokens, num_slots).scatter_(1, slot, probs.where(routing_map, 0))
    return phys_probs, phys_map
