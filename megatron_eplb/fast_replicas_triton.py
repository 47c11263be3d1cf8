"""Per-step replicas' plan as one fused Triton kernel: ``plan_fast_replicas(load[None], tables)`` of
:mod:`megatron_eplb.fast_replicas` for one step, bitwise equal in every output of its
:class:`~megatron_eplb.fast_replicas.FastPlan`, in one launch of one program (the whole problem fits in one
block) instead of hundreds of small kernels.

Shapes as in :mod:`megatron_eplb.fast_replicas`: ``E`` logical experts, ``N`` ranks, ``S`` persistent and ``F``
spare slots per rank, ``C`` most persistent copies of one expert, ``D = tables.max_copies`` most copies in the
union.  The kernel pads ``E``, ``C``, ``D``, ``N``, ``F`` to powers of two (``E_P``, ``C_P``, ``D_P``, ``N_P``,
``F_P``) and masks the padding.  The same integer steps as the torch code, in its order:

1. the balanced split over the persistent copies (``[E_P, C_P]``): the split kernel's own helpers
   (:mod:`megatron_eplb.replica_split_triton`: ``_even``, ``_split_rounds``, ``_worst_rank``, never worse than
   the even split); every expert is in the tile (no fixed rank loads);
2. the ``N * F`` greedy rounds of :func:`~megatron_eplb.fast_replicas.choose_fast_replicas` on an
   ``[E_P, N_P]`` tile of each expert's tokens per rank: ``argmax`` / ``argmin`` as the first maximum / minimum
   (the lowest index among the ties, as torch returns), picked out by one-hot reductions; the key
   ``gain * scale + on_r`` in the same wrapping int64 arithmetic;
3. the union tables without a sort: an expert's spare copies (at most one per rank) follow its persistent
   copies in rank order, so spare copy on rank ``n`` sits at column ``count[e] + #{n' < n with one}``;
4. the balanced split over the union (``[E_P, D_P]``, the same helpers), the never-worse check against step 1
   (else step 1's shares, the spare copies idle), and a spare slot whose copy computes nothing left empty.

Integer sums of products that overflow (loads near ``2**40`` make ``gain * scale`` and the line search's dot
products wrap) wrap alike here and in torch: int64 addition and multiplication are a ring modulo ``2**64``, so
the order of the reductions does not matter; only ``num / den`` goes through fp64, correctly rounded on both
sides.  Loads must be ``>= 0`` and below ``2**49`` (as for the torch code's ``_BIG`` levels); the tables as
:func:`~megatron_eplb.fast_replicas.fast_tables` makes them (an expert's real copies first, then padding).

Triton is optional: this module imports without it (:func:`available` is then ``False``) and
:class:`~megatron_eplb.fast_replicas.FastPlanner` imports it only on CUDA.
"""

from __future__ import annotations

import functools

import torch

from .fast_replicas import _BIG, FastPlan, FastTables
from .replica_split import DEFAULT_ITERATIONS
from .replica_split_triton import MAX_TILE, _pow2, triton

if triton is not None:
    import triton.language as tl

    from .replica_split_triton import _even, _floor_div, _split_rounds, _worst_rank
else:  # CPU CI has no triton: the kernel below is then never defined
    tl = None

__all__ = ["MAX_TILE", "available", "fits", "launch_config", "plan_fast_replicas_fused", "plan_views"]


def available() -> bool:
    """Whether triton imported (the kernel may still fail to compile on a device: callers fall back)."""
    return triton is not None


def launch_config(num_experts: int, copies: int, num_ranks: int, num_fast: int) -> dict:
    """The kernel's padded sizes and warps for one layer's shapes.

    Args:
        num_experts: ``E``; copies: ``C`` (persistent); num_ranks: ``N``; num_fast: ``F``.
    Returns:
        ``{"E_P", "C_P", "D_P", "N_P", "F_P", "num_warps"}`` (powers of two; ``D`` as
        :attr:`~megatron_eplb.fast_replicas.FastTables.max_copies`).
    """
    union = copies + min(num_ranks * num_fast, max(num_ranks - 1, 0))
    e_p, c_p, d_p = _pow2(num_experts), _pow2(copies), _pow2(union)
    n_p, f_p = _pow2(num_ranks), _pow2(num_fast)
    tile = _largest_tile(e_p, c_p, d_p, n_p, f_p)
    # as the split kernel: from 8192 int64 elements on 16 warps keep ptxas's spills small, below 8 or 4
    num_warps = 4 if tile <= 1024 else 8 if tile < 8192 else 16
    return {"E_P": e_p, "C_P": c_p, "D_P": d_p, "N_P": n_p, "F_P": f_p, "num_warps": num_warps}


def _largest_tile(e_p: int, c_p: int, d_p: int, n_p: int, f_p: int) -> int:
    # the splits' [E_P, X_P, max(N_P, X_P)] (X = C, then D), the union's [E_P, D_P, N_P] and [E_P, N_P, N_P],
    # the spare slots' [E_P, N_P, F_P]
    return max(e_p * d_p * max(n_p, d_p), e_p * c_p * max(n_p, c_p), e_p * n_p * max(n_p, f_p))


@functools.lru_cache(maxsize=256)
def _launch_config(num_experts: int, copies: int, num_ranks: int, num_fast: int) -> tuple:
    return tuple(launch_config(num_experts, copies, num_ranks, num_fast).items())


def fits(num_experts: int, copies: int, num_ranks: int, num_fast: int) -> bool:
    """Whether one layer's plan fits the kernel's one block: its largest int64 tile at most :data:`MAX_TILE`
    elements (``1 << 14``; e.g. ``E <= 64`` with ``N <= 8`` and ``C <= 2`` or ``N <= 16`` and ``C = 1``,
    ``E <= 256`` with ``N <= 8`` and ``C = 1``).

    Args:
        num_experts: ``E``; copies: ``C`` (persistent); num_ranks: ``N``; num_fast: ``F``.
    """
    cfg = launch_config(num_experts, copies, num_ranks, num_fast)
    return _largest_tile(cfg["E_P"], cfg["C_P"], cfg["D_P"], cfg["N_P"], cfg["F_P"]) <= MAX_TILE


def plan_fast_replicas_fused(
    load: torch.Tensor,
    tables: FastTables,
    iterations: int = DEFAULT_ITERATIONS,
    out: torch.Tensor | None = None,
) -> FastPlan:
    """``plan_fast_replicas(load[None], tables, iterations)[0]``-wise in one kernel launch (bitwise equal).

    Args:
        load: int ``[E]`` this step's global tokens per logical expert (``>= 0``), on the tables' device: CUDA,
            or CPU under ``TRITON_INTERPRET=1`` (the tests).
        tables: the layer's :class:`~megatron_eplb.fast_replicas.FastTables`.
        iterations: water-filling rounds of the splits.
        out: int64 ``[N * F + 3 * E * D]`` contiguous buffer to write the plan into (default: a fresh one).
    Returns:
        :class:`~megatron_eplb.fast_replicas.FastPlan` of one step (``fast_expert [N, F]``, ``copy_rank``,
        ``copy_slot``, ``shares [E, D]``): views of ``out`` (:func:`plan_views`).  No host sync: capturable in a
        CUDA graph.
    """
    if triton is None:
        raise RuntimeError("megatron-eplb: the fused per-step plan needs triton, which does not import here")
    num_experts, copies = tables.copy_rank.shape
    n, f, s = tables.num_ranks, tables.num_fast, tables.slots_per_rank
    d = tables.max_copies
    load = load.reshape(-1).to(torch.int64)
    if load.shape[0] != num_experts:
        raise ValueError(f"load has {load.shape[0]} experts, the tables {num_experts}")
    size = n * f + 3 * num_experts * d
    if out is None:
        out = torch.empty(size, dtype=torch.int64, device=load.device)
    elif out.shape != (size,) or out.dtype != torch.int64 or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous int64 [{size}] tensor, not {out.dtype} {tuple(out.shape)}"
        )
    plan = plan_views(out, tables)
    if num_experts == 0:
        return plan
    if load.is_cuda and load.device.index != torch.cuda.current_device():
        with torch.cuda.device(load.device):  # triton launches on the current device
            return plan_fast_replicas_fused(load, tables, iterations, out)
    cfg = dict(_launch_config(num_experts, copies, n, f))
    num_warps = cfg.pop("num_warps")
    _fast_plan_kernel[(1,)](
        load.contiguous(),
        tables.copy_rank.contiguous(),
        tables.copy_slot.contiguous(),
        tables.holds.contiguous(),
        out,
        num_experts,
        copies,
        n,
        s,
        f,
        d,
        ITERATIONS=max(int(iterations), 0),
        ROUNDS=n * f,
        BIG=_BIG,
        num_warps=num_warps,
        enable_fp_fusion=False,  # no fp64 multiply-add contraction in the line search
        **cfg,
    )
    return plan


def plan_views(flat: torch.Tensor, tables: FastTables) -> FastPlan:
    """The :class:`~megatron_eplb.fast_replicas.FastPlan` of one step laid out in one int64 buffer ``flat``
    ``[N * F + 3 * E * D]`` (``fast_expert``, ``copy_rank``, ``copy_slot``, ``shares``, each row-major): views."""
    num_experts, n, f, d = tables.copy_rank.shape[0], tables.num_ranks, tables.num_fast, tables.max_copies
    ed = num_experts * d
    return FastPlan(
        flat[: n * f].view(n, f),
        flat[n * f : n * f + ed].view(num_experts, d),
        flat[n * f + ed : n * f + 2 * ed].view(num_experts, d),
        flat[n * f + 2 * ed :].view(num_experts, d),
    )


if triton is not None:

    @triton.jit
    def _to_expert_ranks(v, rank, n):
        """``[E_P, X_P]`` values summed onto their ranks per row: ``[E_P, N_P]`` (a row's ``scatter_add``)."""
        hit = rank[:, :, None] == n[None, None, :]
        return tl.sum(tl.where(hit, v[:, :, None], 0), axis=1)

    @triton.jit
    def _first_max(v, idx, valid):
        """``argmax`` of a ``[X]`` int64 vector over ``valid`` (which holds index 0): the lowest index among the
        maxima, as torch returns."""
        v0 = tl.sum(tl.where(idx == 0, v, 0), axis=0)  # index 0 is valid: no sentinel below every int64
        best = tl.max(tl.where(valid, v, v0), axis=0)
        return tl.min(tl.where(valid & (v == best), idx, 1 << 30), axis=0)

    @triton.jit
    def _spare_hits(spare_at, spare_col, d):
        """``[E_P, D_P, N_P]``: union column ``d`` of expert ``e`` is its spare copy on rank ``n``."""
        return spare_at[:, None, :] & (spare_col[:, None, :] == d[None, :, None])

    @triton.jit(do_not_specialize=["num_experts", "copies", "num_ranks", "slots", "num_fast", "union"])
    def _fast_plan_kernel(
        load_ptr,  # int64 [E]
        copy_rank_ptr,  # int64 [E, C]
        copy_slot_ptr,  # int64 [E, C]
        holds_ptr,  # bool [E, N]
        out_ptr,  # int64 [N * F + 3 * E * D], written: fast_expert, copy_rank, copy_slot, shares
        num_experts,
        copies,  # C
        num_ranks,
        slots,  # S
        num_fast,  # F
        union,  # D
        ITERATIONS: tl.constexpr,
        ROUNDS: tl.constexpr,  # N * F
        BIG: tl.constexpr,
        E_P: tl.constexpr,
        C_P: tl.constexpr,
        D_P: tl.constexpr,
        N_P: tl.constexpr,
        F_P: tl.constexpr,
    ):
        e = tl.arange(0, E_P)
        c = tl.arange(0, C_P)
        d = tl.arange(0, D_P)
        n = tl.arange(0, N_P)
        j = tl.arange(0, F_P)
        in_e = e < num_experts
        in_n = n < num_ranks
        no_fixed = tl.zeros([N_P], dtype=tl.int64)
        amount = tl.load(load_ptr + e, mask=in_e, other=0)  # [E_P]

        # 1. The balanced split over the persistent copies (padding: rank N, a missing copy).
        in_ec = in_e[:, None] & (c[None, :] < copies)
        prank = tl.load(copy_rank_ptr + e[:, None] * copies + c[None, :], mask=in_ec, other=num_ranks)
        pmissing = prank == num_ranks
        pcount = tl.sum((~pmissing).to(tl.int64), axis=1)  # [E_P] persistent copies (a prefix of the row)
        even = _even(amount, tl.maximum(pcount, 1), c)
        persistent = _split_rounds(even, amount, prank, pmissing, no_fixed, c, n, in_n, ITERATIONS, BIG)
        pworst_even = _worst_rank(even, prank, no_fixed, n, in_n)
        pworst = _worst_rank(persistent, prank, no_fixed, n, in_n)
        persistent = tl.where(pworst > pworst_even, even, persistent)
        pworst = tl.minimum(pworst, pworst_even)  # the busiest rank of the persistent split kept

        # 2. The greedy rounds: the busiest rank's best expert copied to the lightest open rank.
        on_rank = tl.where(in_n[None, :], _to_expert_ranks(persistent, prank, n), 0)  # [E_P, N_P]
        rank_load = tl.sum(on_rank, axis=0)  # [N_P]
        in_en = in_e[:, None] & in_n[None, :]
        has = tl.load(holds_ptr + e[:, None] * num_ranks + n[None, :], mask=in_en, other=0) != 0
        free = tl.where(in_n, num_fast, 0).to(tl.int64)  # [N_P]; padding ranks are never open
        fast = tl.full([N_P, F_P], -1, dtype=tl.int64)
        scale = tl.sum(amount, axis=0) + 1
        for _ in range(ROUNDS):
            r = _first_max(rank_load, n, in_n)
            top = tl.sum(tl.where(n == r, rank_load, 0), axis=0)
            on_r = tl.sum(tl.where(n[None, :] == r, on_rank, 0), axis=1)  # [E_P]
            open_ = (free > 0)[None, :] & ~has
            level = tl.where(open_, rank_load[None, :], BIG)
            level = tl.where(in_n[None, :], level, 2 * BIG)  # padding ranks above every real level
            low = tl.min(level, axis=1)  # [E_P]
            target = tl.min(tl.where(level == low[:, None], n[None, :], N_P), axis=1)  # first minimum
            gain = tl.maximum(tl.minimum(on_r, _floor_div(top - low, 2)), 0)
            x = _first_max(gain * scale + on_r, e, in_e)  # the expert copied
            moved = tl.sum(tl.where(e == x, gain, 0), axis=0)
            t = tl.sum(tl.where(e == x, target, 0), axis=0)
            ok = moved > 0
            free_t = tl.sum(tl.where(n == t, free, 0), axis=0)
            slot = tl.minimum(num_fast - free_t, num_fast - 1)
            fast = tl.where(ok & (n[:, None] == t) & (j[None, :] == slot), x, fast)
            row = (e == x)[:, None]
            on_rank += tl.where(row & (n[None, :] == t), moved, 0) - tl.where(
                row & (n[None, :] == r), moved, 0
            )
            rank_load += tl.where(n == t, moved, 0) - tl.where(n == r, moved, 0)
            has = has | (row & (n[None, :] == t) & ok)
            free -= (ok & (n == t)).to(tl.int64)

        # 3. The union: persistent copies in their order, then the spare copies by rank (written out now).
        spare = (fast[None, :, :] == e[:, None, None]) & (j[None, None, :] < num_fast)  # [E_P, N_P, F_P]
        spare_at = tl.sum(spare.to(tl.int64), axis=2) > 0  # [E_P, N_P] (one per rank at most)
        spare_j = tl.sum(tl.where(spare, j[None, None, :], 0), axis=2)  # [E_P, N_P]
        before = (n[:, None] < n[None, :])[None, :, :]  # [1, n', n]: n' < n
        spare_col = pcount[:, None] + tl.sum(
            (before & spare_at[:, :, None]).to(tl.int64), axis=1
        )  # [E_P, N_P]
        hit = _spare_hits(spare_at, spare_col, d)  # [E_P, D_P, N_P]
        any_hit = tl.sum(hit.to(tl.int64), axis=2) > 0  # [E_P, D_P]
        spare_rank = tl.sum(tl.where(hit, n[None, None, :], 0), axis=2)
        spare_slot = tl.sum(
            tl.where(hit, (n * (slots + num_fast) + slots)[None, None, :] + spare_j[:, None, :], 0), axis=2
        )
        in_ed = in_e[:, None] & (d[None, :] < copies)
        first = d[None, :] < pcount[:, None]
        urank = tl.load(copy_rank_ptr + e[:, None] * copies + d[None, :], mask=in_ed & first, other=num_ranks)
        uslot = tl.load(copy_slot_ptr + e[:, None] * copies + d[None, :], mask=in_ed & first, other=-1)
        urank = tl.where(first, urank, tl.where(any_hit, spare_rank, num_ranks))
        uslot = tl.where(first, uslot, tl.where(any_hit, spare_slot, -1))
        nf = num_ranks * num_fast
        ed = num_experts * union
        at = e[:, None] * union + d[None, :]
        in_u = in_e[:, None] & (d[None, :] < union)
        tl.store(out_ptr + nf + at, urank, mask=in_u)
        tl.store(out_ptr + nf + ed + at, uslot, mask=in_u)

        # 4. The balanced split over the union, never worse than step 1's.
        umissing = urank == num_ranks
        ucount = tl.sum((~umissing).to(tl.int64), axis=1)
        ueven = _even(amount, tl.maximum(ucount, 1), d)
        shares = _split_rounds(ueven, amount, urank, umissing, no_fixed, d, n, in_n, ITERATIONS, BIG)
        uworst_even = _worst_rank(ueven, urank, no_fixed, n, in_n)
        uworst = _worst_rank(shares, urank, no_fixed, n, in_n)
        shares = tl.where(uworst > uworst_even, ueven, shares)
        worse = tl.minimum(uworst, uworst_even) > pworst
        # A spare slot whose copy computes nothing stays empty (with step 1's split none computes anything).
        # The [E_P, D_P, N_P] and [E_P, N_P, F_P] masks again from their small factors (short live ranges).
        spare_tokens = tl.sum(tl.where(_spare_hits(spare_at, spare_col, d), shares[:, :, None], 0), axis=1)
        spare = (fast[None, :, :] == e[:, None, None]) & (j[None, None, :] < num_fast)
        slot_tokens = tl.sum(tl.where(spare, spare_tokens[:, :, None], 0), axis=0)  # [N_P, F_P]
        fast = tl.where((slot_tokens > 0) & ~worse, fast, -1)
        tl.store(
            out_ptr + n[:, None] * num_fast + j[None, :], fast, mask=in_n[:, None] & (j[None, :] < num_fast)
        )
        # shares: the union's, or step 1's padded to D columns (stores to disjoint columns)
        tl.store(
            out_ptr + nf + 2 * ed + at,
            tl.where(worse, 0, shares),
            mask=in_u & (~worse | (d[None, :] >= copies)),
        )
        tl.store(out_ptr + nf + 2 * ed + e[:, None] * union + c[None, :], persistent, mask=in_ec & worse)
