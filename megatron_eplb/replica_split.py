"""Per-batch replica shares: split each replicated expert's tokens over its copies from this batch's exact
global counts, so that this batch's busiest rank is as light as the placement allows (``balanced`` replica
dispatch).  No weights move; every rank computes the same split from the same gathered counts.

Pure torch functions (CPU and CUDA), integer arithmetic only, so the result is bitwise the same on every rank
and device; a fixed number of vectorized ops (no Python loop over experts, no host sync), so that it can run
inside every MoE layer's forward and be captured in a CUDA graph.  Shapes: ``E`` logical experts, ``P``
physical slots of a layer, ``N`` ranks of the EP group (slot ``s`` on rank ``s // (P / N)``), ``C`` most
copies of one expert, ``K`` replicated experts of the layer (2 or more copies).

The algorithm, step by step (:func:`balanced_shares`):

1. an expert with one copy puts all its tokens on that copy's rank: the fixed rank loads ``F [N]``;
2. each replicated expert's tokens are water-filled over its copies' ranks: the copies on the lowest rank
   loads get tokens until their level meets the next copy's (:func:`water_fill`), the other replicated
   experts' shares held fixed.  All replicated experts do this at once, and the step towards that is
   shortened by an exact line search on the sum of squared rank loads (two experts that share a hot rank
   would otherwise both leave it).  The limit of these steps is the split that minimises the sum of squared
   rank loads, which also minimises the busiest rank (the rank loads reachable by splitting form a
   polymatroid's base polytope); 8 rounds reach >= 0.98 of it on the loads we measured;
3. per source rank, the pairs of expert ``e`` are laid end to end in rank order and the copies take
   consecutive runs of them (:func:`copy_bounds`): source rank ``r``'s ``i``-th pair of ``e`` has global
   position ``first[r, e] + i`` and goes to the copy whose run holds that position;
4. optionally the run ends are rounded to a multiple of ``align`` tokens (:func:`align_bounds`), so that every
   copy but an expert's last computes whole row tiles of the grouped GEMM (a split that cuts an expert's rows
   mid-tile costs a partial tile per cut: 83 µs per forward for 8 split experts on an H200 against 10 µs
   aligned, ``benchmarks/recording_overhead.py``); each cut moves at most ``align / 2`` tokens.

:func:`best_split_bound` (numpy, exact) is the ceiling the benchmarks and tests compare with.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .kernel_paths import KernelPaths

__all__ = [
    "DEFAULT_ITERATIONS",
    "BalancedSplit",
    "align_bounds",
    "ReplicaTables",
    "balanced_shares",
    "best_split_bound",
    "copy_bounds",
    "device_tables",
    "even_shares",
    "rank_loads_of_shares",
    "replica_tables",
    "source_offset",
    "source_offsets",
    "water_fill",
]

DEFAULT_ITERATIONS = 8
"""Water-filling rounds: enough for >= 0.98 of the exact optimum on the loads we measured
(``tests/test_replica_split.py``, ``benchmarks/replica_split_bench.py``)."""

_BIG = 1 << 50  # the level of a padding copy: above any real rank load, and ``_BIG * C`` fits int64


class ReplicaTables(NamedTuple):
    """Device tables of one layer's placement for :func:`balanced_shares` (made by :func:`replica_tables`).

    Attributes:
        copy_rank: int64 ``[E, C]`` rank of each copy of each expert (ascending slot order), ``N`` for padding.
        copy_count: int64 ``[E]`` copies of each expert (>= 1).
        single_rank: int64 ``[E]`` the rank of an expert's only copy; ``N`` for replicated experts.
        replicated: int64 ``[K]`` the replicated experts (ascending).
        num_ranks: ``N``.
    """

    copy_rank: torch.Tensor
    copy_count: torch.Tensor
    single_rank: torch.Tensor
    replicated: torch.Tensor
    num_ranks: int


def replica_tables(
    phy2log_row: np.ndarray, num_ranks: int, num_experts: int, device: torch.device | str = "cpu"
) -> ReplicaTables:
    """The tables of one layer (host work, once per placement change).

    Args:
        phy2log_row: int ``[P]`` logical expert of each slot (``-1`` = empty).
        num_ranks: ``N`` (``P % N == 0``).
        num_experts: ``E``; every expert needs at least one copy.
    Returns:
        :class:`ReplicaTables` on ``device``.
    """
    row = np.asarray(phy2log_row, dtype=np.int64).reshape(-1)
    if row.shape[0] % num_ranks:
        raise ValueError(f"{row.shape[0]} slots do not divide over {num_ranks} ranks")
    slot_rank = np.arange(row.shape[0]) // (row.shape[0] // num_ranks)
    count = np.bincount(row[row >= 0], minlength=num_experts)[:num_experts]
    if (count == 0).any():
        raise ValueError(f"experts {np.nonzero(count == 0)[0].tolist()} have no copy")
    copies = int(count.max())
    copy_rank = np.full((num_experts, copies), num_ranks, dtype=np.int64)
    order = np.argsort(np.where(row >= 0, row, num_experts), kind="stable")
    order = order[row[order] >= 0]
    starts = np.concatenate([[0], np.cumsum(count)[:-1]])
    position = np.arange(order.shape[0]) - starts[row[order]]
    copy_rank[row[order], position] = slot_rank[order]
    single_rank = np.where(count == 1, copy_rank[:, 0], num_ranks)
    parts = [copy_rank, count, single_rank, np.nonzero(count > 1)[0]]
    return ReplicaTables(*device_tables([torch.from_numpy(p) for p in parts], device), int(num_ranks))


def device_tables(parts: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Integer CPU tables on ``device`` in one host-to-device copy (int64, the same shapes; views of one
    buffer).  On CUDA from pinned memory, asynchronously: a placement commit lands in a layer's forward
    pre-hook, where a pageable copy would synchronise the stream mid-forward."""
    flat = torch.cat([p.reshape(-1).to(torch.int64) for p in parts])
    device = torch.device(device)
    flat = flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat.to(device)
    return [v.view(p.shape) for v, p in zip(flat.split([p.numel() for p in parts]), parts)]


def water_fill(levels: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """Pour ``amount[k]`` tokens onto the copies of row ``k`` so that the fullest copy is as low as possible.

    Integer water-filling: the copies on the lowest levels are raised to a common level ``lam``; the
    remainder ``< #raised`` goes one token each to the lowest of them (ties: the lower copy index).

    Args:
        levels: int64 ``[K, C]`` current load under each copy (``>= _BIG`` marks a missing copy).
        amount: int64 ``[K]`` tokens to pour (>= 0).
    Returns:
        int64 ``[K, C]`` tokens per copy (>= 0, rows sum to ``amount``, 0 on missing copies).
    """
    copies = levels.shape[1]
    low, perm = levels.sort(dim=1, stable=True)
    prefix = low.cumsum(dim=1)
    k = torch.arange(1, copies + 1, device=levels.device)
    # Copies j < m are raised, m = #{k : amount + prefix[k-1] >= k * low[k-1]} (a prefix of the sorted copies).
    raised = (amount.unsqueeze(1) + prefix >= k * low).sum(dim=1, keepdim=True)  # [K, 1], >= 1
    total = amount.unsqueeze(1) + prefix.gather(1, raised - 1)
    lam = total.div(raised, rounding_mode="floor")
    remainder = total - lam * raised
    j = k - 1
    sorted_share = torch.where(j < raised, lam - low + (j < remainder), 0)
    return torch.zeros_like(sorted_share).scatter_(1, perm, sorted_share)


def even_shares(load: torch.Tensor, copy_count: torch.Tensor, copies: int) -> torch.Tensor:
    """The even split (the ``even`` dispatch's, up to which copies get the leftover pairs).

    Args:
        load: int64 ``[..., E]`` tokens per expert.
        copy_count: int64 ``[E]``.
        copies: ``C``.
    Returns:
        int64 ``[..., E, C]``: ``load // c`` per copy, the first ``load % c`` copies one more, 0 past ``c``.
    """
    c = torch.arange(copies, device=load.device)
    base = load.div(copy_count, rounding_mode="floor").unsqueeze(-1)
    extra = (c < (load % copy_count).unsqueeze(-1)).to(load.dtype)
    return torch.where(c < copy_count.unsqueeze(-1), base + extra, 0)


def balanced_shares(
    load: torch.Tensor, tables: ReplicaTables, iterations: int = DEFAULT_ITERATIONS
) -> torch.Tensor:
    """Tokens of each copy for this batch: the busiest rank as light as the placement allows.

    Args:
        load: int64 ``[..., E]`` this batch's global tokens per logical expert (summed over the EP group);
            leading dimensions are independent batches (the replay splits many steps at once).
        tables: the layer's :class:`ReplicaTables` (same device as ``load``).
        iterations: water-filling rounds (a fixed op count: about ``30 * iterations`` small kernels).
    Returns:
        int64 ``[..., E, C]`` tokens per copy (rows sum to ``load``; an expert with one copy keeps all on
        copy 0; never a busier busiest rank than :func:`even_shares`).  Deterministic: equal inputs give
        bitwise equal outputs on any device.
    """
    load = load.to(torch.int64)
    copy_rank, copy_count, single_rank, replicated, n = tables
    num_experts, copies = copy_rank.shape
    shares = even_shares(load, copy_count, copies)  # [..., E, C]
    if replicated.numel() == 0 or iterations <= 0:
        return shares
    batch = load.shape[:-1]
    load = load.reshape(-1, num_experts)  # [B, E]
    shares = shares.reshape(-1, num_experts, copies)  # [B, E, C]
    b = load.shape[0]
    fixed = load.new_zeros(b, n + 1).index_add_(1, single_rank, load)  # [B, N + 1]
    rank = copy_rank.index_select(0, replicated)  # [K, C]
    missing = rank == n
    amount = load.index_select(1, replicated).reshape(-1)  # [B * K]
    x = shares.index_select(1, replicated)  # [B, K, C]
    flat_rank = rank.reshape(-1)
    for _ in range(iterations):
        rank_load = fixed.index_add(1, flat_rank, x.reshape(b, -1))  # [B, N + 1]
        others = (rank_load.index_select(1, flat_rank).view_as(x) - x).masked_fill(missing, _BIG)
        # every replicated expert water-filled with the others held
        step = water_fill(others.reshape(-1, copies), amount).view_as(x) - x
        # Exact line search of sum(rank_load ** 2) along the step: alpha = -<L, D> / <D, D>, in [0, 1].  The
        # dot products are exact integers (< 2**53), so alpha is the same double on every device.
        change = torch.zeros_like(rank_load).index_add_(1, flat_rank, step.reshape(b, -1))[:, :n]
        num = -(rank_load[:, :n] * change).sum(dim=1)
        den = (change * change).sum(dim=1).clamp(min=1)
        alpha = (num.double() / den.double()).clamp(0.0, 1.0).view(b, 1, 1)
        # Moving the cumulative shares keeps every row's sum exact (both ends at ``amount``) and >= 0.
        before = x.cumsum(dim=2)
        after = before + torch.floor(alpha * step.cumsum(dim=2).double()).to(torch.int64)
        x = torch.diff(after, dim=2, prepend=torch.zeros_like(after[..., :1]))
    balanced = shares.index_copy(1, replicated, x)
    # The steps minimise the sum of squares, not the max: never hand back worse than the even split.
    worse = rank_loads_of_shares(balanced, tables).amax(-1) > rank_loads_of_shares(shares, tables).amax(-1)
    return torch.where(worse.view(b, 1, 1), shares, balanced).reshape(*batch, num_experts, copies)


class BalancedSplit(KernelPaths):
    """One layer's per-batch split, ``copy_bounds(balanced_shares(load, tables))``, at a cost fit for every MoE
    layer's forward.  Eagerly its ~470 small kernels took 6.5-9.4 ms of host time per call on an H200 host (the
    forward's launch rate), replayed as one CUDA graph 0.7 ms (``benchmarks/replica_split_bench.py``; through
    ``torch.compile`` still ~310 kernels and 0.5-1.0 ms replayed, so no gain).  So on CUDA it takes the paths of
    :mod:`megatron_eplb.kernel_paths`: the fused kernel of :mod:`megatron_eplb.replica_split_triton` (bitwise the
    same bounds) where triton imports and the layer fits its one block (``replica_split_triton.fits``), else the
    torch functions as one CUDA graph; both read the tables in place.

    A new placement whose tables have the same shapes (as many replicated experts, as many copies at most) is
    copied into them (:meth:`retarget`) and keeps the kernel or graph; other shapes make a new split (a new
    graph capture, tens of milliseconds of host time; a kernel of new padded sizes compiles once per process,
    0.5-10 s of host time, then cached on disk by triton).  Which path runs is logged once per process.

    Args:
        tables: the layer's :class:`ReplicaTables`.
        iterations: water-filling rounds.
        align: the bounds rounded to multiples of this many tokens (:func:`align_bounds`; 1: exact).
    Call: ``split(load)`` with int64 ``[E]`` global tokens per expert (``tables``' device) returns int64
    ``[E, C - 1]`` copy bounds (a fresh tensor)."""

    LABEL = "balanced dispatch split"
    RESULT = "split"
    FUSED_IN_GRAPH = False
    """One launch per call: with triton 3.6 on an H200 host a launch (~15 us of host time) costs no more than a
    replay with its input and output copies (~20 us), and the copies are two more kernels on the forward's
    critical path (whole GroupedMLP patch +0.90 % launched against +1.03 % replayed, same run)."""

    def __init__(self, tables: ReplicaTables, iterations: int = DEFAULT_ITERATIONS, align: int = 1) -> None:
        self.tables = tables
        self.iterations = iterations
        self.align = max(int(align), 1)
        self._choose_path(tables.copy_rank.device)

    def _kernel(self):
        from . import replica_split_triton as fused

        num_experts, copies = self.tables.copy_rank.shape
        shape = (num_experts, copies, self.tables.replicated.numel(), self.tables.num_ranks)
        if not fused.available():
            return None, "triton does not import"
        if not fused.fits(*shape):
            return None, f"E, C, K, N = {shape} exceed the fused kernel's one block"
        return fused, None

    def retarget(self, tables: ReplicaTables) -> BalancedSplit:
        """This layer's split for a new placement's ``tables``: ``self`` with the tables copied in (stream
        ordered after every earlier replay) when their shapes match, else a new :class:`BalancedSplit`."""
        old = self.tables
        same = old.num_ranks == tables.num_ranks and all(
            a.shape == b.shape for a, b in zip(old[:4], tables[:4])
        )
        if not same:
            return BalancedSplit(tables, self.iterations, self.align)
        for dst, src in zip(old[:4], tables[:4]):
            dst.copy_(src, non_blocking=True)
        return self

    def _launch(self, load: torch.Tensor) -> torch.Tensor:
        return self._fused.balanced_bounds(load, self.tables, self.iterations, self.align)

    def _torch(self, load: torch.Tensor) -> torch.Tensor:
        return align_bounds(
            copy_bounds(balanced_shares(load, self.tables, self.iterations)), load, self.align
        )

    def _compute(self, load: torch.Tensor) -> torch.Tensor:
        return self._launch(load) if self.path.startswith("triton") else self._torch(load)

    def _replayed(self) -> torch.Tensor:
        return self._output.clone()


def copy_bounds(shares: torch.Tensor) -> torch.Tensor:
    """Where each copy's run of an expert's globally numbered pairs ends.

    Args:
        shares: int64 ``[E, C]`` tokens per copy (:func:`balanced_shares`).
    Returns:
        int64 ``[E, C - 1]`` exclusive ends of copies ``0 .. C-2``: global pair ``g`` of expert ``e`` goes to
        copy ``#{c : bounds[e, c] <= g}`` (``torch.searchsorted(bounds, g, right=True)``).
    """
    return shares.cumsum(dim=1)[:, :-1].contiguous()


def align_bounds(bounds: torch.Tensor, load: torch.Tensor, align: int) -> torch.Tensor:
    """Copy bounds rounded to the nearest multiple of ``align`` (half up), at most the expert's total; a bound
    at the total (a copy that ends the expert's run, or padding) stays.  Monotone, so the runs stay consecutive;
    a copy whose run was empty stays empty.

    Args:
        bounds: int64 ``[E, C - 1]`` (:func:`copy_bounds`).
        load: int64 ``[E]`` the expert's global tokens (the last bound of a full run).
        align: tokens (``>= 1``; ``1`` returns ``bounds``).
    Returns:
        int64 ``[E, C - 1]``.
    """
    if align <= 1 or bounds.numel() == 0:
        return bounds
    total = load.reshape(-1, 1)
    rounded = torch.minimum((bounds + align // 2).div(align, rounding_mode="floor") * align, total)
    return torch.where(bounds >= total, bounds, rounded)


def source_offsets(counts: torch.Tensor) -> torch.Tensor:
    """Global position of each source rank's first pair of each expert (sources laid end to end in rank order).

    Args:
        counts: int64 ``[N_src, E]`` pairs of each expert routed on each source rank (this batch).
    Returns:
        int64 ``[N_src, E]`` exclusive cumulative sum over the source ranks.
    """
    return counts.cumsum(dim=0) - counts


def source_offset(counts: torch.Tensor, rank: int) -> torch.Tensor:
    """``source_offsets(counts)[rank]`` in one kernel (the per-forward call: one rank's row).

    Args:
        counts: int64 ``[N_src, E]``; rank: the source rank.
    Returns:
        int64 ``[E]`` the pairs of each expert on the ranks before ``rank``.
    """
    return counts[:rank].sum(dim=0)


def rank_loads_of_shares(shares: torch.Tensor, tables: ReplicaTables) -> torch.Tensor:
    """int64 ``[..., N]`` tokens each rank computes under ``shares`` (int64 ``[..., E, C]``)."""
    batch = shares.shape[:-2]
    flat = shares.reshape(-1, tables.copy_rank.numel())
    out = flat.new_zeros(flat.shape[0], tables.num_ranks + 1)
    return out.index_add_(1, tables.copy_rank.reshape(-1), flat)[:, :-1].reshape(*batch, tables.num_ranks)


# ----------------------------------------------------------------------------------- the exact ceiling
def best_split_bound(
    load: np.ndarray, phy2log_row: np.ndarray, num_ranks: int, *, sweeps: int = 200
) -> tuple[float, float]:
    """The lightest busiest rank any split of this batch over this placement can reach (an LP's value).

    Solved by sequential water-filling to convergence (the min-norm split), then certified with Hall's bound:
    for a set ``S`` of ranks, ``max load >= (F(S) + sum of loads of experts with every copy in S) / |S|``,
    taken over the prefixes of the ranks sorted by their converged load.

    Args:
        load: float ``[E]`` tokens per logical expert.
        phy2log_row: int ``[P]`` (``-1`` = empty slot).
        num_ranks: ``N``.
        sweeps: at most this many passes over the replicated experts.
    Returns:
        ``(lower, upper)``: a lower bound on the optimal busiest-rank load and the busiest rank of the split
        found (``lower <= optimum <= upper``; equal up to rounding when converged).
    """
    load = np.asarray(load, dtype=np.float64)
    row = np.asarray(phy2log_row, dtype=np.int64)
    slot_rank = np.arange(row.shape[0]) // (row.shape[0] // num_ranks)
    count = np.bincount(row[row >= 0], minlength=load.shape[0])
    ranks_of = [slot_rank[row == e] for e in range(load.shape[0])]
    rank_load = np.zeros(num_ranks)
    np.add.at(rank_load, slot_rank[row >= 0], load[row[row >= 0]] / count[row[row >= 0]])  # even start
    replicated = [e for e in np.argsort(-load, kind="stable") if count[e] > 1 and load[e] > 0]
    share = {e: np.full(count[e], load[e] / count[e]) for e in replicated}
    for _ in range(sweeps):
        change = 0.0
        for e in replicated:
            r = ranks_of[e]
            np.subtract.at(rank_load, r, share[e])
            new = _water_fill_float(rank_load, r, load[e])
            np.add.at(rank_load, r, new)
            change = max(change, float(np.abs(new - share[e]).max()))
            share[e] = new
        if change <= 1e-9 * max(load.max(), 1.0):
            break
    upper = float(rank_load.max())
    # Hall's bound over the prefixes of the ranks sorted by load (descending).
    order = np.argsort(-rank_load, kind="stable")
    position = np.empty(num_ranks, dtype=np.int64)
    position[order] = np.arange(num_ranks)
    last = np.array([position[r].max() for r in ranks_of])  # an expert is inside prefix k iff last < k
    inside = np.zeros(num_ranks)
    np.add.at(inside, last, load)
    lower = float((np.cumsum(inside) / np.arange(1, num_ranks + 1)).max())
    return lower, upper


def _water_fill_float(rank_load: np.ndarray, ranks: np.ndarray, amount: float) -> np.ndarray:
    """Float water-filling of ``amount`` over the ranks ``ranks`` (a rank listed twice gets two copies)."""
    levels = rank_load[ranks]
    order = np.argsort(levels, kind="stable")
    low = levels[order]
    k = np.arange(1, len(low) + 1)
    m = int((amount + np.cumsum(low) >= k * low).sum())
    lam = (amount + low[:m].sum()) / m
    out = np.zeros(len(low))
    out[order[:m]] = lam - low[:m]
    return out
