"""The routing onto slots (:func:`megatron_eplb.slot_routing.route_to_slots_torch`) as two Triton kernels forward
(a count and the routing) and one backward, bitwise equal (outputs and the gradient of ``probs``), instead of
14-15 small kernels per MoE layer forward.

Shapes as in :mod:`megatron_eplb.slot_routing`: ``T`` tokens, ``E`` logical experts, ``P`` slots, ``K`` spread
experts, ``C`` most copies (``spread_slots [K, C]``), ``C - 1`` split bounds per expert, ``B`` blocks of
:func:`block_tokens` tokens.

The kernels (:mod:`megatron_eplb.slot_routing_kernels`, whose docstring says what each computes): the count
(:func:`count_pairs`), the routing, and the backward's gather.

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

try:  # CPU CI has no triton: the kernels are then never defined
    import triton

    from .slot_routing_kernels import count_kernel, grad_kernel, route_kernel
except Exception:  # noqa: BLE001 - any import failure means "no triton"
    triton = None

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
    devices = {t.device for t in (routing_map, *tables, *(split or ())) if t is not None}
    if devices != {routing_map.device if probs is None else probs.device}:
        where = routing_map.device if probs is None else probs.device
        return f"probs on {where}, routing map, tables and split on {sorted(map(str, devices))}"
    num_tokens, num_experts = routing_map.shape
    if num_tokens * max(num_experts, num_slots, tables.spread.numel()) >= _MAX_INDEX:
        return f"T = {num_tokens} x max(E, P, K) reaches 2**31 (int32 offsets)"
    if tables.spread_slots.dim() != 2 or tables.spread_slots.shape[0] != tables.spread.numel():
        return f"spread_slots {tuple(tables.spread_slots.shape)} is not [K, C]"
    table = tables.table
    if table is not None and (table.dtype != torch.int32 or table.shape != (2 * num_slots + num_experts,)):
        return f"the tables' routing table ({table.dtype}, {tuple(table.shape)}) is not int32 [2P + E]"
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


def _spread_args(tables, fallback: torch.Tensor) -> tuple:
    """The spread experts' tables as the kernels take them: contiguous, or with ``K = 0`` any valid pointer
    (``fallback``; never read then: an empty ``[K]`` view may point one past its allocation)."""
    if tables.spread.numel() == 0:
        return fallback, fallback, fallback
    return tables.spread.contiguous(), tables.spread_slots.contiguous(), tables.spread_count.contiguous()


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
        int32 ``[2P + E]`` tables of the routing kernel (``tables.table`` where the tables carry it).  Two
        launches (a zero fill and the count); no host sync.
    """
    if routing_map.is_cuda and routing_map.device.index != torch.cuda.current_device():
        with torch.cuda.device(routing_map.device):
            return count_pairs(routing_map, tables, num_slots, record)
    num_tokens, num_experts = routing_map.shape
    num_spread, copies = tables.spread_slots.shape
    device = routing_map.device
    step = block_tokens(num_tokens)
    num_blocks = -(-num_tokens // step)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    blocks = torch.empty(num_experts, num_blocks, dtype=torch.int32, device=device)
    table = tables.table  # made with the tables, else by one more program here
    made = table is None
    if made:
        table = torch.empty(2 * num_slots + num_experts, dtype=torch.int32, device=device)
    fixed = tables.fixed.contiguous()
    spread, spread_slots, spread_count = _spread_args(tables, fixed)
    cfg = dict(launch_config(num_experts, num_slots, num_spread, copies, 0))
    count_kernel[(-(-num_blocks // _COUNT_GROUP) + made,)](  # + one program for the table, unless carried
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
    num_spread, copies = tables.spread_slots.shape
    probs = probs.contiguous()
    routed = routing_map.contiguous().view(torch.uint8)
    device = probs.device
    sel = torch.empty(num_spread, num_tokens, dtype=torch.int32, device=device)
    phys_probs = torch.empty(num_tokens, num_slots, dtype=probs.dtype, device=device)
    phys_map = torch.empty(num_tokens, num_slots, dtype=torch.uint8, device=device)
    if not num_tokens:
        return phys_probs, phys_map.view(torch.bool), sel, table, routed
    spread, spread_slots, spread_count = _spread_args(tables, table)
    if split is None:
        first, bounds, num_bounds = table, table, 0
    else:
        first, bounds = split[0].contiguous(), split[1].contiguous()
        num_bounds = bounds.shape[1]
        bounds = bounds if bounds.numel() else table
    cfg = dict(launch_config(num_experts, num_slots, num_spread, copies, num_bounds))
    step = block_tokens(num_tokens)
    route_kernel[(blocks.shape[1],)](
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
    """:func:`_backward` in one launch of the gradient kernel."""
    num_tokens, num_experts = routed.shape
    out = torch.empty(num_tokens, num_experts, dtype=grad.dtype, device=grad.device)
    if num_tokens == 0 or num_experts == 0:
        return out
    rows_t = max(16, 4096 // cfg["BLOCK_E"])
    grad_kernel[(triton.cdiv(num_tokens, rows_t),)](
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
