"""Packing of expert copies onto ranks: longest-processing-time packing (vectorised across layers), the
``phy2log`` table of a packing, and the moves that keep an expert's copies on different ranks.

Terms as in :mod:`megatron_eplb.placement`: ``L`` layers, ``E`` logical experts, ``N`` ranks, ``P`` slots
per layer, ``S = P / N`` slots per rank, ``K`` items (expert copies) to place.  Pure numpy; Python loops run
over slots, copies or iterations, never over the experts of one layer.
"""

from __future__ import annotations

import numpy as np

__all__ = ["count_same_rank_duplicates", "lpt_pack", "phy2log_from_items", "separate_copies"]


def lpt_pack(
    item_weight: np.ndarray,
    item_expert: np.ndarray,
    num_experts: int,
    rank_capacity: np.ndarray,
    *,
    item_node: np.ndarray | None = None,
    rank_node: np.ndarray | None = None,
    order: np.ndarray | None = None,
) -> np.ndarray:
    """Longest-processing-time packing with equal slot counts, no two copies of one expert on a rank.

    Items are taken heaviest first (stable sort: ties keep item order); each goes to the least loaded rank
    with a free slot that does not yet hold its expert (if none exists, the least loaded rank with a free
    slot).  Items with ``item_node >= 0`` may only go to ranks of that node; the others go anywhere, but
    leave every node room for the bound items still to come.

    Args:
        item_weight: float ``[L, K]``; item_expert: int ``[L, K]``.
        rank_capacity: int ``[N]`` slots of each rank (0 for excluded ranks); sums to ``K``.
        item_node: optional int ``[L, K]`` (``-1`` = free); rank_node: int ``[N]``.
        order: optional int ``[L, K]``, the order to take the items in (default: heaviest first, stable).
    Returns:
        int64 ``[L, K]`` rank of each item.
    """
    num_layers, num_items = item_weight.shape
    num_ranks = len(rank_capacity)
    rows = np.arange(num_layers)
    if order is None:
        order = _argsort_descending(item_weight)
    if item_node is None or not (item_node >= 0).any():
        return _lpt_pack_free(item_weight, item_expert, num_experts, rank_capacity, order)
    load = np.zeros((num_layers, num_ranks))
    used = np.zeros((num_layers, num_ranks), dtype=np.int64)
    has = np.zeros((num_layers, num_ranks, num_experts + 1), dtype=bool)
    cap = np.broadcast_to(np.asarray(rank_capacity, dtype=np.int64), (num_layers, num_ranks))
    item_rank = np.full((num_layers, num_items), -1, dtype=np.int64)
    bound = item_node is not None and (item_node >= 0).any()
    if bound:
        num_nodes = int(rank_node.max()) + 1
        node_onehot = rank_node[None, :] == np.arange(num_nodes)[:, None]  # [nodes, N]
        free = np.broadcast_to(node_onehot @ np.asarray(rank_capacity), (num_layers, num_nodes)).copy()
        pending = np.stack([(item_node == n).sum(axis=1) for n in range(num_nodes)], axis=1)
    for t in range(num_items):
        i = order[:, t]
        e = item_expert[rows, i]
        room = used < cap
        if bound:
            b = item_node[rows, i]
            spare = ((free - pending) > 0)[:, rank_node]
            allowed = np.where(b[:, None] >= 0, rank_node[None, :] == b[:, None], spare)
            room &= allowed
        ok = room & ~has[rows, :, e]
        ok = np.where(ok.any(axis=1)[:, None], ok, room)
        r = np.where(ok, load, np.inf).argmin(axis=1)
        item_rank[rows, i] = r
        load[rows, r] += item_weight[rows, i]
        used[rows, r] += 1
        has[rows, r, e] = True
        if bound:
            free[rows, rank_node[r]] -= 1
            pending[rows, np.maximum(b, 0)] -= b >= 0
    return item_rank


def _lpt_pack_free(item_weight, item_expert, num_experts, rank_capacity, order) -> np.ndarray:
    """:func:`lpt_pack` without node constraints (the hot path of the global policy).

    Gives exactly the one-item-at-a-time result, but places several items of a layer per step.  With the
    layer's ranks sorted by (load, index), its next items

    - *spread*: go one each to the next ranks in that order, as long as each of those ranks can take its
      item and still sorts below every rank given an item in this step (items come heaviest first, so a
      step usually places a whole round of ``N`` items); else they
    - *fill*: go to the least loaded rank, as long as it can take them and still sorts below the next rank
      (light items late in the packing; only the first may have other copies); weightless items, which
      leave every load as it is, fill the ranks in that order, each to the brim; else
    - the next item and the copies of its expert right after it go one each to the next ranks in that
      order that can take them (the least loaded rank holds that expert).

    A rank can take an item if it has room and does not hold the item's expert.  Loads are summed in the
    dtype of ``item_weight`` (float32 for the ``deepseek`` port, whose sums must be its own).
    """
    num_layers, num_items = item_weight.shape
    num_ranks = len(rank_capacity)
    cap = np.asarray(rank_capacity, dtype=np.int64)
    n_spread, n_fill = min(num_ranks, num_items), min(int(cap.max()), num_items)
    width = max(n_spread, n_fill)  # most items one step places in a layer
    step = np.arange(width)
    # Flat arrays: item t of layer l at l*padded + t (heaviest first, then `width` dummy items of expert E);
    # rank r of layer l at l*N + r.
    padded = num_items + width
    rows = np.arange(num_layers)[:, None]
    flat_order = (order + rows * num_items).ravel()
    dtype = np.result_type(item_weight.dtype, np.float32)
    w_sorted = np.zeros((num_layers, padded), dtype=dtype)
    w_sorted[:, :num_items] = item_weight.ravel()[flat_order].reshape(num_layers, num_items)
    w_sorted = w_sorted.ravel()
    e_sorted = np.full((num_layers, padded), num_experts, dtype=np.int64)
    e_sorted[:, :num_items] = item_expert.ravel()[flat_order].reshape(num_layers, num_items)
    # has[l, m, r] (flat (l*(M+2) + m)*N + r): rank r holds the m-th expert with several items in layer l.
    # Experts with one item cannot be held before it is placed: they share row M (kept all False); the dummy
    # items use row M+1, which every rank holds.
    items_of = np.bincount(
        (e_sorted + rows * (num_experts + 1)).ravel(), minlength=num_layers * (num_experts + 1)
    )
    several = items_of.reshape(num_layers, num_experts + 1) > 1
    several[:, num_experts] = False
    num_several = int(several.sum(axis=1).max())
    row_of = np.where(several, np.cumsum(several, axis=1) - 1, num_several)
    row_of[:, num_experts] = num_several + 1
    item_row = np.take_along_axis(row_of, e_sorted, axis=1)
    single = (item_row == num_several).ravel()  # the item's expert has no other item
    holder_at = ((item_row + rows * (num_several + 2)) * num_ranks).ravel()  # + rank: where has[...] is
    e_sorted = e_sorted.ravel()
    has = np.zeros((num_layers, num_several + 2, num_ranks), dtype=bool)
    has[:, num_several + 1] = True
    has = has.ravel()
    room = np.repeat(cap[None, :], num_layers, axis=0)  # [L, N] free slots
    load = np.zeros((num_layers, num_ranks), dtype=dtype)
    rank_sorted = np.empty(num_layers * padded, dtype=np.int64)
    placed = np.zeros(num_layers, dtype=np.int64)  # [L] items placed so far
    rank_at, item_at = rows * num_ranks, rows * padded + step
    while placed.min() < num_items:
        key = np.where(room > 0, load, np.inf)
        ranked = np.argsort(key, axis=1, kind="stable")  # [L, N] ranks by (load, index)
        key_ranked = key.ravel()[ranked + rank_at]
        room_ranked = room.ravel()[ranked + rank_at]
        item = item_at + placed[:, None]  # [L, width] flat positions of the next items
        w, has_at = w_sorted[item], holder_at[item]  # + rank: does the rank hold the item's expert
        # Spread: item j -> ranked[j], below every ranked[< j] after its item.
        key_s, room_s = key_ranked[:, :n_spread], room_ranked[:, :n_spread]
        ok = (room_s > 0) & ~has[has_at[:, :n_spread] + ranked[:, :n_spread]]
        after = np.where(room_s > 1, key_s + w[:, :n_spread], np.inf)
        ok[:, 1:] &= key_s[:, 1:] < np.minimum.accumulate(after, axis=1)[:, :-1]
        count = _leading_true(ok)  # [L] items the step places
        dest = ranked[:, np.minimum(step, num_ranks - 1)]  # [L, width] their ranks
        # The other rules, for the layers where spread places at most one item or weightless items are next.
        slow = np.nonzero((placed < num_items) & ((count <= 1) | (w[:, 0] == 0)))[0]
        fill = slow[(count[slow] <= 1) & (w[slow, 0] > 0)]  # (fill and spread agree on the first item)
        if len(fill):  # item j -> ranked[0], its load summed item by item as one at a time would
            least = ranked[fill, :1]
            fill_key = np.cumsum(np.concatenate([key_ranked[fill, :1], w[fill, :n_fill]], axis=1), axis=1)
            ok = (room_ranked[fill, :1] > step[:n_fill]) & ~has[has_at[fill, :n_fill] + least]
            ok[:, 1:] &= single[item[fill, 1:n_fill]]
            if num_ranks > 1:
                next_key, before = key_ranked[fill, 1:2], fill_key[:, :-1]
                ok &= (before < next_key) | ((before == next_key) & (least < ranked[fill, 1:2]))
            fill_count = _leading_true(ok)
            more = fill_count > 1
            fill, least, fill_load = fill[more], least[more, 0], fill_key[more, fill_count[more]]
            count[fill], dest[fill] = fill_count[more], least[:, None]
        zero = slow[w[slow, 0] == 0]
        if len(zero):  # weightless: the ranks in order, each to the brim
            full_at = np.cumsum(room_ranked[zero], axis=1)  # [z, N] items placed once ranked[i] is full
            position = (full_at[:, :, None] <= step).sum(axis=1)  # [z, width] position of each item's rank
            to = np.take_along_axis(ranked[zero], np.minimum(position, num_ranks - 1), axis=1)
            ok = ~has[has_at[zero] + to]
            ok[:, 1:] &= single[item[zero, 1:]]
            zero_count = _leading_true(ok)
            more = zero_count > count[zero]
            count[zero[more]], dest[zero[more]] = zero_count[more], to[more]
        stuck = slow[count[slow] == 0]
        if len(stuck):  # the next item and its copies right after it: the next ranks that can take them
            cannot = has[has_at[stuck, :1] + ranked[stuck]] | (room_ranked[stuck] == 0)  # [stuck, N]
            can_first = np.argsort(cannot, axis=1, kind="stable")[:, :n_spread]
            dest[stuck, :n_spread] = np.take_along_axis(ranked[stuck], can_first, axis=1)
            copies = _leading_true(e_sorted[item[stuck]] == e_sorted[item[stuck, :1]])
            # (no rank can take it: the least loaded rank with room gets a second copy)
            count[stuck] = np.maximum(np.minimum(copies, num_ranks - cannot.sum(axis=1)), 1)
        take = step < count[:, None]
        rank_sorted[item[take]] = dest[take]
        has[(has_at + dest)[take]] = True
        has.reshape(num_layers, num_several + 2, num_ranks)[:, num_several] = False
        dest_at = (dest + rank_at)[take]
        room -= np.bincount(dest_at, minlength=room.size).reshape(room.shape)
        load.ravel()[dest_at] += w[take]  # (a filled rank gets its sum below; weightless items add 0)
        if len(fill):
            load[fill, least] = fill_load
        placed += count
    item_rank = np.empty((num_layers, num_items), dtype=np.int64)
    item_rank.ravel()[flat_order] = rank_sorted.reshape(num_layers, padded)[:, :num_items].ravel()
    return item_rank


def _leading_true(mask: np.ndarray) -> np.ndarray:
    """int64 ``[L]``: how many entries at the start of each row of bool ``[L, W]`` are all True."""
    return np.where(mask.all(axis=1), mask.shape[1], mask.argmin(axis=1))


def _argsort_descending(values: np.ndarray) -> np.ndarray:
    """``np.argsort(-values, axis=1, kind="stable")`` (ties keep their order) for float ``[L, K]``, about twice
    as fast: numpy's unstable sort ranks the distinct values, its radix sort orders by rank."""
    num_rows, num_items = values.shape
    flat_order = np.argsort(-values, axis=1) + (np.arange(num_rows) * num_items)[:, None]  # ties in any order
    ranked = values.ravel()[flat_order]
    new_value = np.ones(ranked.shape, dtype=bool)
    new_value[:, 0] = False
    np.not_equal(ranked[:, 1:], ranked[:, :-1], out=new_value[:, 1:])
    value_rank = np.empty(values.size, dtype=np.min_scalar_type(num_items))  # 0 for the largest value, ...
    value_rank[flat_order.ravel()] = new_value.cumsum(axis=1).ravel()
    return np.argsort(value_rank.reshape(values.shape), axis=1, kind="stable")


def _argsort_small_ints(values: np.ndarray, max_value: int) -> np.ndarray:
    """``np.argsort(values, axis=1, kind="stable")`` for ints in ``[0, max_value]``, in the narrowest dtype
    (numpy radix-sorts 8- and 16-bit ints, several times faster than its merge sort)."""
    return np.argsort(values.astype(np.min_scalar_type(max_value)), axis=1, kind="stable")


def phy2log_from_items(item_rank: np.ndarray, item_expert: np.ndarray, num_ranks: int, slots_per_rank: int):
    """Lay items out into slots: rank ``r``'s items fill slots ``r*S .. r*S+S-1`` in item order.

    Args:
        item_rank, item_expert: int ``[L, K]``; every rank gets ``S`` or 0 items.
    Returns:
        int64 ``[L, N * S]`` (``-1`` on ranks with no items).
    """
    num_layers, num_items = item_rank.shape
    order = _argsort_small_ints(item_rank, num_ranks)
    sorted_rank = np.take_along_axis(item_rank, order, axis=1)
    sorted_expert = np.take_along_axis(item_expert, order, axis=1)
    # Position within the rank: index minus the index where this rank's run starts.
    idx = np.broadcast_to(np.arange(num_items), order.shape)
    starts = np.where(np.diff(sorted_rank, axis=1, prepend=-1) != 0, idx, 0)
    pos = idx - np.maximum.accumulate(starts, axis=1)
    out = np.full((num_layers, num_ranks * slots_per_rank), -1, dtype=np.int64)
    rows = np.broadcast_to(np.arange(num_layers)[:, None], order.shape)
    out[rows, sorted_rank * slots_per_rank + pos] = sorted_expert
    return out


def separate_copies(
    phy2log: np.ndarray, load: np.ndarray, num_ranks: int, rank_node: np.ndarray
) -> np.ndarray:
    """Move second copies of an expert off their rank: each is swapped with the slot of another rank of the same
    node whose expert neither rank then holds twice, the closest per-copy load first.

    LPT packing can leave one: its last free slot may be on the one rank that holds the item's expert.  Such a
    swap always exists while the expert has at most as many copies on the node as the node has ranks.  A loop
    over the extra copies (rare), not over experts.

    Args:
        phy2log: int ``[L, P]`` (``-1`` empty); load: float ``[L, E]``; rank_node: int ``[N]``.
    Returns:
        int64 ``[L, P]``, slots permuted within nodes.
    """
    num_layers, num_slots = phy2log.shape
    spr = num_slots // num_ranks
    slot_rank = np.arange(num_slots) // spr
    out = np.array(phy2log, dtype=np.int64)
    per_rank = np.sort(out.reshape(num_layers, num_ranks, spr), axis=2)
    dup_layers = np.nonzero(
        ((per_rank[:, :, 1:] == per_rank[:, :, :-1]) & (per_rank[:, :, 1:] >= 0)).any(axis=(1, 2))
    )[0]
    for layer in dup_layers:
        row = out[layer]
        counts = np.bincount(row[row >= 0], minlength=load.shape[1])
        per_copy = load[layer] / np.maximum(counts, 1)
        for _ in range(num_slots):
            held = np.zeros((num_ranks, load.shape[1] + 1), dtype=np.int64)
            np.add.at(held, (slot_rank, np.where(row >= 0, row, load.shape[1])), 1)
            held[:, -1] = 0
            second = np.nonzero(held[slot_rank, np.where(row >= 0, row, load.shape[1])] > 1)[0]
            if len(second) == 0:
                break
            a = second[-1]
            x, r = row[a], slot_rank[a]
            y = np.where(row >= 0, row, load.shape[1])
            ok = (rank_node[slot_rank] == rank_node[r]) & (slot_rank != r) & (row >= 0)
            ok &= (held[slot_rank, x] == 0) & (held[r, y] == 0)
            if not ok.any():
                break
            b = np.where(ok, np.abs(per_copy[np.where(row >= 0, row, 0)] - per_copy[x]), np.inf).argmin()
            row[a], row[b] = row[b], x
    return out


def count_same_rank_duplicates(phy2log: np.ndarray, num_ranks: int) -> int:
    """Copies beyond the first of one expert on one rank, summed over layers and ranks."""
    num_layers, num_slots = phy2log.shape
    per_rank = np.sort(phy2log.reshape(num_layers, num_ranks, num_slots // num_ranks), axis=2)
    return int(((per_rank[:, :, 1:] == per_rank[:, :, :-1]) & (per_rank[:, :, 1:] >= 0)).sum())
