"""The routing of DeepSpeed's gate onto physical slots: pure functions over tensors (no DeepSpeed import).

DeepSpeed's ``TopKGate`` (``sparse_routes=True``, what ``MOELayer`` asks for) describes each of the ``k``
routes of each of the ``T`` tokens by three ``[k, T]`` tensors: the logical expert (``-1`` where the
capacity, or ``used_token``, dropped the route), the route's row in that expert's capacity buffer
(``location``, ``< C``) and its combine weight.  ``MOELayer`` then builds an ``[E, C, M]`` buffer, sends it
through an all-to-all over the expert-parallel group, runs the experts and brings ``[E, C, M]`` back.

With EPLB the same ``MOELayer`` code runs for ``P`` physical slots: :func:`routes_to_slots` turns the
logical ``(expert, location)`` of every kept route into a ``(slot, row)`` of an ``[P, C, M]`` buffer.  The
gate's decision is kept exactly (which routes are kept, their weights, the capacity ``C``): only where a
token's row lives changes, so the layer computes the same function.  :func:`per_slot_capacity` is the
option that changes the math: each physical slot gets its own capacity.

Shapes: ``k`` routes per token, ``T`` tokens, ``E`` logical experts, ``P`` physical slots, ``C`` rows per
capacity buffer, ``R`` the most copies of one expert.
"""

from __future__ import annotations

import torch

__all__ = ["expert_counts", "per_slot_capacity", "routes_to_slots", "slot_counts", "split_routes_to_slots"]


def routes_to_slots(
    indices: torch.Tensor,
    locations: torch.Tensor,
    log2phy: torch.Tensor,
    replica_count: torch.Tensor,
    *,
    offset: int = 0,
    local_slot: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map the gate's logical routes to physical slots and rows (a pure function).

    Even split (the default): the route in row ``l`` of expert ``e``'s buffer goes to copy
    ``(l + offset) % c_e`` of ``e``, row ``l // c_e`` there, so the ``c_e`` copies share ``e``'s rows evenly
    (the same round-robin as the Megatron path's ``route_to_slots``: rows are in token order).  Rows of one
    copy are distinct and ``< C`` (``l < C``), so every kept route has its own row in an ``[P, C]`` buffer.
    ``local_first``: a route of ``e`` goes to ``local_slot[e]`` (row ``l``) where that is ``>= 0``.

    Args:
        indices: int ``[k, T]`` logical expert of each route, ``-1`` = not routed (dropped).
        locations: int ``[k, T]`` row of each route in its expert's capacity buffer.
        log2phy: int64 ``[E, R]`` slots of each expert (``-1`` padded, ascending).
        replica_count: int64 ``[E]`` copies of each expert (``>= 1``).
        offset: round-robin start (the EP rank, so every rank's leftover rows spread over the copies).
        local_slot: optional int64 ``[E]``: a slot of this rank holding the expert, else ``-1``.
    Returns:
        slot int64 ``[k, T]`` (``-1`` where not routed) and row int64 ``[k, T]`` (0 where not routed).
    """
    routed = indices >= 0
    expert = indices.long().clamp(min=0)
    row = locations.long()
    copies = replica_count[expert]  # [k, T]
    copy = (row + offset) % copies
    slot = log2phy[expert, copy]
    row_in_copy = row // copies
    if local_slot is not None:
        mine = local_slot[expert]
        local = mine >= 0
        slot = torch.where(local, mine, slot)
        row_in_copy = torch.where(local, row, row_in_copy)
    slot = torch.where(routed, slot, torch.full_like(slot, -1))
    row_in_copy = torch.where(routed, row_in_copy, torch.zeros_like(row_in_copy))
    return slot, row_in_copy


def split_routes_to_slots(
    indices: torch.Tensor,
    locations: torch.Tensor,
    log2phy: torch.Tensor,
    first: torch.Tensor,
    bounds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map the gate's routes to slots and rows by per-batch shares (``balanced`` dispatch; a pure function).

    Every source rank's kept routes of expert ``e`` are laid end to end in rank order; the route in row
    ``l`` of this rank's buffer of ``e`` has global position ``g = first[e] + l`` and goes to the copy whose
    run of positions holds ``g`` (``bounds``, from :func:`megatron_eplb.replica_split.copy_bounds`), in row
    ``g - max(run start, first[e])`` of that copy's buffer: the routes this rank sends one copy are a
    contiguous piece of its rows ``0 .. k_e - 1``, so their rows there are distinct and ``< C`` (``l < C``).
    DeepSpeed's gates number the kept routes of an expert ``0 .. k_e - 1`` (first choices first), so the
    copies receive exactly the shares ``bounds`` was made from.  The gate's decision (kept routes, weights,
    capacity) is untouched.

    Args:
        indices: int ``[k, T]`` logical expert of each route, ``-1`` = dropped.
        locations: int ``[k, T]`` row of each route in its expert's capacity buffer.
        log2phy: int64 ``[E, R]`` slots of each expert (``-1`` padded, ascending).
        first: int64 ``[E]`` global position of this rank's first route of each expert
            (:func:`megatron_eplb.replica_split.source_offsets` of every rank's :func:`expert_counts`).
        bounds: int64 ``[E, R - 1]`` exclusive ends of copies ``0 .. R-2``' runs.
    Returns:
        slot int64 ``[k, T]`` (``-1`` where not routed) and row int64 ``[k, T]`` (0 where not routed).
    """
    routed = indices >= 0
    expert = indices.long().clamp(min=0)
    g = first[expert] + locations.long()  # [k, T]
    ends = bounds[expert]  # [k, T, R - 1]
    copy = (ends <= g.unsqueeze(-1)).sum(dim=-1)  # [k, T]
    start = torch.cat(
        [torch.zeros_like(bounds[:, :1]), bounds], dim=1
    )  # [E, R]: where each copy's run starts
    row = g - torch.maximum(start[expert, copy], first[expert])
    slot = log2phy[expert, copy]
    slot = torch.where(routed, slot, torch.full_like(slot, -1))
    row = torch.where(routed, row, torch.zeros_like(row))
    return slot, row


def expert_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 ``[E]``: kept routes of each logical expert in ``indices`` (int ``[k, T]``, ``-1`` = dropped)."""
    return slot_counts(indices, num_experts)[1:]


def per_slot_capacity(
    slot: torch.Tensor, row: torch.Tensor, gates: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give every physical slot its own capacity: drop the routes whose row in their slot is ``>= capacity``.

    With the even split a slot's rows are its expert's rows in order, so an expert with ``c_e`` copies keeps
    its first ``c_e * capacity`` rows (first choices before second choices, then token order): a hot expert
    with copies drops fewer tokens; an expert with one copy drops exactly the rows past ``capacity``.  The
    combine weights of a token are renormalised over its kept routes as DeepSpeed does for ``k >= 2``
    (``k = 1`` keeps the raw gate value).

    Args:
        slot: int64 ``[k, T]`` (``-1`` = not routed), row: int64 ``[k, T]`` (from :func:`routes_to_slots`
            applied to the gate's routing *without* capacity).
        gates: float ``[k, T]`` combine weights of the routes.
        capacity: rows of each slot's buffer.
    Returns:
        slot, row, gates of the same shapes with the routes past the capacity dropped.
    """
    keep = (slot >= 0) & (row < capacity)
    slot = torch.where(keep, slot, torch.full_like(slot, -1))
    row = torch.where(keep, row, torch.zeros_like(row))
    kept = gates * keep
    if gates.shape[0] > 1:
        denom = kept.sum(dim=0, keepdim=True).clamp(min=torch.finfo(kept.dtype).eps)
        kept = kept / denom
    return slot, row, kept


def slot_counts(slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    """int64 ``[P + 1]``: routes sent to each slot, shifted by one (column 0 counts the unrouted ones).

    A scatter-add, no host sync (``torch.bincount`` syncs on CUDA to size its output)."""
    flat = (slot.reshape(-1) + 1).long()
    out = torch.zeros(num_slots + 1, dtype=torch.int64, device=slot.device)
    return out.index_add_(0, flat, torch.ones_like(flat))
