"""The Triton kernels of the fused routing onto slots; :mod:`megatron_eplb.slot_routing_triton` launches them
(sizes, fallbacks, autograd) and is the module to call.

Shapes as in :mod:`megatron_eplb.slot_routing`: ``T`` tokens, ``E`` logical experts, ``P`` slots, ``K`` spread
experts, ``C`` most copies (``spread_slots [K, C]``), ``C - 1`` split bounds per expert, ``B`` blocks of tokens.

1. :func:`count_kernel` (:func:`~megatron_eplb.slot_routing_triton.count_pairs`), one program per ``GROUP``
   blocks of tokens plus one for the tables: each block's pairs of every expert into int32 ``blocks [E, B]``, their sums into int64
   ``counts [E]`` (and into a caller's record buffer) by atomic adds.  The balanced split reads ``counts``
   before the routing (so a caller counts once, :class:`~megatron_eplb.slot_routing.PairCounts`).  The last
   program writes int32 ``table [2P + E]``: the expert of each slot (``-1``: none receives pairs: an empty slot,
   or a copy that a ``local_slot`` leaves out), whether that expert is spread (its ``k``, else ``-1``), and each
   expert's ``k`` (:func:`~megatron_eplb.slot_routing.routing_table`; tables made with ``num_slots`` carry it,
   and that program is not launched).
2. :func:`route_kernel`, one program per block of tokens.  First, for every spread expert, the number of its
   pairs before the block (a sum over ``blocks``) plus a scan inside it (``tl.cumsum`` with a running carry: as
   the torch ``cumsum``) gives each pair's position ``i``; the pair takes its copy (round-robin
   ``(i + offset) % count`` or the split's ``#{c : bounds[e, c] <= first[e] + i}``) and its slot goes into int32
   ``sel [K, T]`` (every token, routed or not, as the torch code's slot).  Then, after a barrier, whole rows of
   both outputs (zeros and the routed pairs, so no separate zero fill) as a gather: slot ``p`` of token ``t``
   holds expert ``e = table[p]``'s pair when it is routed and its slot is ``p`` (``sel[k, t] == p`` for a spread
   expert, always for the others: ``p`` is their one slot).
3. :func:`grad_kernel` (backward), one program per block of tokens: ``grad_probs[t, e] = grad[t, slot[t, e]]``
   where routed, else 0 (the torch code's ``scatter`` / ``where`` backward).

Triton is optional: this module imports without it (the kernels are then not defined);
:mod:`megatron_eplb.slot_routing_triton` imports them only where triton imports.
"""

try:  # CPU CI has no triton: everything below the guard is then never defined
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "no triton"
    triton = None
    tl = None

__all__ = ["count_kernel", "grad_kernel", "route_kernel"]


if triton is not None:
    # The sizes the count and the routing take: one compiled variant for all values (triton would specialize
    # integers equal to 1 or divisible by 16).
    _SIZES = ["num_tokens", "num_experts", "num_spread", "copies", "num_slots", "block_tokens", "num_blocks"]

    @triton.jit(do_not_specialize=_SIZES)
    def count_kernel(
        map_ptr,  # uint8 [T, E]
        counts_ptr,  # int64 [E], zeroed: added into
        blocks_ptr,  # int32 [E, B], written
        record_ptr,  # int64 [E]: added into (RECORD)
        fixed_ptr,  # int [E]
        spread_ptr,  # int [K]
        spread_slots_ptr,  # int [K, C]
        count_ptr,  # int [K] (the [K, 1] column)
        table_ptr,  # int32 [2P + E], written
        num_tokens,
        num_experts,
        num_spread,
        copies,  # C
        num_slots,  # P
        block_tokens,
        num_blocks,  # B
        RECORD: tl.constexpr,
        GROUP: tl.constexpr,
        SCAN_T: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_E: tl.constexpr,
        C_P: tl.constexpr,
        K_BLOCK: tl.constexpr,
    ):
        g = tl.program_id(0)
        if g * GROUP < num_blocks:
            # Blocks g * GROUP ... of GROUP: each one's pairs of every expert (its tokens in SCAN_T steps) into
            # its row of blocks, their sum into the totals (one atomic add per expert and program).
            b = g * GROUP + tl.arange(0, GROUP)
            s = tl.arange(0, SCAN_T)
            e0 = 0
            while e0 < num_experts:
                e = e0 + tl.arange(0, BLOCK_E)
                in_e = e < num_experts
                acc = tl.zeros([GROUP, BLOCK_E], dtype=tl.int32)
                t0 = 0
                while t0 < block_tokens:
                    t = b[:, None] * block_tokens + t0 + s[None, :]  # [GROUP, SCAN_T]
                    live = ((b < num_blocks)[:, None] & (t < num_tokens))[:, :, None] & in_e[None, None, :]
                    hit = tl.load(
                        map_ptr + t[:, :, None] * num_experts + e[None, None, :], mask=live, other=0
                    )
                    acc += tl.sum(hit.to(tl.int32), axis=1)
                    t0 += SCAN_T
                tl.store(
                    blocks_ptr + e[None, :] * num_blocks + b[:, None],
                    acc,
                    mask=(b < num_blocks)[:, None] & in_e[None, :],
                )
                total = tl.sum(acc, axis=0).to(tl.int64)
                some = in_e & (total > 0)
                tl.atomic_add(counts_ptr + e, total, mask=some, sem="relaxed")
                if RECORD:
                    tl.atomic_add(record_ptr + e, total, mask=some, sem="relaxed")
                e0 += BLOCK_E
        else:
            # The tables: each slot's expert and spread index, each expert's spread index (K_BLOCK spread
            # experts at a time).
            c = tl.arange(0, C_P)
            kb = tl.arange(0, K_BLOCK)
            p0 = 0
            while p0 < num_slots:
                p = p0 + tl.arange(0, BLOCK_P)
                owner = tl.full([BLOCK_P], -1, dtype=tl.int64)
                e0 = 0
                while e0 < num_experts:  # experts that are not spread: their one slot
                    e = e0 + tl.arange(0, BLOCK_E)
                    in_e = e < num_experts
                    slot = tl.load(fixed_ptr + e, mask=in_e, other=-1).to(tl.int64)
                    one = in_e
                    j0 = 0
                    while j0 < num_spread:
                        sp = tl.load(spread_ptr + j0 + kb, mask=j0 + kb < num_spread, other=-1)
                        one = one & (tl.max((sp[None, :] == e[:, None]).to(tl.int32), axis=1) == 0)
                        j0 += K_BLOCK
                    mine = (slot[None, :] == p[:, None]) & one[None, :]
                    owner = tl.maximum(owner, tl.max(tl.where(mine, e[None, :].to(tl.int64), -1), axis=1))
                    e0 += BLOCK_E
                spread_of = tl.full([BLOCK_P], -1, dtype=tl.int64)
                j0 = 0
                while j0 < num_spread:  # spread experts: their first `count` copies
                    j = j0 + kb
                    in_j = j < num_spread
                    n = tl.load(count_ptr + j, mask=in_j, other=0)
                    sp = tl.load(spread_ptr + j, mask=in_j, other=-1).to(tl.int64)
                    live = in_j[:, None] & (c[None, :] < copies) & (c[None, :] < n[:, None])
                    slots = tl.load(spread_slots_ptr + j[:, None] * copies + c[None, :], mask=live, other=-1)
                    hit = slots[None, :, :].to(tl.int64) == p[:, None, None]  # [BLOCK_P, K_BLOCK, C_P]
                    mine = tl.max(hit.to(tl.int32), axis=2) > 0  # [BLOCK_P, K_BLOCK]
                    k_of = tl.max(tl.where(mine, j[None, :].to(tl.int64), -1), axis=1)
                    e_of = tl.max(tl.where(mine, sp[None, :], -1), axis=1)
                    owner = tl.where(k_of >= 0, e_of, owner)
                    spread_of = tl.where(k_of >= 0, k_of, spread_of)
                    j0 += K_BLOCK
                in_p = p < num_slots
                tl.store(table_ptr + p, owner.to(tl.int32), mask=in_p)
                tl.store(table_ptr + num_slots + p, spread_of.to(tl.int32), mask=in_p)
                p0 += BLOCK_P
            e0 = 0
            while e0 < num_experts:
                e = e0 + tl.arange(0, BLOCK_E)
                spread_of = tl.full([BLOCK_E], -1, dtype=tl.int64)
                j0 = 0
                while j0 < num_spread:
                    j = j0 + kb
                    sp = tl.load(spread_ptr + j, mask=j < num_spread, other=-1)
                    k_of = tl.max(tl.where(sp[None, :] == e[:, None], j[None, :].to(tl.int64), -1), axis=1)
                    spread_of = tl.maximum(spread_of, k_of)
                    j0 += K_BLOCK
                tl.store(table_ptr + 2 * num_slots + e, spread_of.to(tl.int32), mask=e < num_experts)
                e0 += BLOCK_E

    @triton.jit(do_not_specialize=[*_SIZES, "num_bounds", "offset"])
    def route_kernel(
        probs_ptr,  # float [T, E]
        map_ptr,  # uint8 [T, E]
        blocks_ptr,  # int32 [E, B]: pairs per block of tokens (_count_kernel)
        spread_ptr,  # int [K]
        spread_slots_ptr,  # int [K, C]
        count_ptr,  # int [K] (the [K, 1] column)
        first_ptr,  # int64 [E] (SPLIT)
        bounds_ptr,  # int64 [E, C - 1] (SPLIT)
        table_ptr,  # int32 [2P + E] (_count_kernel)
        sel_ptr,  # int32 [K, T], written
        out_probs_ptr,  # float [T, P], written
        out_map_ptr,  # uint8 [T, P], written
        num_tokens,
        num_experts,
        num_spread,
        copies,  # C
        num_bounds,  # C - 1 of the split's bounds
        num_slots,  # P
        block_tokens,
        num_blocks,  # B
        offset,
        SPLIT: tl.constexpr,
        SCAN_T: tl.constexpr,
        ROWS_T: tl.constexpr,
        BLOCK_P: tl.constexpr,
        P_BLOCKS: tl.constexpr,
        B_P: tl.constexpr,
        K_BLOCK: tl.constexpr,
        NB_TILE: tl.constexpr,
    ):
        b = tl.program_id(0)
        t_begin = b * block_tokens
        t_end = tl.minimum(t_begin + block_tokens, num_tokens)
        # 1. The slot of each pair of a spread expert in this block, into sel: pair i (0-based, in token order
        #    over the whole batch) takes its copy's slot; the pairs before the block come from the blocks'
        #    counts, those inside from a scan with a running carry (the torch cumsum: pair i has i + 1).
        kb = tl.arange(0, K_BLOCK)
        nb = tl.arange(0, NB_TILE)
        j0 = 0
        while j0 < num_spread:
            j = j0 + kb
            in_j = j < num_spread
            e = tl.load(spread_ptr + j, mask=in_j, other=0).to(tl.int64)
            count = tl.load(count_ptr + j, mask=in_j, other=1).to(tl.int64)
            carry = tl.zeros([K_BLOCK], dtype=tl.int64)
            b0 = 0
            while b0 < b:
                bb = b0 + nb
                before = tl.load(
                    blocks_ptr + e[None, :] * num_blocks + bb[:, None],
                    mask=(bb < b)[:, None] & in_j[None, :],
                    other=0,
                )
                carry += tl.sum(before.to(tl.int64), axis=0)
                b0 += NB_TILE
            if SPLIT:
                start = tl.load(first_ptr + e, mask=in_j, other=0).to(tl.int64)
            t0 = t_begin
            while t0 < t_end:
                t = t0 + tl.arange(0, SCAN_T)
                live = (t < t_end)[:, None] & in_j[None, :]
                hit = tl.load(map_ptr + t[:, None] * num_experts + e[None, :], mask=live, other=0).to(
                    tl.int64
                )
                pairs = carry[None, :] + tl.cumsum(hit, axis=0)
                carry += tl.sum(hit, axis=0)
                if SPLIT:  # searchsorted(bounds - first, pairs): #{c : bounds[e, c] - first[e] < pairs}
                    copy = tl.zeros([SCAN_T, K_BLOCK], dtype=tl.int64)
                    for c in tl.static_range(B_P):
                        bound = tl.load(
                            bounds_ptr + e * num_bounds + c, mask=in_j & (c < num_bounds), other=0
                        ).to(tl.int64)
                        below = (bound - start)[None, :] < pairs
                        copy += (below & (c < num_bounds)).to(tl.int64)
                else:  # (pairs + offset - 1) % count, floor division's remainder (count > 0)
                    copy = (pairs + (offset - 1)) % count[None, :]
                    copy = tl.where(
                        (copy != 0) & ((copy < 0) != (count[None, :] < 0)), copy + count[None, :], copy
                    )
                slot = tl.load(
                    spread_slots_ptr + j[None, :] * copies + copy,
                    mask=live & (copy >= 0) & (copy < copies),
                    other=-1,
                )
                tl.store(sel_ptr + j[None, :] * num_tokens + t[:, None], slot.to(tl.int32), mask=live)
                t0 += SCAN_T
            j0 += K_BLOCK
        tl.debug_barrier()  # this block's sel, written by all of the program's threads, is read below
        # 2. Whole rows of both outputs (zeros and the routed pairs, no separate zero fill) as a gather: slot p of
        #    token t holds expert e = table[p]'s pair when it is routed and its slot is p (sel[k, t] == p for a
        #    spread expert, always for the others: p is their one slot).
        r0 = t_begin
        while r0 < t_end:
            t = r0 + tl.arange(0, ROWS_T)
            in_t = t < t_end
            for pb in tl.static_range(P_BLOCKS):
                p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
                in_p = p < num_slots
                owner = tl.load(table_ptr + p, mask=in_p, other=-1)
                k = tl.load(table_ptr + num_slots + p, mask=in_p, other=-1)
                some = in_t[:, None] & (owner >= 0)[None, :]
                pair = t[:, None] * num_experts + owner[None, :]
                on = tl.load(map_ptr + pair, mask=some, other=0) != 0
                sel = tl.load(
                    sel_ptr + k[None, :] * num_tokens + t[:, None], mask=some & (k >= 0)[None, :], other=-1
                )
                on = on & ((k < 0)[None, :] | (sel == p[None, :]))
                prob = tl.load(probs_ptr + pair, mask=some)  # not waiting for sel
                prob = tl.where(on, prob, tl.zeros_like(prob))
                out = t[:, None] * num_slots + p[None, :]
                keep = in_t[:, None] & in_p[None, :]
                tl.store(out_probs_ptr + out, prob, mask=keep)
                tl.store(out_map_ptr + out, on.to(tl.uint8), mask=keep)
            r0 += ROWS_T

    @triton.jit(do_not_specialize=["num_tokens", "num_experts", "num_slots", "stride_t", "stride_p"])
    def grad_kernel(
        grad_ptr,  # float [T, P] (strides stride_t, stride_p)
        map_ptr,  # uint8 [T, E]
        fixed_ptr,  # int [E]
        sel_ptr,  # int32 [K, T]
        table_ptr,  # int32 [2P + E]
        out_ptr,  # float [T, E], written
        num_tokens,
        num_experts,
        num_slots,
        stride_t,
        stride_p,
        ROWS_T: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):
        t = tl.program_id(0) * ROWS_T + tl.arange(0, ROWS_T)
        in_t = t < num_tokens
        e0 = 0
        while e0 < num_experts:
            e = e0 + tl.arange(0, BLOCK_E)
            in_e = e < num_experts
            k = tl.load(table_ptr + 2 * num_slots + e, mask=in_e, other=-1)
            fixed = tl.load(fixed_ptr + e, mask=in_e, other=-1).to(tl.int64)
            both = in_t[:, None] & in_e[None, :]
            pair = t[:, None] * num_experts + e[None, :]
            on = tl.load(map_ptr + pair, mask=both, other=0) != 0
            sel = tl.load(
                sel_ptr + k[None, :] * num_tokens + t[:, None], mask=both & (k >= 0)[None, :], other=-1
            )
            slot = tl.where((k >= 0)[None, :], sel.to(tl.int64), fixed[None, :])
            take = on & (slot >= 0) & (slot < num_slots)
            g = tl.load(grad_ptr + t[:, None].to(tl.int64) * stride_t + slot * stride_p, mask=take)
            g = tl.where(take, g, tl.zeros_like(g))
            tl.store(out_ptr + pair, g, mask=both)
            e0 += BLOCK_E
