"""The routing of (token, logical expert) pairs onto physical slots, in every MoE layer's forward: the router's
logical ``[T, E]`` probs and routing map become the ``[T, P]`` ones a dispatcher built for ``P`` slots reads.

Pure torch (no Megatron, no DeepSpeed): :class:`SlotTables` (one layer's placement as the routing reads it,
made once per placement by :func:`slot_tables`), :func:`route_to_slots_torch` (the torch functions: 14-15 small
kernels on CUDA) and :func:`route_to_slots`, which runs the fused Triton kernels of
:mod:`megatron_eplb.slot_routing_triton` (bitwise the same outputs and gradient; two launches forward, one
backward) on CUDA where triton imports and the shapes fit, else the torch functions.  Which path runs is logged
once per process (and per reason); a fused launch that fails is logged and the torch path runs from then on.
Neither path syncs with the host or decides anything from tensor values, so both can be captured in a CUDA
graph; inside a capture the kernels run only once they have run outside one (triton compiles at a first launch).

``patches/megatron/dispatchers.py`` re-exports these names (where they lived before).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

__all__ = ["SlotTables", "route_to_slots", "route_to_slots_torch", "slot_tables"]


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
    """Map logical routing to physical slots: :func:`route_to_slots_torch`'s result (its docstring has the
    rules and arguments), by the fused kernels on CUDA where they run (bitwise equal, the gradient of ``probs``
    too), else by the torch functions.  No host sync; capturable in a CUDA graph.

    Returns:
        probs ``[T, P]`` and bool routing map ``[T, P]``.
    """
    if probs.is_cuda and not _FUSED_FAILED:
        fused = _fused_kernels(probs, routing_map, tables, num_slots, split)
        if fused is not None:
            capturing = torch.cuda.is_current_stream_capturing()
            if capturing and not fused.compiled(probs, tables, num_slots, split):
                _log("torch inside a CUDA-graph capture until the fused kernels have run outside one")
            else:
                try:
                    out = fused.route_to_slots(
                        probs, routing_map, tables, num_slots, offset=offset, split=split
                    )
                except Exception as exc:  # noqa: BLE001 - the torch path computes the same result
                    if capturing:
                        raise
                    _give_up(exc)
                else:
                    return out
    return route_to_slots_torch(probs, routing_map, tables, num_slots, offset=offset, split=split)


def route_to_slots_torch(
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    tables: SlotTables,
    num_slots: int,
    *,
    offset: int = 0,
    split: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map logical routing to physical slots with torch functions (a pure function, differentiable in ``probs``;
    no host sync, so it can be captured in a CUDA graph).

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


# ----------------------------------------------------------------------------------- the path choice
_FUSED_FAILED = False  # a fused launch failed in this process: the torch path from then on
_FUSED = None  # the kernels' module once imported; False where it cannot be used
_logged: set[str] = set()


def _log(what: str, warn: bool = False) -> None:
    """One log line per distinct message and process (as :mod:`megatron_eplb.kernel_paths` logs its paths)."""
    line = f"megatron-eplb: route_to_slots: {what}"
    if line in _logged:
        return
    _logged.add(line)
    log = logging.getLogger("megatron_eplb")
    (log.warning if warn else log.info)("%s", line)


def _fused_kernels(probs, routing_map, tables, num_slots: int, split):
    """The fused kernels' module when they take these shapes on CUDA, else ``None`` (the reason logged once)."""
    global _FUSED
    if _FUSED is None:  # imported once per process
        try:
            from . import slot_routing_triton as fused
        except Exception as exc:  # noqa: BLE001 - no kernels: the torch path computes the same result
            _log(f"torch (the fused kernels' module failed to import: {exc})")
            fused = False
        if fused and not fused.available():
            _log("torch (triton does not import)")
            fused = False
        _FUSED = fused
    if _FUSED is False:
        return None
    why = _FUSED.unfit(probs, routing_map, tables, num_slots, split)
    if why is not None:
        _log(f"torch for these shapes ({why})")
        return None
    _log("fused Triton kernels (two launches forward, one backward)")
    return _FUSED


def _give_up(exc: Exception) -> None:
    global _FUSED_FAILED
    _FUSED_FAILED = True
    _log(f"the fused Triton kernels failed ({exc!r}); torch from now on", warn=True)
