"""Per-step replicas' plan as one fused Triton kernel: ``plan_fast_replicas(load[None], tables)`` of
:mod:`megatron_eplb.fast_replicas` for one step, bitwise equal in every output of its
:class:`~megatron_eplb.fast_replicas.FastPlan`, in one launch of one program (the whole problem fits in one
block) instead of hundreds of small kernels.

Shapes as in :mod:`megatron_eplb.fast_replicas`: ``E`` logical experts, ``N`` ranks, ``S`` persistent and ``F``
spare slots per rank, ``C`` most persistent copies of one expert, ``D = tables.max_copies`` most copies in the
union, ``K`` entries of :attr:`~megatron_eplb.fast_replicas.FastTables.replicated` (the experts with two or more
persistent copies, then ``-1``), ``R = K + N * F`` rows of the union split.  The kernel pads ``E``, ``C``, ``D``,
``N``, ``F``, ``K``, ``R`` to powers of two (``E_P``, ..., ``R_P``) and masks the padding.  The same integer steps
as the torch code, in its order:

1. the balanced split over the persistent copies: the split kernel's own helpers
   (:mod:`megatron_eplb.replica_split_triton`: ``_even``, ``_split_rounds``, ``_worst_rank``, never worse than
   the even split) over the ``K`` replicated experts only (``[K_P, C_P]``), the single-copy experts' loads fixed
   on their ranks: a single copy's water-filling step is 0 in every round, so the line search's rank sums and
   the never-worse comparison are the same integers as over all ``E``;
2. the ``N * F`` greedy rounds of :func:`~megatron_eplb.fast_replicas.choose_fast_replicas` on an
   ``[E_P, N_P]`` tile of each expert's tokens per rank: ``argmax`` / ``argmin`` as the first maximum / minimum
   (the lowest index among the ties, as torch returns), picked out by one-hot reductions; the key
   ``gain * scale + on_r`` in the same wrapping int64 arithmetic;
3. the union split's ``[R_P]`` rows: the ``K`` replicated experts, then the experts of the ``N * F`` spare slots
   (an expert already listed, or an empty slot: a padding row); every expert outside them has one copy in the
   union.  The union tables without a sort: a row's spare copies (at most one per rank) follow its persistent
   copies in rank order, so spare copy on rank ``n`` sits at column ``count + #{n' < n with one}``; the rows'
   tables and the others' (their persistent copy) written out;
4. the balanced split over the union's rows (``[R_P, D_P]``, the same helpers, the others' loads fixed), the
   never-worse check against step 1 (else step 1's shares, the spare copies idle), and a spare slot whose copy
   computes nothing left empty; a single copy's share is its expert's whole load.

So the splits' water-filling tiles are ``[K_P, C_P, max(N_P, C_P)]`` and ``[R_P, D_P, max(N_P, D_P)]`` instead
of ``E_P`` rows (e.g. ``E = 64, N = 8, F = 1, C = 1``: ``[8, 8, 8]`` instead of ``[64, 8, 8]``).

Integer sums of products that overflow (loads near ``2**40`` make ``gain * scale`` and the line search's dot
products wrap) wrap alike here and in torch: int64 addition and multiplication are a ring modulo ``2**64``, so
the order of the reductions does not matter; only ``num / den`` goes through fp64, correctly rounded on both
sides.  Loads must be ``>= 0`` and below ``2**49`` (as for the torch code's ``_BIG`` levels); the tables as
:func:`~megatron_eplb.fast_replicas.fast_tables` makes them (an expert's real copies first, then padding).

The cross-node rule (step 2a of :mod:`megatron_eplb.fast_replicas`, tables whose
:attr:`~megatron_eplb.fast_replicas.FastTables.cross_node_rule` is set) is compiled in only for them (``RULE``, a
constexpr: the rule-free kernel is the same code as without it): in each greedy round a second first-minimum over
the open ranks of the nodes holding each expert (:attr:`~megatron_eplb.fast_replicas.FastTables.near`), and the
expert picked by its value (``g_all - m`` across nodes, else the gain) instead of its gain.

Triton is optional: this module imports without it (:func:`available` is then ``False``) and
:class:`~megatron_eplb.fast_replicas.FastPlanner` imports it only on CUDA.
"""

from __future__ import annotations

import functools

import torch

from .fast_replicas import _BIG, FastPlan, FastTables, replicated_list
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


def launch_config(
    num_experts: int, copies: int, num_ranks: int, num_fast: int, replicated: int | None = None
) -> dict:
    """The kernel's padded sizes and warps for one layer's shapes.

    Args:
        num_experts: ``E``; copies: ``C`` (persistent); num_ranks: ``N``; num_fast: ``F``.
        replicated: ``K``, the length of :attr:`~megatron_eplb.fast_replicas.FastTables.replicated` (default:
            the most there can be, ``0`` if ``C = 1`` else ``E``).
    Returns:
        ``{"E_P", "C_P", "D_P", "N_P", "F_P", "K_P", "R_P", "num_warps"}`` (powers of two; ``D`` as
        :attr:`~megatron_eplb.fast_replicas.FastTables.max_copies`; ``R = K + N * F`` the union split's rows).
    """
    if replicated is None:
        replicated = 0 if copies <= 1 else num_experts
    union = copies + min(num_ranks * num_fast, max(num_ranks - 1, 0))
    e_p, c_p, d_p = _pow2(num_experts), _pow2(copies), _pow2(union)
    n_p, f_p = _pow2(num_ranks), _pow2(num_fast)
    # the union split's rows: the K, then the N * F spare slots' experts (a repeat is a padding row)
    k_p, r_p = _pow2(replicated), _pow2(replicated + num_ranks * num_fast)
    tile = _largest_tile(e_p, c_p, d_p, n_p, f_p, k_p, r_p)
    # from 4096 int64 elements on 16 warps (measured on the H200: 16 beat 8 there), below 8 or 4
    num_warps = 4 if tile <= 1024 else 8 if tile < 4096 else 16
    return {
        "E_P": e_p,
        "C_P": c_p,
        "D_P": d_p,
        "N_P": n_p,
        "F_P": f_p,
        "K_P": k_p,
        "R_P": r_p,
        "num_warps": num_warps,
    }


def _largest_tile(e_p: int, c_p: int, d_p: int, n_p: int, f_p: int, k_p: int, r_p: int) -> int:
    # the persistent split's [K_P, C_P, max(N_P, C_P)], the union split's [R_P, D_P, max(N_P, D_P)], the rows'
    # spare copies [R_P, N_P, max(N_P, F_P)] and list [R_P, R_P], the persistent split back onto the experts
    # [E_P, K_P, C_P] and onto their ranks [E_P, C_P, N_P], the greedy [E_P, N_P], the tables [E_P, D_P] and
    # the experts' membership of the rows [E_P, R_P]
    return max(
        k_p * c_p * max(n_p, c_p),
        r_p * d_p * max(n_p, d_p),
        r_p * n_p * max(n_p, f_p),
        r_p * r_p,
        e_p * c_p * max(k_p, n_p),
        e_p * max(n_p, d_p, r_p),
    )


@functools.lru_cache(maxsize=256)
def _launch_config(num_experts: int, copies: int, num_ranks: int, num_fast: int, replicated: int) -> tuple:
    return tuple(launch_config(num_experts, copies, num_ranks, num_fast, replicated).items())


def fits(num_experts: int, copies: int, num_ranks: int, num_fast: int, replicated: int | None = None) -> bool:
    """Whether one layer's plan fits the kernel's one block: its largest int64 tile at most :data:`MAX_TILE`
    elements (``1 << 14``).  The splits work over ``K`` and ``R = K + N * F`` rows, not ``E``, so larger layers fit
    than with every expert in the split tiles: with one persistent copy (``K = 0``) ``E <= 512`` at ``N <= 16``
    (before: ``E <= 64``) and ``E <= 1024`` at ``N <= 8`` (before: 256); with ``C = 2``, ``K <= 16`` (e.g.
    ``E + 16`` persistent slots) and ``F <= 2``, ``E <= 512`` at ``N <= 8`` (before: ``E <= 64``).  ``D_P >= 32``
    (``N >= 16`` with ``C >= 2``, ``N >= 32``) never fits.

    Args:
        num_experts: ``E``; copies: ``C`` (persistent); num_ranks: ``N``; num_fast: ``F``.
        replicated: ``K`` (:func:`launch_config`; default the most there can be).
    """
    cfg = launch_config(num_experts, copies, num_ranks, num_fast, replicated)
    shape = (cfg["E_P"], cfg["C_P"], cfg["D_P"], cfg["N_P"], cfg["F_P"], cfg["K_P"], cfg["R_P"])
    return _largest_tile(*shape) <= MAX_TILE


def _replicated(tables: FastTables) -> torch.Tensor:
    if tables.replicated is not None:
        return tables.replicated
    count = (tables.copy_rank != tables.num_ranks).sum(dim=1).cpu().numpy()  # a host sync: tables without it
    return torch.from_numpy(replicated_list(count, tables.num_ranks * tables.slots_per_rank)).to(
        tables.copy_rank.device
    )


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
        tables: the layer's :class:`~megatron_eplb.fast_replicas.FastTables` (without ``replicated``: derived
            here, a host sync).
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
    replicated = _replicated(tables)
    rule = bool(tables.cross_node_rule)
    cfg = dict(_launch_config(num_experts, copies, n, f, replicated.numel()))
    num_warps = cfg.pop("num_warps")
    _fast_plan_kernel[(1,)](
        load.contiguous(),
        tables.copy_rank.contiguous(),
        tables.copy_slot.contiguous(),
        tables.holds.contiguous(),
        tables.near.contiguous() if rule else tables.holds,  # any valid pointer without the rule
        # an empty [K] view may point one past its allocation: hand any valid pointer (never read when K = 0)
        replicated.contiguous() if replicated.numel() else out,
        out,
        num_experts,
        copies,
        n,
        s,
        f,
        d,
        replicated.numel(),
        int(tables.cross_node_min_gain) if rule else 0,
        ITERATIONS=max(int(iterations), 0),
        ROUNDS=n * f,
        BIG=_BIG,
        RULE=rule,
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

    @triton.jit
    def _first_rank(rank, c):
        """Each row's first copy rank of ``[R, X_P]``: ``[R]``."""
        return tl.sum(tl.where(c[None, :] == 0, rank, 0), axis=1)

    @triton.jit
    def _single_loads(amount, single, rank, n, in_n):
        """``[N_P]``: the rows flagged ``single [E_P]`` put their whole ``amount`` on their one copy's ``rank``."""
        hit = single[:, None] & (rank[:, None] == n[None, :]) & in_n[None, :]
        return tl.sum(tl.where(hit, amount[:, None], 0), axis=0)

    @triton.jit(
        do_not_specialize=[
            "num_experts",
            "copies",
            "num_ranks",
            "slots",
            "num_fast",
            "union",
            "num_replicated",
            "min_gain",
        ]
    )
    def _fast_plan_kernel(
        load_ptr,  # int64 [E]
        copy_rank_ptr,  # int64 [E, C]
        copy_slot_ptr,  # int64 [E, C]
        holds_ptr,  # bool [E, N]
        near_ptr,  # bool [E, N]: rank n's node holds e (read with RULE only)
        replicated_ptr,  # int64 [K]: the experts with >= 2 persistent copies, then -1
        out_ptr,  # int64 [N * F + 3 * E * D], written: fast_expert, copy_rank, copy_slot, shares
        num_experts,
        copies,  # C
        num_ranks,
        slots,  # S
        num_fast,  # F
        union,  # D
        num_replicated,  # K
        min_gain,  # m of the cross-node rule (RULE only)
        ITERATIONS: tl.constexpr,
        ROUNDS: tl.constexpr,  # N * F
        BIG: tl.constexpr,
        E_P: tl.constexpr,
        C_P: tl.constexpr,
        D_P: tl.constexpr,
        N_P: tl.constexpr,
        F_P: tl.constexpr,
        K_P: tl.constexpr,
        R_P: tl.constexpr,
        RULE: tl.constexpr = False,  # the cross-node rule (step 2a of megatron_eplb.fast_replicas)
    ):
        e = tl.arange(0, E_P)
        c = tl.arange(0, C_P)
        d = tl.arange(0, D_P)
        n = tl.arange(0, N_P)
        j = tl.arange(0, F_P)
        k = tl.arange(0, K_P)
        q = tl.arange(0, R_P)
        in_e = e < num_experts
        in_n = n < num_ranks
        amount = tl.load(load_ptr + e, mask=in_e, other=0)  # [E_P]
        in_ec = in_e[:, None] & (c[None, :] < copies)
        prank = tl.load(copy_rank_ptr + e[:, None] * copies + c[None, :], mask=in_ec, other=num_ranks)
        pcount = tl.sum((prank != num_ranks).to(tl.int64), axis=1)  # [E_P] persistent copies (a prefix)
        prank0 = _first_rank(prank, c)  # [E_P] the first copy's rank

        # 1. The balanced split over the persistent copies: only the K replicated experts water-fill (a single
        # copy's step is 0 in every round), the others' loads fixed on their ranks (the same rank sums).
        pfixed = _single_loads(amount, pcount == 1, prank0, n, in_n)
        rep = tl.load(replicated_ptr + k, mask=k < num_replicated, other=-1)
        in_k = rep >= 0
        rep_at = tl.where(in_k, rep, 0)
        kamount = tl.load(load_ptr + rep_at, mask=in_k, other=0)
        in_kc = in_k[:, None] & (c[None, :] < copies)
        krank = tl.load(copy_rank_ptr + rep_at[:, None] * copies + c[None, :], mask=in_kc, other=num_ranks)
        kmissing = krank == num_ranks
        kcount = tl.sum((~kmissing).to(tl.int64), axis=1)
        even = _even(kamount, tl.maximum(kcount, 1), c)
        persistent = _split_rounds(even, kamount, krank, kmissing, pfixed, c, n, in_n, ITERATIONS, BIG)
        pworst_even = _worst_rank(even, krank, pfixed, n, in_n)
        pworst = _worst_rank(persistent, krank, pfixed, n, in_n)
        persistent = tl.where(pworst > pworst_even, even, persistent)  # [K_P, C_P]
        pworst = tl.minimum(pworst, pworst_even)  # the busiest rank of the persistent split kept

        # 2. The greedy rounds: the busiest rank's best expert copied to the lightest open rank.
        # every expert's persistent split [E_P, C_P]: its K row's, or its whole load on its one copy
        mine = (e[:, None] == rep[None, :]) & in_k[None, :]  # [E_P, K_P]
        pshares = tl.sum(tl.where(mine[:, :, None], persistent[None, :, :], 0), axis=1)
        pshares += tl.where((pcount == 1)[:, None] & (c[None, :] == 0), amount[:, None], 0)
        on_rank = tl.where(in_n[None, :], _to_expert_ranks(pshares, prank, n), 0)  # [E_P, N_P]
        rank_load = tl.sum(on_rank, axis=0)  # [N_P]
        in_en = in_e[:, None] & in_n[None, :]
        has = tl.load(holds_ptr + e[:, None] * num_ranks + n[None, :], mask=in_en, other=0) != 0
        if RULE:
            near = tl.load(near_ptr + e[:, None] * num_ranks + n[None, :], mask=in_en, other=0) != 0
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
            if RULE:  # the lightest open rank in a node holding the expert; across nodes only when it pays
                nlevel = tl.where(open_ & near, rank_load[None, :], BIG)
                nlevel = tl.where(in_n[None, :], nlevel, 2 * BIG)
                nlow = tl.min(nlevel, axis=1)
                ntarget = tl.min(tl.where(nlevel == nlow[:, None], n[None, :], N_P), axis=1)
                ngain = tl.maximum(tl.minimum(on_r, _floor_div(top - nlow, 2)), 0)
                cross = tl.sum(((n[None, :] == target[:, None]) & near).to(tl.int64), axis=1) == 0
                use_near = cross & (gain - ngain < min_gain)
                target = tl.where(use_near, ntarget, target)
                value = tl.where(use_near, ngain, tl.where(cross, gain - min_gain, gain))
                gain = tl.where(use_near, ngain, gain)
            else:
                value = gain
            x = _first_max(value * scale + on_r, e, in_e)  # the expert copied
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

        # 3. The union split's rows: the K replicated experts, then the N * F spare slots' experts, each expert
        # once (a later repeat, an empty slot: padding).  Every other expert has one copy in the union.
        spare_q = q - num_replicated  # [R_P] the spare slot n * F + j of a row past the K
        slot_of = (n[None, :, None] * num_fast + j[None, None, :]) == spare_q[
            :, None, None
        ]  # [R_P, N_P, F_P]
        slot_of = slot_of & (j[None, None, :] < num_fast)
        chosen = tl.sum(tl.sum(tl.where(slot_of, fast[None, :, :] + 1, 0), axis=2), axis=1) - 1
        qrep = tl.load(replicated_ptr + q, mask=q < num_replicated, other=-1)
        rid = tl.where(q < num_replicated, qrep, chosen)  # [R_P] expert of each row, -1: none
        earlier = (q[:, None] < q[None, :]) & (rid[:, None] == rid[None, :])  # [q', q]
        in_q = (rid >= 0) & (tl.sum(earlier.to(tl.int64), axis=0) == 0)
        rid_at = tl.where(in_q, rid, 0)
        in_rows = tl.sum(((e[:, None] == rid[None, :]) & in_q[None, :]).to(tl.int64), axis=1) > 0  # [E_P]

        # The union tables: persistent copies in their order, then the spare copies by rank (written out now);
        # a row's spare copy on rank n sits at column count + #{n' < n with one}.
        qamount = tl.load(load_ptr + rid_at, mask=in_q, other=0)
        in_qd = in_q[:, None] & (d[None, :] < copies)
        first_q = tl.load(copy_rank_ptr + rid_at[:, None] * copies + d[None, :], mask=in_qd, other=num_ranks)
        qcount = tl.sum((first_q != num_ranks).to(tl.int64), axis=1)
        first = d[None, :] < qcount[:, None]
        spare = (fast[None, :, :] == rid[:, None, None]) & in_q[:, None, None]  # [R_P, N_P, F_P]
        spare = spare & (j[None, None, :] < num_fast)
        spare_at = tl.sum(spare.to(tl.int64), axis=2) > 0  # [R_P, N_P] (one per rank at most)
        spare_j = tl.sum(tl.where(spare, j[None, None, :], 0), axis=2)  # [R_P, N_P]
        before = (n[:, None] < n[None, :])[None, :, :]  # [1, n', n]: n' < n
        spare_col = qcount[:, None] + tl.sum((before & spare_at[:, :, None]).to(tl.int64), axis=1)
        hit = _spare_hits(spare_at, spare_col, d)  # [R_P, D_P, N_P]
        any_hit = tl.sum(hit.to(tl.int64), axis=2) > 0  # [R_P, D_P]
        spare_rank = tl.sum(tl.where(hit, n[None, None, :], 0), axis=2)
        spare_slot = tl.sum(
            tl.where(hit, (n * (slots + num_fast) + slots)[None, None, :] + spare_j[:, None, :], 0), axis=2
        )
        qslot = tl.load(copy_slot_ptr + rid_at[:, None] * copies + d[None, :], mask=in_qd & first, other=-1)
        urank = tl.where(first, first_q, tl.where(any_hit, spare_rank, num_ranks))
        uslot = tl.where(first, qslot, tl.where(any_hit, spare_slot, -1))
        nf = num_ranks * num_fast
        ed = num_experts * union
        at = e[:, None] * union + d[None, :]
        in_u = in_e[:, None] & (d[None, :] < union)
        qat = rid_at[:, None] * union + d[None, :]
        in_qu = in_q[:, None] & (d[None, :] < union)
        tl.store(out_ptr + nf + qat, urank, mask=in_qu)
        tl.store(out_ptr + nf + ed + qat, uslot, mask=in_qu)
        # the experts outside the rows: their persistent copies (one), padding after
        in_ed = in_e[:, None] & (d[None, :] < copies)
        erank = tl.load(copy_rank_ptr + e[:, None] * copies + d[None, :], mask=in_ed, other=num_ranks)
        eslot = tl.load(copy_slot_ptr + e[:, None] * copies + d[None, :], mask=in_ed, other=-1)
        alone = in_u & ~in_rows[:, None]
        tl.store(out_ptr + nf + at, erank, mask=alone)
        tl.store(out_ptr + nf + ed + at, eslot, mask=alone)

        # 4. The balanced split over the union's rows (the others' loads fixed), never worse than step 1's.
        ufixed = _single_loads(amount, in_e & ~in_rows, prank0, n, in_n)
        umissing = urank == num_ranks
        ucount = tl.sum((~umissing).to(tl.int64), axis=1)
        ueven = _even(qamount, tl.maximum(ucount, 1), d)
        shares = _split_rounds(ueven, qamount, urank, umissing, ufixed, d, n, in_n, ITERATIONS, BIG)
        uworst_even = _worst_rank(ueven, urank, ufixed, n, in_n)
        uworst = _worst_rank(shares, urank, ufixed, n, in_n)
        shares = tl.where(uworst > uworst_even, ueven, shares)  # [R_P, D_P]
        worse = tl.minimum(uworst, uworst_even) > pworst
        # A spare slot whose copy computes nothing stays empty (with step 1's split none computes anything).
        # The [R_P, D_P, N_P] and [R_P, N_P, F_P] masks again from their small factors (short live ranges).
        spare_tokens = tl.sum(tl.where(_spare_hits(spare_at, spare_col, d), shares[:, :, None], 0), axis=1)
        spare = (fast[None, :, :] == rid[:, None, None]) & in_q[:, None, None]
        spare = spare & (j[None, None, :] < num_fast)
        slot_tokens = tl.sum(tl.where(spare, spare_tokens[:, :, None], 0), axis=0)  # [N_P, F_P]
        fast = tl.where((slot_tokens > 0) & ~worse, fast, -1)
        tl.store(
            out_ptr + n[:, None] * num_fast + j[None, :], fast, mask=in_n[:, None] & (j[None, :] < num_fast)
        )
        # shares (stores to disjoint elements): a single copy's row its whole load on column 0; the union's rows,
        # or step 1's K rows (columns past C: 0)
        single = tl.where(worse, (pcount < 2)[:, None] | (d[None, :] >= copies), ~in_rows[:, None])
        tl.store(
            out_ptr + nf + 2 * ed + at, tl.where(d[None, :] == 0, amount[:, None], 0), mask=in_u & single
        )
        tl.store(out_ptr + nf + 2 * ed + qat, shares, mask=in_qu & ~worse)
        kat = rep_at[:, None] * union + c[None, :]
        tl.store(out_ptr + nf + 2 * ed + kat, persistent, mask=in_kc & worse)
