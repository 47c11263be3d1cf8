"""The transfer plan: which slot goes from where to where when the placement changes (pure, no torch.distributed).

Seam owned here: *what* moves.  Every rank computes the identical plan from the old and the new placement
without communication; the executor (:mod:`.executor`) only carries it out.

Terms as in :mod:`megatron_eplb.placement`: ``L`` MoE layers, ``N`` ranks, ``P`` physical slots per layer,
``S = P / N`` slots per rank; slot ``s`` lives on rank ``s // S`` as local slot ``s % S``.

Per layer (vLLM's rules, :func:`plan_transfer`):

* a slot whose expert is unchanged is skipped;
* a slot whose new expert is already on its rank (in the old placement) is a **local copy**, never a send;
* every other slot is **received exactly once**, from one holder of the expert in the old placement; the
  senders are spread over all holders (least sends so far first, ties round-robin in rank order,
  optionally preferring a holder on the receiver's node).

The number of sends of a layer equals :func:`megatron_eplb.stats.moved_slots` (the churn).  Also pure and
here: the order of one rank's local copies (:func:`local_copy_schedule`) and the cut of each peer's message
into rounds of pieces (:func:`message_rounds`), both equal on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..placement import ExpertPlacement

__all__ = [
    "LayerTransfer",
    "TransferPlan",
    "local_copy_schedule",
    "message_rounds",
    "plan_transfer",
    "slot_nbytes",
]

_EMPTY_SENDS = np.zeros((0, 4), dtype=np.int64)
_EMPTY_COPIES = np.zeros((0, 3), dtype=np.int64)


@dataclass(frozen=True)
class LayerTransfer:
    """What one layer's transfer does.

    Attributes:
        layer: MoE layer id.
        sends: int64 ``[K, 4]`` rows ``(src_rank, src_local_slot, dst_rank, dst_local_slot)``, sorted by
            destination slot; each destination slot appears at most once.
        send_experts: int64 ``[K]`` logical expert carried by each send.
        local_copies: int64 ``[C, 3]`` rows ``(rank, src_local_slot, dst_local_slot)``: the expert is already
            on ``rank`` (old placement) and is copied into its new slot there.
    """

    layer: int
    sends: np.ndarray = field(default_factory=lambda: _EMPTY_SENDS)
    send_experts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    local_copies: np.ndarray = field(default_factory=lambda: _EMPTY_COPIES)

    @property
    def num_sends(self) -> int:
        return int(self.sends.shape[0])

    @property
    def num_local_copies(self) -> int:
        return int(self.local_copies.shape[0])

    @property
    def is_empty(self) -> bool:
        return self.num_sends == 0 and self.num_local_copies == 0

    def sends_from(self, rank: int) -> np.ndarray:
        """int64 ``[k, 4]``: the sends ``rank`` makes, in plan order."""
        return self.sends[self.sends[:, 0] == rank]

    def recvs_to(self, rank: int) -> np.ndarray:
        """int64 ``[k, 4]``: the sends ``rank`` receives, in plan order."""
        return self.sends[self.sends[:, 2] == rank]

    def copies_on(self, rank: int) -> np.ndarray:
        """int64 ``[c, 3]``: the local copies on ``rank``."""
        return self.local_copies[self.local_copies[:, 0] == rank]

    def for_rank(self, rank: int) -> LayerTransfer:
        """The part of this layer that involves ``rank`` (its sends, receives and local copies)."""
        keep = (self.sends[:, 0] == rank) | (self.sends[:, 2] == rank)
        return LayerTransfer(self.layer, self.sends[keep], self.send_experts[keep], self.copies_on(rank))


@dataclass(frozen=True)
class TransferPlan:
    """Per-layer transfers from an old to a new placement (see :func:`plan_transfer`).

    Attributes:
        num_ranks, slots_per_rank: ``N`` and ``S`` of both placements.
        transfers: one :class:`LayerTransfer` per layer of the placements (``L`` entries; layers that were
            not planned or did not change are empty).
        rank: ``None`` for the full plan, else the rank this view was restricted to (:meth:`for_rank`).
    """

    num_ranks: int
    slots_per_rank: int
    transfers: tuple[LayerTransfer, ...]
    rank: int | None = None

    @property
    def num_layers(self) -> int:
        return len(self.transfers)

    def layer(self, layer: int) -> LayerTransfer:
        return self.transfers[layer]

    @property
    def layers_changed(self) -> tuple[int, ...]:
        """Layers with at least one send or local copy (those whose weights must be touched)."""
        return tuple(t.layer for t in self.transfers if not t.is_empty)

    def moved_slots(self) -> np.ndarray:
        """int64 ``[L]``: sends per layer (equals ``stats.moved_slots`` for a full plan of all layers)."""
        return np.array([t.num_sends for t in self.transfers], dtype=np.int64)

    def local_copy_count(self) -> np.ndarray:
        """int64 ``[L]``: local copies per layer."""
        return np.array([t.num_local_copies for t in self.transfers], dtype=np.int64)

    def sends_per_rank(self) -> np.ndarray:
        """int64 ``[L, N]``: how many slots each rank sends in each layer."""
        out = np.zeros((self.num_layers, self.num_ranks), dtype=np.int64)
        for t in self.transfers:
            np.add.at(out[t.layer], t.sends[:, 0], 1)
        return out

    def recvs_per_rank(self) -> np.ndarray:
        """int64 ``[L, N]``: how many slots each rank receives in each layer."""
        out = np.zeros((self.num_layers, self.num_ranks), dtype=np.int64)
        for t in self.transfers:
            np.add.at(out[t.layer], t.sends[:, 2], 1)
        return out

    def bytes(self, bytes_per_slot: int) -> int:
        """Bytes sent over the network: moved slots x ``bytes_per_slot`` (all of a slot's tensors)."""
        return int(self.moved_slots().sum()) * int(bytes_per_slot)

    def staging_slots(self, rank: int) -> np.ndarray:
        """int64 ``[L]``: slots ``rank`` stages per layer (its sends + receives + the scratch slots that break
        cycles of local copies, :func:`local_copy_schedule`).

        Times the bytes of one slot (:func:`slot_nbytes`), the maximum is the staging buffer of a
        one-layer-at-a-time transfer.
        """
        return np.array(
            [
                len(t.sends_from(rank)) + len(t.recvs_to(rank)) + local_copy_schedule(t.copies_on(rank))[1]
                for t in self.transfers
            ],
            dtype=np.int64,
        )

    def for_rank(self, rank: int) -> TransferPlan:
        """The sends, receives and local copies that involve ``rank``."""
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank {rank} is out of range [0, {self.num_ranks})")
        return TransferPlan(
            self.num_ranks, self.slots_per_rank, tuple(t.for_rank(rank) for t in self.transfers), rank
        )


def plan_transfer(
    old: ExpertPlacement,
    new: ExpertPlacement,
    layers: Iterable[int] | None = None,
    *,
    ranks_per_node: int | None = None,
) -> TransferPlan:
    """Plan the switch from ``old`` to ``new`` placement (pure and deterministic: equal on every rank).

    Args:
        old, new: placements with the same ``[L, P]`` shape and ``N``.
        layers: the layers to plan (default all); others get an empty :class:`LayerTransfer`.
        ranks_per_node: when given, a receiver prefers holders on its own node (``rank // ranks_per_node``).
    Returns:
        :class:`TransferPlan` with one :class:`LayerTransfer` per layer.
    """
    if old.phy2log.shape != new.phy2log.shape or old.num_ranks != new.num_ranks:
        raise ValueError(
            f"placements differ in shape: {old.phy2log.shape} on {old.num_ranks} ranks vs "
            f"{new.phy2log.shape} on {new.num_ranks} ranks"
        )
    if ranks_per_node is not None and ranks_per_node < 1:
        raise ValueError(f"ranks_per_node must be >= 1, got {ranks_per_node}")
    num_layers = old.num_layers
    wanted = set(range(num_layers)) if layers is None else {int(x) for x in layers}
    bad = [x for x in wanted if not 0 <= x < num_layers]
    if bad:
        raise ValueError(f"layers {sorted(bad)} are out of range [0, {num_layers})")
    num_experts = max(old.num_experts, new.num_experts)
    transfers = tuple(
        _plan_layer(layer, old.phy2log[layer], new.phy2log[layer], old.num_ranks, num_experts, ranks_per_node)
        if layer in wanted
        else LayerTransfer(layer)
        for layer in range(num_layers)
    )
    return TransferPlan(old.num_ranks, old.slots_per_rank, transfers)


def _plan_layer(
    layer: int,
    old_row: np.ndarray,
    new_row: np.ndarray,
    num_ranks: int,
    num_experts: int,
    ranks_per_node: int | None,
) -> LayerTransfer:
    """One layer of :func:`plan_transfer`. ``old_row``, ``new_row``: int64 ``[P]``."""
    num_slots = old_row.shape[0]
    spr = num_slots // num_ranks
    rank_of = np.arange(num_slots) // spr
    local_of = np.arange(num_slots) % spr
    # first_slot[r, e]: lowest local slot of rank r holding expert e in the old placement (spr = none).
    first_slot = np.full((num_ranks, num_experts), spr, dtype=np.int64)
    held = old_row >= 0
    np.minimum.at(first_slot, (rank_of[held], old_row[held]), local_of[held])
    changed = (new_row >= 0) & (new_row != old_row)
    dst = np.nonzero(changed)[0]
    expert = new_row[dst]
    src_local = first_slot[rank_of[dst], expert]
    is_local = src_local < spr
    copies = np.stack([rank_of[dst[is_local]], src_local[is_local], local_of[dst[is_local]]], axis=1)

    remote = dst[~is_local]
    remote_expert = expert[~is_local]
    sends = np.zeros((len(remote), 4), dtype=np.int64)
    send_count = np.zeros(num_ranks, dtype=np.int64)
    last_used = np.full(num_experts, -1, dtype=np.int64)
    for i, (slot, e) in enumerate(zip(remote.tolist(), remote_expert.tolist())):
        holders = np.nonzero(first_slot[:, e] < spr)[0]
        if len(holders) == 0:
            raise ValueError(f"layer {layer}: expert {e} is needed in slot {slot} but no rank holds it")
        dst_rank = slot // spr
        # Least sends so far; then (optionally) same node; then round-robin after the last holder used.
        rotation = (holders - last_used[e] - 1) % num_ranks
        keys = [send_count[holders], rotation]
        if ranks_per_node is not None:
            keys.insert(1, (holders // ranks_per_node != dst_rank // ranks_per_node).astype(np.int64))
        src = int(holders[np.lexsort(keys[::-1])[0]])
        send_count[src] += 1
        last_used[e] = src
        sends[i] = (src, first_slot[src, e], dst_rank, slot % spr)
    return LayerTransfer(
        layer,
        sends.reshape(-1, 4),
        remote_expert.astype(np.int64),
        copies.astype(np.int64).reshape(-1, 3),
    )


def local_copy_schedule(copies: np.ndarray) -> tuple[list[tuple[str, int, int]], int]:
    """Order one rank's local copies so that every slot is read before it is overwritten (pure).

    A copy whose destination no pending copy still reads runs first; when only cycles are left (a
    permutation of slots), one slot of the cycle is staged into a scratch slot and its readers read the
    scratch instead.  So a permutation of ``n`` slots costs ``n`` slot copies plus one per cycle, and the
    staging is one scratch slot (reused from cycle to cycle) instead of a snapshot of every source.

    Args:
        copies: int64 ``[C, 3]`` rows ``(rank, src_local_slot, dst_local_slot)`` of one rank (each
            destination once), e.g. ``LayerTransfer.copies_on(rank)``.
    Returns:
        ``(ops, num_scratch)``: ops in execution order, each ``("copy", src, dst)`` (slot to slot),
        ``("stage", scratch, src)`` (slot into scratch slot ``scratch``) or ``("unstage", scratch, dst)``
        (scratch slot into ``dst``); ``num_scratch`` scratch slots are needed.
    """
    pending = [
        (int(src), int(dst)) for _, src, dst in np.asarray(copies).reshape(-1, 3).tolist() if src != dst
    ]
    readers: dict[int, int] = {}
    for src, _ in pending:
        readers[src] = readers.get(src, 0) + 1
    ops: list[tuple[str, int, int]] = []
    scratch_of: dict[int, int] = {}  # slot -> scratch holding its old contents
    scratch_readers: dict[int, int] = {}  # scratch -> pending copies reading it
    num_scratch = 0
    while pending:
        ready = [c for c in pending if readers.get(c[1], 0) == 0]
        if not ready:  # only cycles left: stage the destination of the first pending copy
            victim = pending[0][1]
            free = [k for k in range(num_scratch) if scratch_readers.get(k, 0) == 0]
            scratch = free[0] if free else num_scratch
            num_scratch = max(num_scratch, scratch + 1)
            ops.append(("stage", scratch, victim))
            scratch_of[victim] = scratch
            scratch_readers[scratch] = readers.pop(victim)
            continue
        done = set()
        for src, dst in ready:
            if src in scratch_of:
                scratch = scratch_of[src]
                ops.append(("unstage", scratch, dst))
                scratch_readers[scratch] -= 1
            else:
                ops.append(("copy", src, dst))
                readers[src] -= 1
            done.add(dst)
        pending = [c for c in pending if c[1] not in done]
    return ops, num_scratch


def slot_nbytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of one slot's tensors (what one moved slot sends; see :meth:`TransferPlan.bytes`)."""
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _runs(keys: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of equal values in a sorted 1-D array: ``[(value, first_index, count), ...]``."""
    out = []
    start = 0
    values = keys.tolist()
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            out.append((int(values[start]), start, i - start))
            start = i
    return out


def _rounds(runs: list[tuple[int, int, int]], piece: int | None) -> list[list[tuple[int, int, int]]]:
    """Split each run ``(peer, first, count)`` into pieces of at most ``piece`` items (``None``: whole runs);
    round ``i`` lists piece ``i`` of every run that has one, in run order."""
    rounds: list[list[tuple[int, int, int]]] = []
    for peer, first, count in runs:
        step = count if piece is None else piece
        for i, start in enumerate(range(first, first + count, step)):
            if i == len(rounds):
                rounds.append([])
            rounds[i].append((peer, start, min(step, first + count - start)))
    return rounds


def message_rounds(peers: np.ndarray, piece: int | None) -> list[list[tuple[int, int, int]]]:
    """Cut one rank's messages of a layer into rounds of pieces (pure: equal on both ends of every message).

    Args:
        peers: int64 ``[K]``: the peer of each staged slot, grouped by peer (one message per run of a peer).
        piece: slots per piece (``None``: one piece per message).
    Returns:
        rounds; round ``i`` lists piece ``i`` of every message that has one, as ``(peer, first, count)``
        (``first`` indexes ``peers``), in message order.
    """
    return _rounds(_runs(peers), piece)
