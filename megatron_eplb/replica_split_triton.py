"""The ``balanced`` dispatch's split as one fused Triton kernel: ``copy_bounds(balanced_shares(load, tables,
iterations))`` of :mod:`megatron_eplb.replica_split` for one batch, bitwise equal, in one launch of one
program (the whole problem fits in one block) instead of ~475 small kernels.

Shapes as in :mod:`megatron_eplb.replica_split`: ``E`` logical experts, ``N`` ranks, ``C`` most copies of one
expert, ``K`` replicated experts; the kernel pads ``K``, ``C``, ``N`` to powers of two (``K_P``, ``C_P``,
``N_P``) and masks the padding.  The same integer steps as the torch code, written without sorts, scatters
or scans (robust across the Triton compiler and its CPU interpreter):

- rank loads ``index_add`` -> a one-hot reduction over ``[K_P, C_P, N_P]``, the gather back the same way;
- :func:`~megatron_eplb.replica_split.water_fill`'s stable sort over the copies -> each copy's sorted position
  ``pos[c] = #{c' : level[c'] < level[c] or (level[c'] == level[c] and c' < c)}``, the prefix sums over the
  sorted order -> sums over ``pos[c'] <= pos[c]``, the unsort is implicit (every value stays on its copy);
- ``cumsum`` / ``diff`` over the copies -> triangular sums over ``[K_P, C_P, C_P]`` (``diff(cumsum(x) + m)``
  as ``x + diff(m)``: the same integers);
- the line search's ``alpha = clamp(num / den, 0, 1)`` in fp64 from the same exact integers (IEEE division
  and multiplication are correctly rounded on both, no fused multiply-add: the product goes to ``floor``);
- integer floor division written so that it is floor division whatever ``//`` does on negative operands, and
  ``floor`` of the fp64 product as the truncation corrected where it rounded up (no math library call).

Padding behaves like the torch code's missing copies (level ``_BIG``: never raised, share 0), so the padded
problem has the same answer.  Loads must be ``>= 0`` and below ``2**49`` (token counts; the torch code needs
the same for its ``_BIG`` levels and exact fp64 line search).

Its ``@triton.jit`` helpers (``_split_rounds``: the water-filling rounds with their line search,
``_worst_rank``, ``_even``, ``_water_fill``, the one-hot rank reductions, ``_floor_div``) are shared with the
per-step replicas' kernel (:mod:`megatron_eplb.fast_replicas_triton`), which splits over copies that change every
step.

Triton is optional: this module imports without it (:func:`available` is then ``False``) and
:mod:`megatron_eplb.replica_split` imports this module only when a split runs on CUDA.
"""

import functools

import torch

from .replica_split import _BIG, DEFAULT_ITERATIONS, ReplicaTables

try:  # CPU CI has no triton: everything below the guard is then never defined
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "no triton"
    triton = None
    tl = None

__all__ = ["MAX_TILE", "available", "balanced_bounds", "fits", "launch_config"]


def available() -> bool:
    """Whether triton imported (the kernel may still fail to compile on a device: callers fall back)."""
    return triton is not None


def _pow2(x: int) -> int:
    return max(2, 1 << (max(int(x), 1) - 1).bit_length())


@functools.lru_cache(maxsize=256)
def _launch_config(num_experts: int, copies: int, replicated: int, num_ranks: int) -> tuple:
    cfg = launch_config(num_experts, copies, replicated, num_ranks)
    return tuple(cfg.items())


def launch_config(num_experts: int, copies: int, replicated: int, num_ranks: int) -> dict:
    """The kernel's padded sizes and warps for one layer's shapes.

    Args:
        num_experts: ``E``; copies: ``C``; replicated: ``K``; num_ranks: ``N``.
    Returns:
        ``{"C_P", "K_P", "N_P", "BLOCK_E", "num_warps"}`` (powers of two).
    """
    c_p, k_p, n_p = _pow2(copies), _pow2(replicated), _pow2(num_ranks)
    block_e = min(_pow2(num_experts), 64)
    # The largest tile, [K_P, C_P, N_P] or [K_P, C_P, C_P]: from 8192 elements on, 16 warps keep ptxas's
    # register spills small (int64 everywhere); below, 8 warps halve each warp's instructions against 4.
    tile = max(k_p * c_p * n_p, k_p * c_p * c_p)
    num_warps = 4 if tile <= 1024 else 8 if tile < 8192 else 16
    return {"C_P": c_p, "K_P": k_p, "N_P": n_p, "BLOCK_E": block_e, "num_warps": num_warps}


MAX_TILE = 1 << 14
"""The largest ``K_P * C_P * max(N_P, C_P)`` the one block takes (e.g. ``K <= 64, C <= 4, N <= 64``): the int64
reductions of a ``1 << 15`` tile need 256 KiB of shared memory, more than an H200's 227 KiB per block (measured:
``OutOfResources``); :class:`~megatron_eplb.replica_split.BalancedSplit` keeps its graph path above."""


def fits(num_experts: int, copies: int, replicated: int, num_ranks: int) -> bool:
    """Whether one layer's split fits the kernel's one block (:data:`MAX_TILE`)."""
    cfg = launch_config(num_experts, copies, replicated, num_ranks)
    return cfg["K_P"] * cfg["C_P"] * max(cfg["N_P"], cfg["C_P"]) <= MAX_TILE


def balanced_bounds(
    load: torch.Tensor, tables: ReplicaTables, iterations: int = DEFAULT_ITERATIONS, align: int = 1
) -> torch.Tensor:
    """``align_bounds(copy_bounds(balanced_shares(load, tables, iterations)), load, align)`` in one kernel launch
    (bitwise equal).

    Args:
        load: int64 ``[E]`` this batch's global tokens per logical expert (``>= 0``), on the tables' device:
            CUDA, or CPU under ``TRITON_INTERPRET=1`` (the tests).
        tables: the layer's :class:`~megatron_eplb.replica_split.ReplicaTables`.
        iterations: water-filling rounds.
        align: the bounds rounded to multiples of this many tokens (1: exact).
    Returns:
        int64 ``[E, C - 1]`` copy bounds (a fresh tensor).  No host sync: capturable in a CUDA graph.
    """
    if triton is None:
        raise RuntimeError("megatron-eplb: the fused split needs triton, which does not import here")
    copy_rank, copy_count, single_rank, replicated, num_ranks = tables
    num_experts, copies = copy_rank.shape
    load = load.reshape(-1).to(torch.int64)
    if load.shape[0] != num_experts:
        raise ValueError(f"load has {load.shape[0]} experts, the tables {num_experts}")
    bounds = torch.empty(num_experts, copies - 1, dtype=torch.int64, device=load.device)
    if copies == 1 or num_experts == 0:
        return bounds
    if load.is_cuda and load.device.index != torch.cuda.current_device():
        with torch.cuda.device(load.device):  # triton launches on the current device
            return balanced_bounds(load, tables, iterations, align)
    cfg = dict(_launch_config(num_experts, copies, replicated.numel(), num_ranks))
    num_warps = cfg.pop("num_warps")
    _balanced_bounds_kernel[(1,)](
        load.contiguous(),
        copy_rank.contiguous(),
        copy_count.contiguous(),
        single_rank.contiguous(),
        # an empty [K] view may point one past its allocation: hand any valid pointer (never read when K = 0)
        replicated.contiguous() if replicated.numel() else copy_count,
        bounds,
        num_experts,
        replicated.numel(),
        num_ranks,
        copies,
        max(int(align), 1),
        ITERATIONS=max(int(iterations), 0),
        E_BLOCKS=triton.cdiv(num_experts, cfg["BLOCK_E"]),
        BIG=_BIG,
        num_warps=num_warps,
        enable_fp_fusion=False,  # no fp64 multiply-add contraction (none arises; this makes it certain)
        **cfg,
    )
    return bounds


if triton is not None:

    @triton.jit
    def _floor_div(a, b):
        """``floor(a / b)`` for integers, whichever way ``//`` rounds (``b > 0`` here)."""
        q = a // b
        r = a - q * b
        return tl.where((r != 0) & ((r < 0) != (b < 0)), q - 1, q)

    @triton.jit
    def _floor_to_int(v):
        """``floor(v)`` of fp64 ``|v| < 2**53`` as int64: the truncation, one less where that rounded up."""
        t = v.to(tl.int64)
        return tl.where(t.to(tl.float64) > v, t - 1, t)

    @triton.jit
    def _to_ranks(v, rank, n):
        """``[K_P, C_P]`` values summed onto their ranks: ``[N_P]`` (``index_add``)."""
        hit = rank[:, :, None] == n[None, None, :]
        return tl.sum(tl.sum(tl.where(hit, v[:, :, None], 0), axis=1), axis=0)

    @triton.jit
    def _from_ranks(per_rank, rank, n):
        """``[N_P]`` values read at each copy's rank: ``[K_P, C_P]`` (``index_select``)."""
        hit = rank[:, :, None] == n[None, None, :]
        return tl.sum(tl.where(hit, per_rank[None, None, :], 0), axis=2)

    @triton.jit
    def _cumsum(v, c):
        """Inclusive cumulative sum of ``[R, C_P]`` along the copies (a triangular sum)."""
        upto = c[:, None] <= c[None, :]  # [c', c]: c' <= c
        return tl.sum(tl.where(upto[None, :, :], v[:, :, None], 0), axis=1)

    @triton.jit
    def _previous(v, c):
        """``v[:, c - 1]`` (0 at ``c = 0``) of ``[R, C_P]``."""
        before = (c[:, None] + 1) == c[None, :]  # [c', c]: c' = c - 1
        return tl.sum(tl.where(before[None, :, :], v[:, :, None], 0), axis=1)

    @triton.jit
    def _even(amount, count, c):
        """``even_shares``: ``[R, C_P]`` from ``amount [R]`` and ``count [R]`` (``>= 1``)."""
        base = _floor_div(amount, count)
        extra = amount - base * count
        cc = c[None, :]
        share = base[:, None] + (cc < extra[:, None]).to(tl.int64)
        return tl.where(cc < count[:, None], share, 0)

    @triton.jit
    def _water_fill(levels, amount, c):
        """``water_fill`` of ``[K_P, C_P]`` levels and ``[K_P]`` amounts, by ranks instead of a stable sort."""
        mine = levels[:, None, :]  # [K, 1, c]
        other = levels[:, :, None]  # [K, c', 1]
        lower_index = (c[:, None] < c[None, :])[None, :, :]  # [1, c', c]: c' < c
        first = (other < mine) | ((other == mine) & lower_index)  # c' sorts before c (a stable sort)
        pos = tl.sum(first.to(tl.int64), axis=1)  # [K, C]: sorted position of copy c
        upto = first | (c[:, None] == c[None, :])[None, :, :]
        prefix = tl.sum(tl.where(upto, other, 0), axis=1)  # [K, C]: prefix[pos[c]] of the sorted levels
        fits = amount[:, None] + prefix >= (pos + 1) * levels
        raised = tl.sum(fits.to(tl.int64), axis=1)  # [K] >= 1
        low = pos < raised[:, None]
        total = amount + tl.sum(tl.where(low, levels, 0), axis=1)
        lam = _floor_div(total, raised)
        remainder = total - lam * raised
        bonus = (pos < remainder[:, None]).to(tl.int64)
        return tl.where(low, lam[:, None] - levels + bonus, 0)

    @triton.jit
    def _split_rounds(
        x, amount, rank, missing, fixed, c, n, in_n, ITERATIONS: tl.constexpr, BIG: tl.constexpr
    ):
        """The balanced split's water-filling rounds from ``x [R, C_P]`` (the even split): every row's
        ``amount [R]`` water-filled over its copies (``rank [R, C_P]``, ``missing`` = padding, rank ``N``) with
        the others held, the step shortened by the exact line search; ``fixed [N_P]`` rank loads of experts
        outside the tile.  Returns ``[R, C_P]`` (rows sum to ``amount``, 0 on padding).

        A round is a function of ``x`` alone, so once one moves nothing the rest would not either: the loop
        stops there (the same result as all ``ITERATIONS`` rounds; at one rank the first round moves nothing)."""
        done = tl.full([], 0, tl.int32)
        moving = tl.full([], 1, tl.int1)
        while moving & (done < ITERATIONS):
            rank_load = fixed + _to_ranks(x, rank, n)  # [N_P]
            others = tl.where(missing, BIG, _from_ranks(rank_load, rank, n) - x)
            step = _water_fill(others, amount, c) - x
            # exact line search of sum(rank_load ** 2) along the step
            change = tl.where(in_n, _to_ranks(step, rank, n), 0)
            num = -tl.sum(rank_load * change, axis=0)  # change is 0 past the N ranks
            den = tl.maximum(tl.sum(change * change, axis=0), 1)
            alpha = num.to(tl.float64) / den.to(tl.float64)
            alpha = tl.minimum(tl.maximum(alpha, 0.0), 1.0)
            # after = cumsum(x) + moved, x = diff(after): the same integers as x + diff(moved)
            moved = _floor_to_int(alpha * _cumsum(step, c).to(tl.float64))
            x = x + moved - _previous(moved, c)
            moving = tl.sum((moved != 0).to(tl.int32)) > 0
            done += 1
        return x

    @triton.jit
    def _worst_rank(x, rank, fixed, n, in_n):
        """The busiest of the ``N`` ranks' loads: ``fixed [N_P]`` plus the shares ``x [R, C_P]`` on ``rank``."""
        return tl.max(tl.where(in_n, fixed + _to_ranks(x, rank, n), -1), axis=0)

    @triton.jit
    def _align(bound, total, align):
        """``align_bounds``: ``bound [R, C_P]`` to the nearest multiple of ``align`` at most ``total [R]``; a
        bound at the total stays."""
        rounded = tl.minimum(_floor_div(bound + align // 2, align) * align, total[:, None])
        return tl.where(bound >= total[:, None], bound, rounded)

    @triton.jit(do_not_specialize=["num_experts", "num_replicated", "num_ranks", "copies", "align"])
    def _balanced_bounds_kernel(
        load_ptr,  # int64 [E]
        copy_rank_ptr,  # int64 [E, C]
        copy_count_ptr,  # int64 [E]
        single_rank_ptr,  # int64 [E]
        replicated_ptr,  # int64 [K]
        bounds_ptr,  # int64 [E, C - 1], written
        num_experts,
        num_replicated,
        num_ranks,
        copies,  # C
        align,  # round the bounds to multiples of this (1: exact)
        ITERATIONS: tl.constexpr,
        E_BLOCKS: tl.constexpr,
        BIG: tl.constexpr,
        C_P: tl.constexpr,
        K_P: tl.constexpr,
        N_P: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):
        c = tl.arange(0, C_P)
        n = tl.arange(0, N_P)
        k = tl.arange(0, K_P)
        in_n = n < num_ranks

        # The replicated experts: amounts, copy ranks (padding -> rank N, a missing copy), even shares.
        in_k = k < num_replicated
        rep = tl.load(replicated_ptr + k, mask=in_k, other=0)
        amount = tl.load(load_ptr + rep, mask=in_k, other=0)
        count = tl.load(copy_count_ptr + rep, mask=in_k, other=1)
        in_kc = in_k[:, None] & (c[None, :] < copies)
        rank = tl.load(copy_rank_ptr + rep[:, None] * copies + c[None, :], mask=in_kc, other=num_ranks)
        missing = rank == num_ranks
        even = _even(amount, count, c)

        # Single-copy experts: the fixed rank loads, and their bounds (the even split's) written here.
        fixed = tl.zeros([N_P], dtype=tl.int64)
        for b in range(E_BLOCKS):
            e = b * BLOCK_E + tl.arange(0, BLOCK_E)
            in_e = e < num_experts
            w = tl.load(load_ptr + e, mask=in_e, other=0)
            single = tl.load(single_rank_ptr + e, mask=in_e, other=num_ranks)
            fixed += tl.sum(tl.where(single[:, None] == n[None, :], w[:, None], 0), axis=0)
            rep_hits = tl.sum(((e[:, None] == rep[None, :]) & in_k[None, :]).to(tl.int32), axis=1)
            cnt = tl.load(copy_count_ptr + e, mask=in_e, other=1)
            bound = _align(_cumsum(_even(w, cnt, c), c), w, align)
            out = in_e[:, None] & (rep_hits == 0)[:, None] & (c[None, :] < copies - 1)
            tl.store(bounds_ptr + e[:, None] * (copies - 1) + c[None, :], bound, mask=out)

        x = _split_rounds(even, amount, rank, missing, fixed, c, n, in_n, ITERATIONS, BIG)
        # Never worse than the even split (the single experts load both alike).
        x = tl.where(_worst_rank(x, rank, fixed, n, in_n) > _worst_rank(even, rank, fixed, n, in_n), even, x)
        bound = _align(_cumsum(x, c), amount, align)
        out = in_k[:, None] & (c[None, :] < copies - 1)
        tl.store(bounds_ptr + rep[:, None] * (copies - 1) + c[None, :], bound, mask=out)
