"""Shared pieces of the placement policies: the checked problem, replication (how many copies of each expert).
Packing the copies onto ranks is :mod:`.packing`.

Terms as in :mod:`megatron_eplb.placement`: ``L`` layers, ``E`` logical experts, ``N`` ranks, ``P`` slots
per layer, ``S = P / N`` slots per rank, ``K`` items (expert copies) to place.  Every function here is
pure and vectorised across layers: Python loops run over slots, copies or iterations, never over the
experts of one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PolicyError
from ..placement import ExpertPlacement

__all__ = [
    "MAX_LAYER_SLOTS",
    "MAX_RANKS",
    "NODE_LOCALITY",
    "check_problem_size",
    "PolicyError",
    "Problem",
    "make_problem",
    "replicate",
    "items_from_counts",
    "homes_from_placement",
]

# Node-aware placement modes (the one definition; config, CLI and docs read it from here).
NODE_LOCALITY = ("relaxed", "strict")

MAX_LAYER_SLOTS = 1 << 24
"""The most ``layers x slots per layer`` a planner run takes (its ``[L, P]`` int64 arrays 128 MiB each, a few
dozen of them live at once).  Real EP groups are far below: DeepSeek-V3 at EP 256 with 512 slots is 58 x 512
= 29696.  Beyond it the planner would be killed for memory without a word."""

MAX_RANKS = 1 << 16
"""The largest expert-parallel group a plan is made for (the largest in use are a few hundred ranks)."""


def check_problem_size(num_layers: int, num_experts: int, num_slots: int, num_ranks: int) -> None:
    """Raise :class:`PolicyError` before any work when the sizes cannot be planned: more ranks than slots,
    more than :data:`MAX_RANKS` ranks (``--ep-size 1000000``) or more than :data:`MAX_LAYER_SLOTS` layer-slots.  Pure; no arrays made."""
    if num_ranks > num_slots:
        raise PolicyError(
            f"num_ranks={num_ranks} is more than num_slots={num_slots}: every rank needs at least one slot "
            f"(num_slots a multiple of num_ranks, at least the {num_experts} experts)"
        )
    if num_ranks > MAX_RANKS:
        raise PolicyError(
            f"num_ranks={num_ranks:,} is larger than any expert-parallel group a plan is made for "
            f"({MAX_RANKS:,}; the largest in use have a few hundred ranks): check the EP size"
        )
    size = num_layers * num_slots
    if size > MAX_LAYER_SLOTS:
        raise PolicyError(
            f"{num_layers} layers x {num_slots} slots on {num_ranks} ranks is {size:,} layer-slots, more than a "
            f"planner run takes ({MAX_LAYER_SLOTS:,}; each of its [layers, slots] arrays alone would be "
            f"{size * 8 / 2**30:.1f} GiB): check the EP size and the slot count (real EP groups have up to a few "
            "thousand slots per layer)"
        )


@dataclass(frozen=True)
class Problem:
    """A checked placement problem.

    Attributes:
        load: float64 ``[L, E]``.
        num_slots, num_ranks, num_nodes, num_groups: ``P``, ``N``, nodes, expert groups.
        active: bool ``[N]``, False for excluded ranks.
        rank_node: int64 ``[N]``, node of each rank (``rank // (N / nodes)``).
    """

    load: np.ndarray
    num_slots: int
    num_ranks: int
    num_nodes: int
    num_groups: int
    active: np.ndarray
    rank_node: np.ndarray

    @property
    def num_layers(self) -> int:
        """``L``: layers of ``load``."""
        return self.load.shape[0]

    @property
    def excluded(self) -> tuple[int, ...]:
        """Ranks that get no experts."""
        return tuple(int(r) for r in np.nonzero(~self.active)[0])

    @property
    def num_experts(self) -> int:
        """``E``: logical experts per layer."""
        return self.load.shape[1]

    @property
    def dup_unavoidable(self) -> bool:
        """More slots per rank than experts: some rank must hold two copies of one expert."""
        return self.slots_per_rank > self.num_experts

    @property
    def slots_per_rank(self) -> int:
        """``S = P / N``."""
        return self.num_slots // self.num_ranks

    @property
    def num_active_slots(self) -> int:
        """Slots on ranks that are not excluded."""
        return int(self.active.sum()) * self.slots_per_rank


def as_load(load, name: str = "load") -> np.ndarray:
    """float64 ``[L, E]`` from a numpy array, torch tensor or nested list; rejects NaN/inf/negative."""
    if hasattr(load, "detach"):
        load = load.detach().cpu().double().numpy()
    try:
        arr = np.array(load, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"{name} must be a numeric [layers, experts] array ({exc})") from None
    if arr.ndim == 1:
        raise PolicyError(
            f"{name} must be 2-D [layers, experts], got shape {list(arr.shape)}; use load[None] for one layer"
        )
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise PolicyError(
            f"{name} must be 2-D [layers, experts] with at least one of each, got shape {list(arr.shape)}"
        )
    bad = np.argwhere(~np.isfinite(arr) | (arr < 0))
    if len(bad):
        layer, expert = (int(v) for v in bad[0])
        raise PolicyError(
            f"{name}[{layer}, {expert}] = {float(arr[layer, expert])}: loads must be finite and non-negative "
            f"({len(bad)} bad entries)"
        )
    return arr


def _as_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PolicyError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise PolicyError(f"{name}={value} must be >= {minimum}")
    return int(value)


def make_problem(
    load,
    num_slots,
    num_ranks,
    *,
    num_nodes=1,
    num_groups=1,
    previous: ExpertPlacement | None = None,
    exclude_ranks=(),
    deepseek_topology: bool = False,
) -> Problem:
    """Check every argument of :func:`megatron_eplb.policy.rebalance`; raise :class:`PolicyError`.

    ``deepseek_topology``: check ``num_nodes`` and ``num_groups`` as DeepSeek's ``eplb.py`` does (the
    ``deepseek`` policy): they must fit the ranks and experts only when ``num_groups % num_nodes == 0`` (its
    hierarchical mode); otherwise it places globally and accepts any counts.  The problem then holds one
    node (``rank_node`` all 0) where ``num_nodes`` does not divide the ranks.
    """
    load = as_load(load)
    num_layers, num_experts = load.shape
    num_slots = _as_int(num_slots, "num_slots")
    num_ranks = _as_int(num_ranks, "num_ranks")
    num_nodes = _as_int(num_nodes, "num_nodes")
    num_groups = _as_int(num_groups, "num_groups")
    check_problem_size(num_layers, num_experts, num_slots, num_ranks)
    if num_slots % num_ranks:
        below = num_slots - num_slots % num_ranks
        choices = sorted({below if below >= num_experts else below + num_ranks, below + num_ranks})
        raise PolicyError(
            f"num_slots={num_slots} is not a multiple of num_ranks={num_ranks}: every rank needs the same "
            f"number of slots; use {' or '.join(map(str, choices))}"
        )
    if num_slots < num_experts:
        raise PolicyError(
            f"num_slots={num_slots} is fewer than the {num_experts} logical experts: every expert needs a slot"
        )
    topology_used = not deepseek_topology or num_groups % num_nodes == 0
    if num_ranks % num_nodes and topology_used:
        raise PolicyError(f"num_nodes={num_nodes} does not divide num_ranks={num_ranks}")
    if num_groups > 1 and num_experts % num_groups and topology_used:
        hint = (
            " (eplb.py's hierarchical mode, num_groups a multiple of num_nodes)" if deepseek_topology else ""
        )
        raise PolicyError(f"num_groups={num_groups} does not divide the {num_experts} experts{hint}")
    active = np.ones(num_ranks, dtype=bool)
    if exclude_ranks is None:
        exclude_ranks = ()
    try:
        excl = [int(r) for r in exclude_ranks]
    except (TypeError, ValueError):
        raise PolicyError(f"exclude_ranks must be a sequence of rank ids, got {exclude_ranks!r}") from None
    for r, raw in zip(excl, exclude_ranks):
        if isinstance(raw, bool) or r != raw:
            raise PolicyError(f"exclude_ranks: {raw!r} is not a rank id")
        if not 0 <= r < num_ranks:
            raise PolicyError(f"exclude_ranks: rank {r} is out of range [0, {num_ranks})")
    active[excl] = False
    if not active.any():
        raise PolicyError(f"exclude_ranks excludes all {num_ranks} ranks: nothing is left to hold experts")
    spr = num_slots // num_ranks
    if int(active.sum()) * spr < num_experts:
        raise PolicyError(
            f"exclude_ranks={sorted(set(excl))} leaves {int(active.sum())} ranks x {spr} slots = "
            f"{int(active.sum()) * spr} slots, fewer than the {num_experts} experts"
        )
    if previous is not None:
        if not isinstance(previous, ExpertPlacement):
            raise PolicyError(f"previous must be an ExpertPlacement, got {type(previous).__name__}")
        if previous.phy2log.shape != (num_layers, num_slots) or previous.num_ranks != num_ranks:
            raise PolicyError(
                f"previous placement has {previous.num_layers} layers x {previous.num_slots} slots on "
                f"{previous.num_ranks} ranks, but the load has {num_layers} layers and the call asks for "
                f"{num_slots} slots on {num_ranks} ranks"
            )
        if previous.num_experts != num_experts:
            raise PolicyError(
                f"previous placement is for {previous.num_experts} logical experts, the load has {num_experts}"
            )
    if num_ranks % num_nodes:  # (deepseek_topology, global mode)
        rank_node = np.zeros(num_ranks, dtype=np.int64)
    else:
        rank_node = np.arange(num_ranks) // (num_ranks // num_nodes)
    return Problem(load, num_slots, num_ranks, num_nodes, num_groups, active, rank_node)


def homes_from_placement(phy2log: np.ndarray, rank_node: np.ndarray, num_experts: int, num_groups: int):
    """Home node of each expert group in an existing placement: the node holding most copies of the group.

    Args:
        phy2log: int ``[L, P]``; rank_node: int ``[N]``.
    Returns:
        int64 ``[L, E]`` home node of every expert.
    """
    num_layers, num_slots = phy2log.shape
    nodes = int(rank_node.max()) + 1
    slot_node = rank_node[np.arange(num_slots) // (num_slots // len(rank_node))]
    group = np.where(phy2log >= 0, phy2log // (num_experts // num_groups), num_groups)
    cell = (np.arange(num_layers)[:, None] * (num_groups + 1) + group) * nodes + slot_node  # [L, P]
    tally = np.bincount(cell.ravel(), minlength=num_layers * (num_groups + 1) * nodes)
    group_home = tally.reshape(num_layers, num_groups + 1, nodes)[:, :num_groups].argmax(axis=2)
    return np.repeat(group_home, num_experts // num_groups, axis=1)


# ---------------------------------------------------------------------------------------------- replicas
def replicate(
    weight: np.ndarray,
    extra: np.ndarray,
    max_copies,
    *,
    start: np.ndarray | None = None,
    frozen: np.ndarray | None = None,
    steps: np.ndarray | None = None,
) -> np.ndarray:
    """Give redundant copies greedily to the expert with the highest load per copy (``argmax w / c``).

    Args:
        weight: float ``[B, E]``.
        extra: int ``[B]`` redundant copies to hand out in each row (``>= 0``).
        max_copies: most copies of one expert (the ranks available, so copies never share a rank); an
            int or int ``[B]`` per row.  Where every expert is capped, copies go over the cap.
        start: optional int ``[B, E]`` copies to start from (default one each).
        frozen: optional bool ``[B, E]`` experts that get no further copy while another expert can take one.
        steps: optional int ``[B, >= max(extra)]``, filled with the expert each step copies (``-1`` once a row
            has handed out its ``extra``).
    Returns:
        int64 ``[B, E]`` copies of each expert (``>= 1``; rows sum to ``start`` + ``extra``).
    """
    rows, num_experts = weight.shape
    counts = (
        np.ones((rows, num_experts), dtype=np.int64) if start is None else np.array(start, dtype=np.int64)
    )
    extra = np.asarray(extra, dtype=np.int64)
    cap = np.broadcast_to(np.asarray(max_copies), (rows,))
    expert_cap = None
    if frozen is not None:
        expert_cap = np.where(frozen, counts, cap[:, None])
    elif start is not None:
        expert_cap = np.broadcast_to(cap[:, None], counts.shape)
    ratio = weight / counts  # kept up to date: only the entries that get a copy change
    flat_counts, flat_ratio, flat_weight = counts.ravel(), ratio.ravel(), weight.ravel()
    row_at = np.arange(rows) * num_experts
    for k in range(int(extra.max(initial=0))):
        score = ratio
        if expert_cap is not None:  # (frozen experts take copies again once all others are capped)
            capped = counts >= expert_cap
            capped = np.where(capped.all(axis=1, keepdims=True), counts >= cap[:, None], capped)
            score = np.where(capped & ~capped.all(axis=1, keepdims=True), -np.inf, ratio)
        elif k + 1 >= cap.min():  # some expert may be capped (each has at most k + 1 copies so far)
            capped = counts >= cap[:, None]
            score = np.where(capped & ~capped.all(axis=1, keepdims=True), -np.inf, ratio)
        best = score.argmax(axis=1)
        if steps is not None:
            steps[:, k] = best
        at = best + row_at  # flat index of each row's next copy
        if k >= extra.min():
            at = at[extra > k]
        flat_counts[at] += 1
        flat_ratio[at] = flat_weight[at] / flat_counts[at]
    if steps is not None:  # -1 once a row has handed out its copies
        steps[np.arange(steps.shape[1])[None, :] >= extra[:, None]] = -1
    return counts


def packing_bound(
    weight: np.ndarray, counts: np.ndarray, num_bins, slots_per_bin: int, *, apart: bool = True
) -> np.ndarray:
    """A lower bound on the peak bin of any packing of the copies into ``num_bins`` bins of ``slots_per_bin``
    slots each (every bin full; ``apart``: no two copies of one expert in a bin), an expert's load split evenly
    over its copies.

    The largest of the mean bin load and two kinds of bin:

    - for every ``j``, a bin holding ``q = ceil(j / bins)`` of the ``j`` heaviest copies (at least the ``q``
      lightest of them);
    - (``apart``) for experts ``a != b`` with ``c_a + c_b > bins`` copies, a bin holding a copy of each;

    each with ``S - q`` (``S - 2``) further copies, at least the lightest ones of all.

    Args:
        weight: float ``[B, E]``; counts: int ``[B, E]`` (``>= 1``); num_bins: int or int ``[B]`` (``>= 1``).
    Returns:
        float64 ``[B]``.
    """
    rows, num_experts = counts.shape
    bins = np.broadcast_to(np.asarray(num_bins, dtype=np.int64), (rows,))
    num_items = counts.sum(axis=1)
    width = int(num_items.max())
    per_copy = weight / np.maximum(counts, 1)
    # Each row padded to `width` items by weightless ones (they sum as the row's own zero loads would).
    values = np.concatenate([per_copy, np.zeros((rows, 1))], axis=1)
    repeats = np.concatenate([counts, (width - num_items)[:, None]], axis=1)
    items = np.sort(np.repeat(values.ravel(), repeats.ravel()).reshape(rows, width), axis=1)[:, ::-1]
    cum = np.zeros((rows, width + 1))
    np.cumsum(items, axis=1, out=cum[:, 1:])
    total = cum[np.arange(rows), num_items]

    def lightest(n):  # float [B, ...]: the n lightest copies of each row (n int [B, ...], 0 <= n <= K)
        at = np.clip(num_items.reshape((rows,) + (1,) * (np.ndim(n) - 1)) - n, 0, width)
        return total.reshape(at.shape[:1] + (1,) * (at.ndim - 1)) - np.take_along_axis(
            cum, at.reshape(rows, -1), 1
        ).reshape(at.shape)

    # For q copies in a bin, the window of the j heaviest is heaviest at the least j: j = (q - 1) * bins + 1.
    q = np.arange(1, slots_per_bin + 1)
    j = (q[None, :] - 1) * bins[:, None] + 1  # [B, S]
    valid = j <= num_items[:, None]
    j = np.minimum(j, num_items[:, None])
    rest = slots_per_bin - q[None, :].repeat(rows, 0)
    bound = np.take_along_axis(cum, j, 1) - np.take_along_axis(cum, np.maximum(j - q, 0), 1) + lightest(rest)
    bound = np.where(valid, bound, 0.0).max(axis=1)
    top = int((2 * counts > bins[:, None]).sum(axis=1).max()) if apart and slots_per_bin >= 2 else 0
    if top:  # pairs: c_a + c_b > bins needs one of them with more than bins / 2 copies, say a
        by_count = np.argsort(-counts, axis=1, kind="stable")[:, :top]  # [B, T]
        c_a = np.take_along_axis(counts, by_count, 1)
        w_a = np.take_along_axis(per_copy, by_count, 1)
        share_bin = (c_a[:, :, None] + counts[:, None, :]) > bins[:, None, None]  # [B, T, E]
        share_bin &= by_count[:, :, None] != np.arange(num_experts)
        pair = np.where(share_bin, w_a[:, :, None] + per_copy[:, None, :], 0.0).max(axis=(1, 2))
        bound = np.maximum(bound, np.where(pair > 0, pair + lightest(np.full(rows, slots_per_bin - 2)), 0.0))
    return np.maximum(bound, total / bins)


def replicate_for_packing(
    weight: np.ndarray, extra: np.ndarray, max_copies, num_bins, slots_per_bin: int, *, apart: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copy counts for packing: :func:`replicate`'s, and where they pack badly an alternative to try.

    ``argmax w / c`` minimises the heaviest copy, but the copies of the hot experts may then not fill whole rounds
    of the bins: ten copies of two hot experts on eight bins put two on some bin, where four copies each (one on
    every bin) would not.  The alternatives: stop copying the experts that already have several copies at a step
    where those copies fill whole rounds (a multiple of ``num_bins``; the last two such steps), and hand the rest
    to experts that have one.  A row gets the alternative with the lowest :func:`packing_bound` if that is below
    the plain counts' bound; the caller packs both and keeps the better.

    Args:
        weight: float ``[B, E]``; extra: int ``[B]``; max_copies: as :func:`replicate`.
        num_bins: int or int ``[B]`` bins (ranks) of each row; slots_per_bin: ``S``.
        apart: the packing keeps the copies of an expert in different bins (:func:`packing_bound`).
    Returns:
        counts: int64 ``[B, E]`` (:func:`replicate`); alternative: int64 ``[B, E]``; better: bool ``[B]`` rows
        whose alternative has the lower bound (elsewhere ``alternative == counts``).
    """
    rows, num_experts = weight.shape
    extra = np.asarray(extra, dtype=np.int64)
    bins = np.broadcast_to(np.asarray(num_bins, dtype=np.int64), (rows,))
    width = int(extra.max(initial=0))
    steps = np.full((rows, max(width, 1)), -1, dtype=np.int64)
    counts = replicate(weight, extra, max_copies, steps=steps)
    alternative, better = counts.copy(), np.zeros(rows, dtype=bool)
    bound = packing_bound(weight, counts, bins, slots_per_bin, apart=apart)
    mean = weight.sum(axis=1) / bins
    todo = np.nonzero(bound > mean * (1 + 1e-12))[0]  # at the mean no other counts can do better
    if len(todo) == 0 or width < 2:
        return counts, alternative, better
    w, ex, st, cap = (
        weight[todo],
        extra[todo],
        steps[todo],
        np.broadcast_to(np.asarray(max_copies), (rows,))[todo],
    )
    # several[:, k]: copies of the experts with several copies after k steps.
    seen = np.ones((len(todo), num_experts), dtype=np.int64)
    several = np.zeros((len(todo), width + 1), dtype=np.int64)
    sub = np.arange(len(todo))
    for k in range(width):
        e = st[:, k]
        live = e >= 0
        first = seen[sub, np.maximum(e, 0)] == 1
        several[:, k + 1] = several[:, k] + np.where(live, np.where(first, 2, 1), 0)
        seen[sub[live], e[live]] += 1
    k_all = np.arange(width + 1)
    whole = (several % bins[todo, None] == 0) & (several > 0) & (k_all < ex[:, None])
    best_bound = bound[todo].copy()
    for _ in range(2):  # the last and the one before
        k = np.where(whole.any(axis=1), width - np.argmax(whole[:, ::-1], axis=1), -1)
        if not (k > 0).any():
            break
        whole[sub[k > 0], k[k > 0]] = False
        start = np.ones_like(seen)
        taken = (k_all[None, :width] < k[:, None]) & (st >= 0)
        np.add.at(start, (np.broadcast_to(sub[:, None], st.shape)[taken], st[taken]), 1)
        try_counts = replicate(w, np.maximum(ex - np.maximum(k, 0), 0), cap, start=start, frozen=start > 1)
        try_counts = np.where((k > 0)[:, None], try_counts, counts[todo])
        try_bound = packing_bound(w, try_counts, bins[todo], slots_per_bin, apart=apart)
        win = (k > 0) & (try_bound < best_bound * (1 - 1e-12))
        alternative[todo[win]] = try_counts[win]
        best_bound[win] = try_bound[win]
        better[todo[win]] = True
    return counts, alternative, better


def items_from_counts(counts: np.ndarray, weight: np.ndarray, home: np.ndarray | None = None):
    """Expand copy counts into items (one per copy), the first copy of each expert marked primary.

    Args:
        counts: int ``[L, E]``, every row summing to the same ``K``.
        weight: float ``[L, E]``.
        home: optional int ``[L, E]`` home node of each expert.
    Returns:
        item_expert int64 ``[L, K]``, item_weight float64 ``[L, K]`` (load per copy),
        item_primary bool ``[L, K]``, item_home int64 ``[L, K]`` (``-1`` without ``home``).
    """
    num_layers, num_experts = counts.shape
    flat_experts = np.tile(np.arange(num_experts), num_layers)
    item_expert = np.repeat(flat_experts, counts.ravel()).reshape(num_layers, -1)
    rows = np.arange(num_layers)[:, None]
    item_weight = (weight / counts)[rows, item_expert]
    first = np.ones_like(item_expert, dtype=bool)
    first[:, 1:] = item_expert[:, 1:] != item_expert[:, :-1]
    item_home = home[rows, item_expert] if home is not None else np.full_like(item_expert, -1)
    return item_expert, item_weight, first, item_home
