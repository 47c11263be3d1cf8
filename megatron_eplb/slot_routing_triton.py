"""The routing onto slots (:func:`megatron_eplb.slot_routing.route_to_slots_torch`) as two Triton kernels forward
(a count and the routing) and one backward, bitwise equal (outputs and the gradient of ``probs``), instead of
14-15 small kernels per MoE layer forward.

Shapes as in :mod:`megatron_eplb.slot_routing`: ``T`` tokens, ``E`` logical experts, ``P`` slots, ``K`` spread
experts, ``C`` most copies (``spread_slots [K, C]``), ``C - 1`` split bounds per expert, ``B`` blocks of
:func:`block_tokens` tokens.

1. :func:`_count_kernel` (:func:`count_pairs`), one program per :data:`_COUNT_GROUP` blocks of tokens plus one
   for the tables: each block's pairs of every expert into int32 ``blocks [E, B]``, their sums into int64
   ``counts [E]`` (and into a caller's record buffer) by atomic adds.  The balanced split reads ``counts``
   before the routing (so a caller counts once, :class:`~megatron_eplb.slot_routing.PairCounts`).  The last
   program writes int32 ``table [2P + E]``: the expert of each slot (``-1``: none receives pairs: an empty slot,
   or a copy that a ``local_slot`` leaves out), whether that expert is spread (its ``k``, else ``-1``), and each
   expert's ``k``.
2. :func:`_route_kernel`, one program per block of tokens.  First, for every spread expert, the number of its
   pairs before the block (a sum over ``blocks``) plus a scan inside it (``tl.cumsum`` with a running carry: as
   the torch ``cumsum``) gives each pair's position ``i``; the pair takes its copy (round-robin
   ``(i + offset) % count`` or the split's ``#{c : bounds[e, c] <= first[e] + i}``) and its slot goes into int32
   ``sel [K, T]`` (every token, routed or not, as the torch code's slot).  Then, after a barrier, whole rows of
   both outputs (zeros and the routed pairs, so no separate zero fill) as a gather: slot ``p`` of token ``t``
   holds expert ``e = table[p]``'s pair when it is routed and its slot is ``p`` (``sel[k, t] == p`` for a spread
   expert, always for the others: ``p`` is their one slot).
3. :func:`_grad_kernel` (backward), one program per block of tokens: ``grad_probs[t, e] = grad[t, slot[t, e]]``
   where routed, else 0 (the torch code's ``scatter`` / ``where`` backward).

Every value is moved, never computed, so any float dtype is bitwise the torch code's.  Tables whose experts
share a slot are not a placement and are not supported (the torch code's scatter is then itself undefined).
No host sync and no value-dependent shapes: capturable in a CUDA graph.

Triton is optional: this module imports without it (:func:`available` is then ``False``);
:mod:`megatron_eplb.slot_routing` imports it only on CUDA.
"""

from __future__ import annotations

import functools
import logging

import torch

try:  # CPU CI has no triton: everything below the guard is then never defined
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "no triton"
    triton = None
    tl = None

__all__ = ["available", "compiled", "launch_config", "route_to_slots", "unfit"]

_MAX_INDEX = 1 << 31
_SCAN_T = 32  # tokens per step of the count and of the routing's scan
_COUNT_GROUP = 4  # blocks of tokens per program of the count
_MAX_BLOCKS = 256  # blocks of tokens read per step of a program's prefix (more tokens: longer blocks)
_WARM: set[tuple] = set()  # the kernel variants that ran outside a CUDA-graph capture (compiled, loaded)
_BACKWARD_FAILED = False  # the backward kernel failed in this process: its torch gather from then on


def available() -> bool:
    """Whether triton imported (the kernels may still fail to compile on a device: callers fall back)."""
    return triton is not None


def _pow2(x: int) -> int:
    return max(2, 1 << (max(int(x), 1) - 1).bit_length())


@functools.lru_cache(maxsize=256)
def launch_config(num_experts: int, num_slots: int, num_spread: int, copies: int, num_bounds: int) -> tuple:
    """The kernels' block sizes for one layer's shapes: ``((name, value), ...)`` (powers of two).

    ``SCAN_T``: tokens per step of the count and of the routing's scan; ``BLOCK_P`` / ``P_BLOCKS``: slots per tile
    and tiles per row (``P`` up to 128 in one tile); ``ROWS_T``: tokens per step of the rows and per program of the
    gradient (a ``[ROWS_T, BLOCK_P]`` tile of 4096 elements at most); ``BLOCK_E``: experts per tile; ``C_P`` /
    ``B_P``: copies and split bounds padded; ``K_BLOCK``: spread experts per step."""
    block_p = min(_pow2(num_slots), 128)
    return (
        ("SCAN_T", _SCAN_T),
        ("BLOCK_P", block_p),
        ("P_BLOCKS", triton.cdiv(num_slots, block_p) if triton is not None else 1),
        ("ROWS_T", max(16, 4096 // block_p)),
        ("BLOCK_E", min(_pow2(num_experts), 64)),
        ("C_P", _pow2(copies)),
        ("B_P", _pow2(num_bounds)),
        ("K_BLOCK", min(_pow2(num_spread), 16)),
    )


def unfit(
    probs: torch.Tensor | None, routing_map: torch.Tensor, tables, num_slots: int, split=None
) -> str | None:
    """Why these shapes do not fit the kernels (``None`` when they do; ``probs=None``: the count alone).  Shapes
    and dtypes only: no host sync."""
    if routing_map.dim() != 2 or (probs is not None and probs.shape != routing_map.shape):
        shape = None if probs is None else tuple(probs.shape)
        return f"probs {shape} and routing map {tuple(routing_map.shape)} are not one [T, E]"
    if (probs is not None and not probs.is_floating_point()) or routing_map.dtype != torch.bool:
        return f"probs {None if probs is None else probs.dtype} / routing map {routing_map.dtype} are not float / bool"
    devices = {t.device for t in (routing_map, *tables, *(split or ()))}
    if devices != {routing_map.device if probs is None else probs.device}:
        where = routing_map.device if probs is None else probs.device
        return f"probs on {where}, routing map, tables and split on {sorted(map(str, devices))}"
    num_tokens, num_experts = routing_map.shape
    if num_tokens * max(num_experts, num_slots, tables.spread.numel()) >= _MAX_INDEX:
        return f"T = {num_tokens} x max(E, P, K) reaches 2**31 (int32 offsets)"
    if tables.spread_slots.dim() != 2 or tables.spread_slots.shape[0] != tables.spread.numel():
        return f"spread_slots {tuple(tables.spread_slots.shape)} is not [K, C]"
    if split is not None and split[1].dim() != 2:
        return f"split bounds {tuple(split[1].shape)} are not [E, C - 1]"
    return None


def _variant(
    kind: str, device: torch.device, dtype, tables, num_experts: int, num_slots: int, split
) -> tuple:
    """What triton compiles a variant of the ``kind`` kernel for (the integer sizes are not specialized)."""
    num_bounds = 0 if split is None else split[1].shape[1]
    num_spread, copies = tables.spread_slots.shape
    cfg = launch_config(num_experts, num_slots, num_spread, copies, num_bounds)
    return (kind, device, dtype, split is not None, cfg)


def _count_variant(routing_map: torch.Tensor, tables, num_slots: int) -> tuple:
    return _variant("count", routing_map.device, None, tables, routing_map.shape[1], num_slots, None)


def compiled(probs: torch.Tensor, tables, num_slots: int, split=None) -> bool:
    """Whether the forward kernels for these dtypes and sizes ran outside a CUDA-graph capture (so a capture
    does not compile them)."""
    return (
        _variant("forward", probs.device, probs.dtype, tables, probs.shape[1], num_slots, split) in _WARM
        and _count_variant(probs, tables, num_slots) in _WARM
    )


def count_compiled(routing_map: torch.Tensor, tables, num_slots: int) -> bool:
    """Whether the count kernel for these sizes ran outside a CUDA-graph capture."""
    return _count_variant(routing_map, tables, num_slots) in _WARM


def block_tokens(num_tokens: int) -> int:
    """Tokens per program of the count and the routing (a multiple of the scan step, at most 256 programs'
    worth of blocks before each program's prefix needs a second tile)."""
    return _SCAN_T * max(1, -(-num_tokens // (_SCAN_T * _MAX_BLOCKS)))


def count_pairs(routing_map: torch.Tensor, tables, num_slots: int, record: torch.Tensor | None = None):
    """This batch's pairs per expert in one launch: ``(counts, blocks, table)``, see
    :class:`~megatron_eplb.slot_routing.PairCounts`.

    Args:
        routing_map: bool ``[T, E]`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        tables: the layer's :class:`~megatron_eplb.slot_routing.SlotTables`.
        num_slots: ``P``.
        record: optional int64 ``[E]`` the counts are also added into (in place).
    Returns:
        int64 ``[E]`` pairs of each expert, int32 ``[E, B]`` pairs per block of :func:`block_tokens` tokens,
        int32 ``[2P + E]`` tables of the routing kernel.  Two launches (a zero fill and the count); no host sync.
    """
    if routing_map.is_cuda and routing_map.device.index != torch.cuda.current_device():
        with torch.cuda.device(routing_map.device):
            return count_pairs(routing_map, tables, num_slots, record)
    num_tokens, num_experts = routing_map.shape
    fixed, spread, spread_slots, spread_count = tables
    num_spread, copies = spread_slots.shape
    device = routing_map.device
    step = block_tokens(num_tokens)
    num_blocks = -(-num_tokens // step)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    blocks = torch.empty(num_experts, num_blocks, dtype=torch.int32, device=device)
    table = torch.empty(2 * num_slots + num_experts, dtype=torch.int32, device=device)
    fixed = fixed.contiguous()
    # an empty [K] view may point one past its allocation: hand any valid pointer (never read when K = 0)
    spread = spread.contiguous() if num_spread else fixed
    spread_slots = spread_slots.contiguous() if num_spread else fixed
    spread_count = spread_count.contiguous() if num_spread else fixed
    cfg = dict(launch_config(num_experts, num_slots, num_spread, copies, 0))
    _count_kernel[(-(-num_blocks // _COUNT_GROUP) + 1,)](
        routing_map.contiguous().view(torch.uint8),
        counts,
        blocks,
        counts if record is None else record,
        fixed,
        spread,
        spread_slots,
        spread_count,
        table,
        num_tokens,
        num_experts,
        num_spread,
        copies,
        num_slots,
        step,
        num_blocks,
        RECORD=record is not None,
        GROUP=_COUNT_GROUP,
        SCAN_T=cfg["SCAN_T"],
        BLOCK_P=cfg["BLOCK_P"],
        BLOCK_E=cfg["BLOCK_E"],
        C_P=cfg["C_P"],
        K_BLOCK=cfg["K_BLOCK"],
        num_warps=8,
    )
    if not (routing_map.is_cuda and torch.cuda.is_current_stream_capturing()):
        _WARM.add(_count_variant(routing_map, tables, num_slots))
    return counts, blocks, table


def route_to_slots(
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    tables,
    num_slots: int,
    *,
    offset: int = 0,
    split: tuple[torch.Tensor, torch.Tensor] | None = None,
    counted=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~megatron_eplb.slot_routing.route_to_slots_torch` fused (bitwise equal, differentiable in ``probs``).

    Args:
        probs: float ``[T, E]``; routing_map: bool ``[T, E]``; on CUDA, or CPU under ``TRITON_INTERPRET=1``.
        tables: the layer's :class:`~megatron_eplb.slot_routing.SlotTables`.
        num_slots: ``P``.
        offset: round-robin start.
        split: optional ``(first [E], bounds [E, C-1])`` int64 (then ``offset`` is not read).
        counted: optional :func:`count_pairs` of this ``routing_map`` and ``tables`` (else counted here).
    Returns:
        probs ``[T, P]`` (``probs``' dtype) and bool routing map ``[T, P]``.  Four launches at most (the count
        unless given, the routing, one backward); no host sync.
    """
    if triton is None:
        raise RuntimeError("megatron-eplb: the fused routing needs triton, which does not import here")
    if probs.is_cuda and probs.device.index != torch.cuda.current_device():
        with torch.cuda.device(probs.device):  # triton launches on the current device
            return route_to_slots(
                probs, routing_map, tables, num_slots, offset=offset, split=split, counted=counted
            )
    if counted is None:
        counted = count_pairs(routing_map, tables, num_slots)
    if torch.is_grad_enabled() and probs.requires_grad:
        out = _Route.apply(probs, routing_map, tables, num_slots, offset, split, counted)
    else:
        out = _forward(probs, routing_map, tables, num_slots, offset, split, counted)[:2]
    if not (probs.is_cuda and torch.cuda.is_current_stream_capturing()):
        _WARM.add(_variant("forward", probs.device, probs.dtype, tables, probs.shape[1], num_slots, split))
    return out


def _forward(probs, routing_map, tables, num_slots: int, offset: int, split, counted):
    """``(phys_probs [T, P], phys_map [T, P], sel [K, T], table [2P + E], routing_map as uint8 [T, E])``."""
    num_tokens, num_experts = probs.shape
    _, blocks, table = counted
    fixed, spread, spread_slots, spread_count = tables
    num_spread, copies = spread_slots.shape
    probs = probs.contiguous()
    routed = routing_map.contiguous().view(torch.uint8)
    device = probs.device
    sel = torch.empty(num_spread, num_tokens, dtype=torch.int32, device=device)
    phys_probs = torch.empty(num_tokens, num_slots, dtype=probs.dtype, device=device)
    phys_map = torch.empty(num_tokens, num_slots, dtype=torch.uint8, device=device)
    if not num_tokens:
        return phys_probs, phys_map.view(torch.bool), sel, table, routed
    spread = spread.contiguous() if num_spread else table
    spread_slots = spread_slots.contiguous() if num_spread else table
    spread_count = spread_count.contiguous() if num_spread else table
    if split is None:
        first, bounds, num_bounds = table, table, 0
    else:
        first, bounds = split[0].contiguous(), split[1].contiguous()
        num_bounds = bounds.shape[1]
        bounds = bounds if bounds.numel() else table
    cfg = dict(launch_config(num_experts, num_slots, num_spread, copies, num_bounds))
    step = block_tokens(num_tokens)
    _route_kernel[(blocks.shape[1],)](
        probs,
        routed,
        blocks,
        spread,
        spread_slots,
        spread_count,
        first,
        bounds,
        table,
        sel,
        phys_probs,
        phys_map,
        num_tokens,
        num_experts,
        num_spread,
        copies,
        num_bounds,
        num_slots,
        step,
        blocks.shape[1],
        int(offset),
        SPLIT=split is not None,
        SCAN_T=cfg["SCAN_T"],
        ROWS_T=cfg["ROWS_T"],
        BLOCK_P=cfg["BLOCK_P"],
        P_BLOCKS=cfg["P_BLOCKS"],
        B_P=cfg["B_P"],
        K_BLOCK=cfg["K_BLOCK"],
        NB_TILE=_MAX_BLOCKS,
        num_warps=8,
    )
    return phys_probs, phys_map.view(torch.bool), sel, table, routed


def _backward(grad: torch.Tensor, routed: torch.Tensor, fixed, sel, table, num_slots: int) -> torch.Tensor:
    """``grad_probs [T, E]``: ``grad [T, P]`` at each routed pair's slot, else 0 (``grad``'s dtype).  One launch;
    inside a CUDA-graph capture before the kernel ever ran, the same gather in torch functions."""
    num_tokens, num_experts = routed.shape
    cfg = dict(launch_config(num_experts, num_slots, 0, 1, 0))
    variant = ("backward", grad.device, grad.dtype, tuple(cfg.items()))
    capturing = grad.is_cuda and torch.cuda.is_current_stream_capturing()
    if _BACKWARD_FAILED or (capturing and variant not in _WARM):
        return _backward_torch(grad, routed, fixed, sel, table, num_slots)
    try:
        return _backward_kernel(grad, routed, fixed, sel, table, num_slots, cfg, variant, capturing)
    except Exception as exc:  # noqa: BLE001 - the torch gather computes the same gradient
        if capturing:
            raise
        _give_up_backward(exc)
        return _backward_torch(grad, routed, fixed, sel, table, num_slots)


def _give_up_backward(exc: Exception) -> None:
    global _BACKWARD_FAILED
    _BACKWARD_FAILED = True
    logging.getLogger("megatron_eplb").warning(
        "megatron-eplb: route_to_slots: the fused backward kernel failed (%r); a torch gather from now on",
        exc,
    )


def _backward_kernel(grad, routed, fixed, sel, table, num_slots: int, cfg: dict, variant, capturing: bool):
    """:func:`_backward` in one launch of :func:`_grad_kernel`."""
    num_tokens, num_experts = routed.shape
    out = torch.empty(num_tokens, num_experts, dtype=grad.dtype, device=grad.device)
    if num_tokens == 0 or num_experts == 0:
        return out
    rows_t = max(16, 4096 // cfg["BLOCK_E"])
    _grad_kernel[(triton.cdiv(num_tokens, rows_t),)](
        grad,  # any strides (``sum().backward()`` hands an expanded one)
        routed,
        fixed.contiguous(),
        sel,
        table,
        out,
        num_tokens,
        num_experts,
        num_slots,
        grad.stride(0),
        grad.stride(1),
        ROWS_T=rows_t,
        BLOCK_E=cfg["BLOCK_E"],
    )
    if not capturing:
        _WARM.add(variant)
    return out


def _backward_torch(
    grad: torch.Tensor, routed: torch.Tensor, fixed, sel, table, num_slots: int
) -> torch.Tensor:
    """:func:`_backward` in torch functions (bitwise the same): each pair's slot from ``fixed`` and ``sel``."""
    num_tokens, num_experts = routed.shape
    slot = fixed.to(torch.int64).expand(num_tokens, num_experts)
    if sel.shape[0]:
        spread_of = table[2 * num_slots :].to(torch.int64)  # [E]: k, or -1
        picked = sel.t().to(torch.int64).gather(1, spread_of.clamp(min=0).expand(num_tokens, num_experts))
        slot = torch.where(spread_of >= 0, picked, slot)
    take = routed.view(torch.bool) & (slot >= 0) & (slot < num_slots)
    return torch.where(take, grad.gather(1, slot.clamp(0, max(num_slots - 1, 0))), 0)


class _Route(torch.autograd.Function):
    """The fused forward; the backward a gather of the upstream gradient at each routed pair's slot (from the
    saved int32 slots of the spread experts and the tables, no ``[T, P]`` tensor kept)."""

    @staticmethod
    def forward(ctx, probs, routing_map, tables, num_slots, offset, split, counted):
        phys_probs, phys_map, sel, table, routed = _forward(
            probs, routing_map, tables, num_slots, offset, split, counted
        )
        ctx.save_for_backward(routed, tables.fixed, sel, table)
        ctx.num_slots = num_slots
        ctx.mark_non_differentiable(phys_map)
        return phys_probs, phys_map

    @staticmethod
    def backward(ctx, grad_probs, _grad_map):
        if grad_probs is None:
            return (None,) * 7
        routed, fixed, sel, table = ctx.saved_tensors
        if grad_probs.is_cuda and grad_probs.device.index != torch.cuda.current_device():
            with torch.cuda.device(grad_probs.device):
                grad = _backward(grad_probs, routed, fixed, sel, table, ctx.num_slots)
        else:
            grad = _backward(grad_probs, routed, fixed, sel, table, ctx.num_slots)
        return (grad,) + (None,) * 6


if triton is not None:

    @triton.jit(
        do_not_specialize=[
            "num_tokens",
            "num_experts",
            "num_spread",
            "copies",
            "num_slots",
            "block_tokens",
            "num_blocks",
        ]
    )
    def _count_kernel(
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

    @triton.jit(
        do_not_specialize=[
            "num_tokens",
            "num_experts",
            "num_spread",
            "copies",
            "num_bounds",
            "num_slots",
            "block_tokens",
            "num_blocks",
            "offset",
        ]
    )
    def _route_kernel(
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
    def _grad_kernel(
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
