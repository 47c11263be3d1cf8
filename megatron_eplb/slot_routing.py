"""The routing of (token, logical expert) pairs onto physical slots, in every MoE layer's forward: the router's
logical ``[T, E]`` probs and routing map become the ``[T, P]`` ones a dispatcher built for ``P`` slots reads.

Pure torch (no Megatron, no DeepSpeed): :class:`SlotTables` (one layer's placement as the routing reads it,
made once per placement by :func:`slot_tables`), :func:`route_to_slots_torch` (the torch functions: 14-15 small
kernels on CUDA) and :func:`route_to_slots`, which runs the fused Triton kernels of
:mod:`megatron_eplb.slot_routing_triton` (bitwise the same outputs and gradient; a count and the routing
forward, one kernel backward) on CUDA where triton imports and the shapes fit, else the torch functions.  Which
path runs is logged once per process (and per reason); a fused launch that fails is logged and the torch path
runs from then on.
Neither path syncs with the host or decides anything from tensor values, so both can be captured in a CUDA
graph; inside a capture the kernels run only once they have run outside one (triton compiles at a first launch).

:func:`count_pairs` is the count a caller that needs the batch's pairs per expert first (the balanced split)
makes, handed on to :func:`route_to_slots` so that the map is counted once.

``patches/megatron/dispatchers.py`` re-exports these names (where they lived before).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

__all__ = [
    "PairCounts",
    "SlotTables",
    "count_pairs",
    "route_to_slots",
    "route_to_slots_torch",
    "routing_table",
    "slot_tables",
]


class SlotTables(NamedTuple):
    """One layer's placement as :func:`route_to_slots` reads it (made by :func:`slot_tables`, once per placement).

    Attributes:
        fixed: int64 ``[E]`` the slot every pair of expert ``e`` goes to when that does not depend on the pair
            (one copy, or ``local_slot``); for a spread expert its first copy (never read).
        spread: int64 ``[K]`` the experts whose pairs are spread over their copies (ascending).
        spread_slots: int64 ``[K, C]`` their slots (``log2phy`` rows, ``-1`` padded).
        spread_count: int64 ``[K, 1]`` their copies.
        table: optional int32 ``[2P + E]`` the fused routing's slot table (:func:`routing_table`), made with the
            tables when ``P`` is given (else the count kernel makes it in every forward).
    """

    fixed: torch.Tensor
    spread: torch.Tensor
    spread_slots: torch.Tensor
    spread_count: torch.Tensor
    table: torch.Tensor | None = None


def slot_tables(
    log2phy: torch.Tensor,
    replica_count: torch.Tensor,
    local_slot: torch.Tensor | None = None,
    *,
    spread: torch.Tensor | None = None,
    num_slots: int | None = None,
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
        num_slots: ``P``; given, the tables carry their :func:`routing_table` (made once here, not per forward).
    """
    fixed = log2phy[:, 0]
    if local_slot is not None:
        fixed = torch.where(local_slot >= 0, local_slot, fixed)
    if spread is None:
        several = replica_count > 1
        if local_slot is not None:
            several &= local_slot < 0
        spread = several.nonzero().flatten()
    tables = SlotTables(
        fixed.contiguous(),
        spread,
        log2phy.index_select(0, spread),
        replica_count.index_select(0, spread).unsqueeze(1),
    )
    return tables if num_slots is None else tables._replace(table=routing_table(tables, num_slots))


def routing_table(tables: SlotTables, num_slots: int) -> torch.Tensor:
    """The fused routing's slot table of a placement (pure torch, no host sync; what the count kernel writes).

    Args:
        tables: the layer's :class:`SlotTables` (``E`` experts, ``K`` spread, ``C`` most copies).
        num_slots: ``P``.
    Returns:
        int32 ``[2P + E]``: the expert of each slot (``-1``: none receives pairs: an empty slot, or a copy that
        a ``local_slot`` leaves out), each slot's spread index ``k`` (``-1``: not a spread expert's copy), and
        each expert's ``k`` (``-1``: not spread).
    """
    fixed, spread, spread_slots, spread_count = tables[:4]
    num_spread, copies = spread_slots.shape
    device = fixed.device
    k_of = torch.arange(num_spread, device=device)
    spread_of = torch.full_like(fixed, -1).index_copy_(0, spread, k_of)  # [E]
    # A slot index of P collects whatever is not a slot, dropped below.
    one = torch.where((spread_of < 0) & (fixed >= 0) & (fixed < num_slots), fixed, num_slots)  # [E]
    live = torch.arange(copies, device=device) < spread_count  # [K, C]
    copy = torch.where(live & (spread_slots >= 0) & (spread_slots < num_slots), spread_slots, num_slots)
    owner = torch.full((num_slots + 1,), -1, dtype=torch.int64, device=device)
    owner.scatter_(0, one, torch.arange(fixed.shape[0], device=device))
    owner.scatter_(0, copy.flatten(), spread.unsqueeze(1).expand(num_spread, copies).flatten())
    k_of_slot = torch.full((num_slots + 1,), -1, dtype=torch.int64, device=device)
    k_of_slot.scatter_(0, copy.flatten(), k_of.unsqueeze(1).expand(num_spread, copies).flatten())
    return torch.cat([owner[:num_slots], k_of_slot[:num_slots], spread_of]).to(torch.int32)


class PairCounts(NamedTuple):
    """One batch's (token, expert) pairs per expert, from :func:`count_pairs`.

    Attributes:
        counts: int64 ``[E]`` pairs of each expert (every pair the dispatcher sends).
        blocks: int32 ``[E, B]`` pairs per block of tokens, read by the fused routing (``None`` on the torch path).
        table: int32 ``[2P + E]`` the fused routing's slot tables (``None`` on the torch path).
    """

    counts: torch.Tensor
    blocks: torch.Tensor | None = None
    table: torch.Tensor | None = None


def count_pairs(
    routing_map: torch.Tensor, tables: SlotTables, num_slots: int, *, record: torch.Tensor | None = None
) -> PairCounts:
    """The pairs of each expert in ``routing_map`` (bool ``[T, E]``), and what the fused routing of the same map
    reads (pass the result to :func:`route_to_slots` as ``counted``): one count kernel on CUDA where the fused
    kernels run, else ``routing_map.sum(0)``.  ``record``: an int64 ``[E]`` buffer the counts are also added into
    (in place, so capturable).  No host sync."""
    fused = None
    if routing_map.is_cuda and not _FUSED_FAILED:
        fused = _fused_kernels(None, routing_map, tables, num_slots, None, log=False)
        if fused is not None and torch.cuda.is_current_stream_capturing():
            fused = fused if fused.count_compiled(routing_map, tables, num_slots) else None
    if fused is not None:
        try:
            return PairCounts(*fused.count_pairs(routing_map, tables, num_slots, record))
        except Exception as exc:  # noqa: BLE001 - the torch sum computes the same counts
            if torch.cuda.is_current_stream_capturing():
                raise
            _give_up(exc)
    counts = routing_map.sum(dim=0, dtype=torch.int64)
    if record is not None:
        record.add_(counts)
    return PairCounts(counts)


def route_to_slots(
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    tables: SlotTables,
    num_slots: int,
    *,
    offset: int = 0,
    split: tuple[torch.Tensor, torch.Tensor] | None = None,
    counted: PairCounts | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map logical routing to physical slots: :func:`route_to_slots_torch`'s result (its docstring has the
    rules and arguments), by the fused kernels on CUDA where they run (bitwise equal, the gradient of ``probs``
    too), else by the torch functions.  No host sync; capturable in a CUDA graph.  ``counted``: this map's
    :func:`count_pairs`, when the caller counted it already (the fused path then skips its own count).

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
                if counted is not None and counted.blocks is None:
                    counted = None  # counted by the torch path: the fused routing counts its own blocks
                try:
                    out = fused.route_to_slots(
                        probs, routing_map, tables, num_slots, offset=offset, split=split, counted=counted
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


def _fused_kernels(probs, routing_map, tables, num_slots: int, split, log: bool = True):
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
    if log:
        _log("fused Triton kernels (a count and the routing forward, one backward)")
    return _FUSED


def _give_up(exc: Exception) -> None:
    global _FUSED_FAILED
    _FUSED_FAILED = True
    _log(f"the fused Triton kernels failed ({exc!r}); torch from now on", warn=True)
