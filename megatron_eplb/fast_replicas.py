"""Per-step (fast) replicas: every step, each rank's spare slots take copies of that step's hottest experts.

Two timescales: the **slow** persistent placement (``phy2log [P]``, planned from past windows, its optimizer
state moved with its weights) and, on top of it, ``F`` **spare slots per rank** that every step (micro-batch),
after routing and before the expert compute, are filled with copies of the experts that make this step's
busiest rank busy.  The choice is made from the step's exact global counts ``[E]`` together with the per-batch
split (:mod:`megatron_eplb.replica_split`), so that this step's busiest rank is as light as the spare slots
allow; a copy never outlives its step and owns no optimizer state (its gradient is summed back into the
expert's holder).

Pure torch functions, integer arithmetic only (bitwise the same result on every rank and device), a fixed
number of vectorized ops (no Python loop over experts, no host sync), so that they can run inside every MoE
layer's forward and be captured in a CUDA graph.  Leading batch dimensions are independent steps (the replay
plans many steps at once).  Shapes: ``E`` logical experts, ``N`` ranks of the EP group, ``S`` persistent slots
per rank (``P = N * S``), ``F`` spare slots per rank, ``U = S + F`` slots per rank in the **union** layout
(rank ``r``'s persistent slot ``k`` is union slot ``r * U + k``, its spare slot ``j`` is ``r * U + S + j``),
``C`` most persistent copies of one expert, ``D`` most copies of one expert in the union.

The algorithm (:func:`plan_fast_replicas`), step by step:

1. split the step's tokens over the persistent copies (the balanced split, as without spare slots): the
   amount of each expert on each rank ``[E, N]`` and the rank loads ``[N]``;
2. ``N * F`` greedy rounds (:func:`choose_fast_replicas`): take the busiest rank; for each expert on it, the
   lightest rank with a free spare slot that holds no copy of it, and the tokens a copy there would take
   (half the gap between the two ranks, at most what the expert has on the busy rank); copy the expert with
   the largest such gain there (ties: more tokens on the busy rank, then the lower expert), move those tokens;
   a round without gain changes nothing;
2a. across nodes only when the gain pays for it (the **cross-node rule**, active with ``num_nodes > 1`` and
   ``cross_node_min_gain = m > 0`` in :class:`FastTables`): the ranks are ``num_nodes`` equal consecutive nodes,
   and a copy of expert ``e`` onto rank ``t`` is **cross-node** when no persistent copy of ``e`` is in ``t``'s
   node (its weights come over the inter-node link and its gradient goes back the same way).  Per expert, two
   candidates in step 2: the best overall target (the lightest open rank, gain ``g_all``) and the best **near**
   target (the lightest open rank in a node holding ``e``, gain ``g_near``; 0 when there is none; the same
   rank as the overall one when that one is near).  When the overall target is cross-node it is taken only if
   ``g_all - g_near >= m`` (its extra gain over the best in-node copy pays for the fetch), and its **value**
   is then ``g_all - m``; otherwise the near target is taken, value ``g_near``.  An in-node candidate's value
   is its gain.  The expert of the round is the one with the largest value (ties as in step 2) and the tokens
   moved are its candidate's gain.  With one node or ``m = 0`` every value is the gain and every target the
   overall one: step 2 exactly (bitwise);
3. split the step's tokens over the union of persistent and spare copies (the balanced split again, every
   expert water-filled over its copies, 8 line-searched rounds); if its busiest rank is heavier than the
   persistent-only split's, keep the persistent-only split (the spare copies get nothing);
4. a spare slot whose copy gets no token is left empty (``-1``): nothing is fetched for it.

So the result is never worse than the persistent placement alone on the step's busiest rank, every rank
derives the same choice from the same counts, and the tokens of every expert are conserved.

The break-even of the cross-node rule (``eplb_fast_cross_node_min_tokens``, default
:data:`~megatron_eplb.config.CROSS_NODE_MIN_TOKENS`): a copy's fetch and its gradient's return move
``2 x 3 h f x 2`` bytes (a bf16 gated MLP, ``h`` hidden, ``f`` FFN size) over the inter-node link at ``B``
bytes/s per GPU, ``12 h f / B`` seconds; a token taken off the busiest rank saves its ``18 h f`` flop of forward
and backward at ``C`` flop/s.  ``h f`` cancels: a cross-node copy pays from ``2 C / (3 B)`` tokens on, whatever
the expert's size (:func:`cross_node_break_even`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .config import CROSS_NODE_MIN_TOKENS
from .kernel_paths import KernelPaths
from .replica_split import DEFAULT_ITERATIONS, water_fill

__all__ = [
    "CROSS_NODE_MIN_TOKENS",  # (from megatron_eplb.config)
    "FastPlan",
    "FastPlanner",
    "FastTables",
    "choose_fast_replicas",
    "cross_node_break_even",
    "cross_node_copies",
    "fast_tables",
    "plan_fast_replicas",
    "rank_loads_of_copies",
    "split_over_copies",
]

_BIG = 1 << 50  # the level of a padding copy or a full rank: above any real load; ``_BIG * D`` fits int64


def cross_node_break_even(flops_per_s: float, link_bytes_per_s: float) -> float:
    """Tokens a cross-node copy must take off the busiest rank to pay for its fetch and its gradient's return:
    ``2 C / (3 B)`` (the module docstring), for ``C`` flop/s of expert compute per GPU and ``B`` bytes/s of
    inter-node link per GPU; independent of the expert's size."""
    return 2.0 * flops_per_s / (3.0 * link_bytes_per_s)


class FastTables(NamedTuple):
    """Device tables of one layer's persistent placement for :func:`plan_fast_replicas`
    (made by :func:`fast_tables`, host work once per placement change).

    Attributes:
        copy_rank: int64 ``[E, C]`` rank of each persistent copy (ascending slot order), ``N`` for padding.
        copy_slot: int64 ``[E, C]`` union slot of each persistent copy, ``-1`` for padding.
        holds: bool ``[E, N]`` whether rank ``n`` holds a persistent copy of expert ``e``.
        num_ranks: ``N``.  slots_per_rank: ``S``.  num_fast: ``F``.
        replicated: int64 ``[K]`` the experts with two or more persistent copies (ascending), ``-1`` after them
            up to ``K = 0`` if ``C = 1`` else ``min(E, N * S - E)`` entries (a length fixed by the shapes); only
            the fused kernel reads it (its persistent split works over these rows alone).  ``None``: the kernel
            derives it at launch (a host sync).
        near: bool ``[E, N]`` whether rank ``n``'s node holds a persistent copy of expert ``e`` (a spare copy of
            ``e`` on ``n`` is fetched inside the node); ``None``: every rank is near (one node).
        num_nodes: nodes the ranks span (``N / num_nodes`` consecutive ranks each).
        cross_node_min_gain: ``m`` of the cross-node rule (step 2a of the module docstring), tokens.
    """

    copy_rank: torch.Tensor
    copy_slot: torch.Tensor
    holds: torch.Tensor
    num_ranks: int
    slots_per_rank: int
    num_fast: int
    replicated: torch.Tensor | None = None
    near: torch.Tensor | None = None
    num_nodes: int = 1
    cross_node_min_gain: int = 0

    @property
    def cross_node_rule(self) -> bool:
        """Whether the cross-node rule changes the choice (``num_nodes > 1`` and ``cross_node_min_gain > 0``)."""
        return self.num_nodes > 1 and self.cross_node_min_gain > 0 and self.near is not None

    @property
    def union_slots_per_rank(self) -> int:
        """``U = S + F``."""
        return self.slots_per_rank + self.num_fast

    @property
    def max_copies(self) -> int:
        """``D``: a spare copy goes only to a rank without a copy of the expert, so at most ``N - 1`` of them."""
        return self.copy_rank.shape[1] + min(self.num_ranks * self.num_fast, max(self.num_ranks - 1, 0))


class FastPlan(NamedTuple):
    """One step's spare-slot choice and split (leading dimensions: the steps given).

    Attributes:
        fast_expert: int64 ``[..., N, F]`` the logical expert each spare slot holds this step (``-1``: empty).
        copy_rank: int64 ``[..., E, D]`` rank of every copy in the union (persistent copies first, in their
            order, then spare copies by rank), ``N`` for padding.
        copy_slot: int64 ``[..., E, D]`` union slot of every copy, ``-1`` for padding.
        shares: int64 ``[..., E, D]`` tokens each copy computes (rows sum to the step's load).
    """

    fast_expert: torch.Tensor
    copy_rank: torch.Tensor
    copy_slot: torch.Tensor
    shares: torch.Tensor


def fast_tables(
    phy2log_row: np.ndarray,
    num_ranks: int,
    num_experts: int,
    num_fast: int,
    device: torch.device | str = "cpu",
    num_nodes: int = 1,
    cross_node_min_gain: int = 0,
) -> FastTables:
    """The tables of one layer's persistent placement.

    Args:
        phy2log_row: int ``[P]`` logical expert of each persistent slot (``-1`` = empty).
        num_ranks: ``N`` (``P % N == 0``).  num_experts: ``E`` (every expert needs a copy).
        num_fast: ``F`` spare slots per rank (>= 0).
        num_nodes: nodes the ranks span, ``N / num_nodes`` consecutive ranks each (``N % num_nodes == 0``).
        cross_node_min_gain: ``m`` (>= 0) of the cross-node rule (step 2a of the module docstring); 0: off.
    Returns:
        :class:`FastTables` on ``device``.
    """
    row = np.asarray(phy2log_row, dtype=np.int64).reshape(-1)
    if row.shape[0] % num_ranks:
        raise ValueError(f"{row.shape[0]} slots do not divide over {num_ranks} ranks")
    if num_fast < 0:
        raise ValueError(f"num_fast={num_fast} must be >= 0")
    if num_nodes < 1 or num_ranks % num_nodes:
        raise ValueError(f"num_nodes={num_nodes} does not divide the {num_ranks} ranks")
    if cross_node_min_gain < 0:
        raise ValueError(f"cross_node_min_gain={cross_node_min_gain} must be >= 0")
    per_rank = row.shape[0] // num_ranks
    slot_rank = np.arange(row.shape[0]) // per_rank
    union_slot = slot_rank * (per_rank + num_fast) + np.arange(row.shape[0]) % per_rank
    count = np.bincount(row[row >= 0], minlength=num_experts)[:num_experts]
    if (count == 0).any():
        raise ValueError(f"experts {np.nonzero(count == 0)[0].tolist()} have no copy")
    copies = int(count.max())
    copy_rank = np.full((num_experts, copies), num_ranks, dtype=np.int64)
    copy_slot = np.full((num_experts, copies), -1, dtype=np.int64)
    order = np.argsort(np.where(row >= 0, row, num_experts), kind="stable")
    order = order[row[order] >= 0]
    starts = np.concatenate([[0], np.cumsum(count)[:-1]])
    position = np.arange(order.shape[0]) - starts[row[order]]
    copy_rank[row[order], position] = slot_rank[order]
    copy_slot[row[order], position] = union_slot[order]
    holds = np.zeros((num_experts, num_ranks + 1), dtype=bool)
    holds[np.arange(num_experts)[:, None], copy_rank] = True
    holds = holds[:, :num_ranks]
    node_holds = holds.reshape(num_experts, num_nodes, num_ranks // num_nodes).any(axis=2)  # [E, nodes]
    near = node_holds[:, np.arange(num_ranks) // (num_ranks // num_nodes)]  # [E, N]
    device = torch.device(device)
    return FastTables(
        torch.from_numpy(copy_rank).to(device),
        torch.from_numpy(copy_slot).to(device),
        torch.from_numpy(holds.copy()).to(device),
        int(num_ranks),
        int(per_rank),
        int(num_fast),
        torch.from_numpy(replicated_list(count, row.shape[0])).to(device),
        torch.from_numpy(np.ascontiguousarray(near)).to(device),
        int(num_nodes),
        int(cross_node_min_gain),
    )


def replicated_list(count: np.ndarray, slots: int) -> np.ndarray:
    """:attr:`FastTables.replicated` from the persistent copies per expert ``count [E]`` and the ``P`` slots."""
    count = np.asarray(count).reshape(-1)
    num_experts = count.shape[0]
    length = 0 if count.max(initial=1) <= 1 else min(num_experts, slots - num_experts)
    out = np.full(length, -1, dtype=np.int64)
    rep = np.nonzero(count >= 2)[0]
    out[: rep.shape[0]] = rep
    return out


def rank_loads_of_copies(shares: torch.Tensor, copy_rank: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """int64 ``[B, N]`` tokens each rank computes.

    Args:
        shares: int64 ``[B, E, D]`` tokens per copy.
        copy_rank: int64 ``[B, E, D]`` (or ``[E, D]``, the same for every step) rank of each copy, ``N`` = padding.
        num_ranks: ``N``.
    """
    b = shares.shape[0]
    rank = copy_rank.expand_as(shares).reshape(b, -1)
    out = shares.new_zeros(b, num_ranks + 1)
    return out.scatter_add_(1, rank, shares.reshape(b, -1))[:, :num_ranks]


def split_over_copies(
    load: torch.Tensor, copy_rank: torch.Tensor, num_ranks: int, iterations: int = DEFAULT_ITERATIONS
) -> torch.Tensor:
    """The balanced split of each step's tokens over copies that may differ from step to step.

    The algorithm of :func:`~megatron_eplb.replica_split.balanced_shares` (every expert water-filled over its
    copies with the others held, the step shortened by an exact integer line search on the sum of squared rank
    loads, never worse than the even split), with per-step copy tables.

    Args:
        load: int64 ``[B, E]`` tokens per expert of each step.
        copy_rank: int64 ``[B, E, D]`` rank of each copy (``N`` = padding, after the real copies).
        num_ranks: ``N``.
        iterations: water-filling rounds.
    Returns:
        int64 ``[B, E, D]`` tokens per copy (rows sum to ``load``, 0 on padding).
    """
    b, num_experts, copies = copy_rank.shape
    n = num_ranks
    missing = copy_rank == n
    count = (~missing).sum(dim=2).clamp(min=1)  # [B, E]
    c = torch.arange(copies, device=load.device)
    base = load.div(count, rounding_mode="floor").unsqueeze(-1)
    extra = (c < (load % count).unsqueeze(-1)).to(load.dtype)
    even = torch.where(c < count.unsqueeze(-1), base + extra, 0)  # [B, E, D]
    flat_rank = copy_rank.reshape(b, -1)
    x = even
    amount = load.reshape(-1)  # [B * E]
    for _ in range(iterations):
        rank_load = load.new_zeros(b, n + 1).scatter_add_(1, flat_rank, x.reshape(b, -1))
        others = (rank_load.gather(1, flat_rank).view_as(x) - x).masked_fill(missing, _BIG)
        step = water_fill(others.reshape(-1, copies), amount).view_as(x) - x
        change = load.new_zeros(b, n + 1).scatter_add_(1, flat_rank, step.reshape(b, -1))[:, :n]
        num = -(rank_load[:, :n] * change).sum(dim=1)
        den = (change * change).sum(dim=1).clamp(min=1)
        alpha = (num.double() / den.double()).clamp(0.0, 1.0).view(b, 1, 1)
        before = x.cumsum(dim=2)
        after = before + torch.floor(alpha * step.cumsum(dim=2).double()).to(torch.int64)
        x = torch.diff(after, dim=2, prepend=torch.zeros_like(after[..., :1]))
    worse = rank_loads_of_copies(x, copy_rank, n).amax(1) > rank_loads_of_copies(even, copy_rank, n).amax(1)
    return torch.where(worse.view(b, 1, 1), even, x)


def choose_fast_replicas(
    load: torch.Tensor,
    amount: torch.Tensor,
    holds: torch.Tensor,
    num_fast: int,
    near: torch.Tensor | None = None,
    min_gain: int = 0,
) -> torch.Tensor:
    """The greedy choice of the spare copies (steps 2 and 2a of the module docstring).

    Args:
        load: int64 ``[B, E]`` tokens per expert of each step.
        amount: int64 ``[B, E, N]`` tokens of expert ``e`` on rank ``n`` under the persistent split.
        holds: bool ``[E, N]`` persistent copies.
        num_fast: ``F``.
        near: bool ``[E, N]`` whether rank ``n``'s node holds a persistent copy of ``e`` (:attr:`FastTables.near`);
            with ``min_gain > 0`` the cross-node rule (step 2a), else ignored.
        min_gain: ``m``, tokens a cross-node copy must gain beyond the best in-node one.
    Returns:
        int64 ``[B, N, F]`` the expert each spare slot takes (``-1``: none).
    """
    b, num_experts, n = amount.shape
    rule = near is not None and min_gain > 0
    amount = amount.clone()
    rank_load = amount.sum(dim=1)  # [B, N]
    has = holds.unsqueeze(0).expand(b, num_experts, n).clone()
    free = torch.full((b, n), num_fast, dtype=torch.int64, device=load.device)
    fast = torch.full((b, n, num_fast), -1, dtype=torch.int64, device=load.device)
    scale = load.sum(dim=1, keepdim=True) + 1  # [B, 1]: gain first, then the tokens on the busy rank
    ar = torch.arange(b, device=load.device)
    for _ in range(n * num_fast):
        r = rank_load.argmax(dim=1)  # [B] the busiest rank (the lowest of ties)
        on_r = amount[ar, :, r]  # [B, E]
        open_ = (free > 0).unsqueeze(1) & ~has  # [B, E, N]
        busy = rank_load.gather(1, r.unsqueeze(1))  # [B, 1]
        target, gain = _best_target(open_, rank_load, busy, on_r)  # [B, E] the lightest open rank for each
        value = gain
        if rule:  # step 2a: a cross-node target only when its extra gain over the best in-node one pays
            t_near, g_near = _best_target(open_ & near, rank_load, busy, on_r)
            cross = ~near.unsqueeze(0).expand(b, -1, -1).gather(2, target.unsqueeze(2)).squeeze(2)
            pays = gain - g_near >= min_gain
            use_near = cross & ~pays
            target = torch.where(use_near, t_near, target)
            value = torch.where(use_near, g_near, torch.where(cross, gain - min_gain, gain))
            gain = torch.where(use_near, g_near, gain)
        e = (value * scale + on_r).argmax(dim=1)  # [B]
        moved = gain.gather(1, e.unsqueeze(1)).squeeze(1)  # [B]
        ok = moved > 0
        t = target.gather(1, e.unsqueeze(1)).squeeze(1)  # [B]
        j = (num_fast - free[ar, t]).clamp(max=num_fast - 1)
        fast[ar, t, j] = torch.where(ok, e, fast[ar, t, j])
        amount[ar, e, r] -= moved
        amount[ar, e, t] += moved
        rank_load[ar, r] -= moved
        rank_load[ar, t] += moved
        has[ar, e, t] |= ok
        free[ar, t] -= ok.to(torch.int64)
    return fast


def _best_target(
    open_: torch.Tensor, rank_load: torch.Tensor, busy: torch.Tensor, on_r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert the lightest rank among ``open_ [B, E, N]`` (the lowest of ties) and the tokens a copy there
    takes off the busiest rank (load ``busy [B, 1]``): ``min(on_r, gap // 2)``, at least 0 (0 without an open
    rank).  Returns int64 ``[B, E]`` each."""
    level = torch.where(open_, rank_load.unsqueeze(1), _BIG)
    target = level.argmin(dim=2)
    gap = busy - level.gather(2, target.unsqueeze(2)).squeeze(2)
    return target, torch.minimum(on_r, gap.div(2, rounding_mode="floor")).clamp(min=0)


def cross_node_copies(fast_expert: torch.Tensor, tables: FastTables) -> torch.Tensor:
    """int64 ``[...]``: per step, the spare copies fetched across nodes (a used spare slot on a rank whose node
    holds no persistent copy of its expert).

    Args:
        fast_expert: int64 ``[..., N, F]`` (:attr:`FastPlan.fast_expert`).
        tables: the layer's :class:`FastTables`.
    """
    if tables.near is None:
        return fast_expert.new_zeros(fast_expert.shape[:-2])
    n = tables.num_ranks
    used = fast_expert >= 0
    rank = torch.arange(n, device=fast_expert.device).view(n, 1).expand_as(fast_expert)
    near = tables.near[fast_expert.clamp(min=0), rank]
    return (used & ~near).flatten(-2).sum(-1)


def plan_fast_replicas(
    load: torch.Tensor, tables: FastTables, iterations: int = DEFAULT_ITERATIONS
) -> FastPlan:
    """This step's spare copies and the split of its tokens over all copies (the module docstring).

    Args:
        load: int ``[..., E]`` the step's global tokens per logical expert (summed over the EP group);
            leading dimensions are independent steps.
        tables: the layer's :class:`FastTables` (same device as ``load``).
        iterations: water-filling rounds of the split.
    Returns:
        :class:`FastPlan`; deterministic: equal inputs give bitwise equal outputs on any device.
    """
    load = load.to(torch.int64)
    batch = load.shape[:-1]
    num_experts = load.shape[-1]
    load = load.reshape(-1, num_experts)  # [B, E]
    b, n, f, s = load.shape[0], tables.num_ranks, tables.num_fast, tables.slots_per_rank
    copy_rank = tables.copy_rank.unsqueeze(0).expand(b, -1, -1)  # [B, E, C]
    persistent = split_over_copies(load, copy_rank.contiguous(), n, iterations)  # [B, E, C]
    amount = load.new_zeros(b, num_experts, n + 1).scatter_add_(2, copy_rank, persistent)[..., :n]
    fast = (
        choose_fast_replicas(load, amount, tables.holds, f, tables.near, tables.cross_node_min_gain)
        if f > 0
        else load.new_empty(b, n, 0)
    )
    # The union: persistent copies, then each expert's spare copies (a copy per spare slot holding it).
    q = torch.arange(n * f, device=load.device)
    experts = torch.arange(num_experts, device=load.device).view(1, -1, 1)
    mine = fast.view(b, 1, n * f) == experts  # [B, E, N*F]
    extra_rank = torch.where(mine, q // max(f, 1), n)
    extra_slot = torch.where(mine, (q // max(f, 1)) * (s + f) + s + q % max(f, 1), -1)
    all_rank = torch.cat([copy_rank, extra_rank], dim=2)
    all_slot = torch.cat([tables.copy_slot.unsqueeze(0).expand(b, -1, -1), extra_slot], dim=2)
    order = (all_rank == n).to(torch.int64).argsort(dim=2, stable=True)[..., : tables.max_copies]
    union_rank = all_rank.gather(2, order)  # [B, E, D]
    union_slot = all_slot.gather(2, order)
    shares = split_over_copies(load, union_rank, n, iterations)
    # Never worse than the persistent placement alone: else its split, the spare copies idle.
    kept = torch.nn.functional.pad(persistent, (0, union_rank.shape[2] - persistent.shape[2]))
    worse = rank_loads_of_copies(shares, union_rank, n).amax(1) > rank_loads_of_copies(
        persistent, copy_rank, n
    ).amax(1)
    shares = torch.where(worse.view(b, 1, 1), kept, shares)
    # A spare slot whose copy computes nothing stays empty (nothing is fetched for it).
    slot_tokens = load.new_zeros(b, n * (s + f) + 1)
    slot_tokens.scatter_add_(
        1, torch.where(union_slot >= 0, union_slot, n * (s + f)).reshape(b, -1), shares.reshape(b, -1)
    )
    spare = (
        torch.arange(n, device=load.device).view(-1, 1) * (s + f) + s + torch.arange(f, device=load.device)
    ).view(-1)
    used = slot_tokens.index_select(1, spare).view(b, n, f) > 0
    fast = torch.where(used, fast, -1)
    d = union_rank.shape[2]
    return FastPlan(
        fast.reshape(*batch, n, f),
        union_rank.reshape(*batch, num_experts, d),
        union_slot.reshape(*batch, num_experts, d),
        shares.reshape(*batch, num_experts, d),
    )


class FastPlanner(KernelPaths):
    """One layer's :func:`plan_fast_replicas` for one step at a cost fit for every MoE layer's forward.  Eagerly it
    is several hundred small kernels (host time in the middle of the forward), replayed as one CUDA graph still
    1.4-2.7 ms per layer on an H200.  So on CUDA it takes the paths of :mod:`megatron_eplb.kernel_paths` (as the
    balanced split's :class:`~megatron_eplb.replica_split.BalancedSplit`): the fused kernel of
    :mod:`megatron_eplb.fast_replicas_triton` (bitwise the same plan) where triton imports and the layer fits its
    one block (``fast_replicas_triton.fits``; the cross-node rule included), else the torch functions as one CUDA
    graph; both read the tables in place.

    A new persistent placement whose tables have the same shapes is copied into them (:meth:`retarget`) and keeps
    the kernel or graph; other shapes make a new planner.  Which path runs is logged once per process.

    Args:
        tables: the layer's :class:`FastTables`.
        iterations: water-filling rounds of the split.
        fused: ``False``: never the fused kernel (the graph path on CUDA; the benchmarks time both).
    Call: ``planner(load)`` with int64 ``[E]`` global tokens per expert (``tables``' device) returns a
    :class:`FastPlan` of fresh tensors."""

    LABEL = "per-step replicas plan"
    RESULT = "plan"

    def __init__(self, tables: FastTables, iterations: int = DEFAULT_ITERATIONS, fused: bool = True) -> None:
        self.tables = tables
        self.iterations = iterations
        self.fused = fused
        self._flat: torch.Tensor | None = None
        self._choose_path(tables.copy_rank.device, None if fused else "the fused kernel not asked for")

    def _kernel(self):
        from . import fast_replicas_triton as kernel

        t = self.tables
        shape = (
            t.copy_rank.shape[0],
            t.copy_rank.shape[1],
            t.num_ranks,
            t.num_fast,
            None if t.replicated is None else t.replicated.numel(),
        )
        if not kernel.available():
            return None, "triton does not import"
        if not kernel.fits(*shape):
            return None, f"E, C, N, F, K = {shape} exceed the fused kernel's one block"
        return kernel, None

    def retarget(self, tables: FastTables) -> FastPlanner:
        """This layer's planner for new ``tables``: ``self`` with the tables copied in when their shapes match,
        else a new :class:`FastPlanner`."""
        old = self.tables
        same = old[3:6] == tables[3:6] and all(a.shape == b.shape for a, b in zip(old[:3], tables[:3]))
        rep_old, rep_new = old.replicated, tables.replicated
        same = same and (rep_old is None) == (rep_new is None)
        same = same and (rep_old is None or rep_old.shape == rep_new.shape)
        same = same and (old.near is None) == (tables.near is None)
        same = same and old[8:] == tables[8:]  # num_nodes, cross_node_min_gain
        if not same:
            return FastPlanner(tables, self.iterations, self.fused)
        for dst, src in zip(old[:3], tables[:3]):
            dst.copy_(src, non_blocking=True)
        if rep_old is not None:
            rep_old.copy_(rep_new, non_blocking=True)
        if old.near is not None:
            old.near.copy_(tables.near, non_blocking=True)
        return self

    def _launch(self, load: torch.Tensor) -> FastPlan:
        return self._fused.plan_fast_replicas_fused(load, self.tables, self.iterations)

    def _torch(self, load: torch.Tensor) -> FastPlan:
        return plan_fast_replicas(load, self.tables, self.iterations)

    def _compute(self, load: torch.Tensor) -> FastPlan:
        if self.path.startswith("triton"):
            return self._fused.plan_fast_replicas_fused(load, self.tables, self.iterations, self._flat)
        return self._torch(load)

    def _before_capture(self, load: torch.Tensor) -> None:
        if self.path == "triton_graph":  # the kernel writes the whole plan into one buffer: one copy per call
            t = self.tables
            size = t.num_ranks * t.num_fast + 3 * t.copy_rank.shape[0] * t.max_copies
            self._flat = torch.empty(size, dtype=torch.int64, device=load.device)

    def _replayed(self) -> FastPlan:
        if self.path == "triton_graph":
            return self._fused.plan_views(self._flat.clone(), self.tables)
        return FastPlan(*(t.clone() for t in self._output))
