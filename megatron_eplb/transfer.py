"""Moving experts between ranks: a transfer plan (pure) and an executor (torch.distributed P2P, async).

Terms as in :mod:`megatron_eplb.placement`: ``L`` MoE layers, ``N`` ranks, ``P`` physical slots per layer,
``S = P / N`` slots per rank; slot ``s`` lives on rank ``s // S`` as local slot ``s % S``.

The plan (:func:`plan_transfer`) is a pure, deterministic function of the old and the new placement, so every
rank computes the identical plan without communication.  Per layer (vLLM's rules):

* a slot whose expert is unchanged is skipped;
* a slot whose new expert is already on its rank (in the old placement) is a **local copy**, never a send;
* every other slot is **received exactly once**, from one holder of the expert in the old placement; the
  senders are spread over all holders (least sends so far first, ties round-robin in rank order,
  optionally preferring a holder on the receiver's node).

The number of sends of a layer equals :func:`megatron_eplb.stats.moved_slots` (the churn).

The executor (:class:`TransferExecutor`) runs one layer at a time: ``start_layer`` snapshots the slots the
layer sends into a staging buffer and posts the sends/receives with ``batch_isend_irecv`` (one message per
peer, cut into pieces of ``chunk_bytes`` posted round by round, so that staging the next piece overlaps the
link); ``finish_layer`` waits, lets all ranks vote, and only when every rank received everything writes the
destination slots: local copies first, slot to slot in an order where no source is overwritten before it is
read (a cycle of local copies goes through one staged scratch slot, :func:`local_copy_schedule`), then the
received slots (on CUDA each round as soon as it has landed).  ``run`` posts the next layer before writing the
previous one (``pipeline``).  A slot may be both a source and a destination in the same layer (swap chains), and a
failure or timeout leaves every rank's old tensors untouched (:class:`TransferError`).

Model protocol (vLLM style, kept small): ``slot_tensors(layer, local_slot) -> list[torch.Tensor]`` returns
every per-slot tensor of that local slot — weights and, in training, the slot's optimizer state (fp32
master, Adam ``exp_avg``/``exp_avg_sq``).  For a given layer every slot on every rank must return the same
list of shapes and dtypes.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .placement import ExpertPlacement

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "FAIL_AFTER_SENDS_ENV",
    "LayerHandle",
    "LayerTransfer",
    "TransferError",
    "TransferExecutor",
    "TransferPlan",
    "fold_checksum",
    "local_copy_schedule",
    "plan_transfer",
    "slot_checksum",
    "slot_nbytes",
    "slot_sums",
]

#: Test hook: when set (an integer ``k``), every executor built without ``fail_after_sends`` posts only the
#: first ``k`` send messages of each layer and then fails that layer.
FAIL_AFTER_SENDS_ENV = "MEGATRON_EPLB_TRANSFER_FAIL_AFTER_SENDS"

_ALIGN = 64  # byte alignment of every tensor inside a staged slot
#: Default piece size of a peer's message (``TransferExecutor(chunk_bytes=...)``): large enough that NCCL
#: send/recv runs near its peak rate, small enough that staging the first piece is a small part of a layer.
DEFAULT_CHUNK_BYTES = 256 << 20
_EMPTY_SENDS = np.zeros((0, 4), dtype=np.int64)
_EMPTY_COPIES = np.zeros((0, 3), dtype=np.int64)


class TransferError(RuntimeError):
    """A layer's transfer failed; no rank wrote anything for that layer (old tensors are intact).

    Attributes:
        layer: the MoE layer.
        rank: the rank (in the transfer group) that raised.
        group_broken: True when a wait timed out or a peer vanished; the transfer process group should then
            be destroyed and created anew before the next transfer (gloo closes the pair on a timeout).
    """

    def __init__(self, message: str, *, layer: int, rank: int, group_broken: bool = False) -> None:
        super().__init__(f"layer {layer} rank {rank}: {message}")
        self.layer = layer
        self.rank = rank
        self.group_broken = group_broken


# ----------------------------------------------------------------------------------------------- the plan
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


# ---------------------------------------------------------------------------------------------- checksum
_MOD = (1 << 61) - 1
_WEIGHT_PERIOD = 65521
_PASS_WORDS = 1 << 25  # 16-bit words summed per device pass (int16 input + int32 product: 192 MiB at most)
_WEIGHTS: dict = {}


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 view (or copy, if not contiguous) of ``t``'s bytes."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def slot_nbytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of one slot's tensors (what one moved slot sends; see :meth:`TransferPlan.bytes`)."""
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _words(t: torch.Tensor, max_words: int | None) -> torch.Tensor:
    """The 16-bit words of ``t`` (bytes if their count is odd), strided down to at most ``max_words``."""
    raw = _bytes_of(t)
    words = raw.view(torch.int16) if raw.numel() % 2 == 0 else raw
    if max_words is not None and words.numel() > max_words:
        words = words[:: -(-words.numel() // max_words)]
    return words


def _checksum_weights(device: torch.device, n: int) -> torch.Tensor:
    """int32 ``[>= n]``: ``j % 65521 + 1``, cached per device."""
    key = str(device)
    w = _WEIGHTS.get(key)
    if w is None or w.numel() < n:
        size = max(n, min(2 * (0 if w is None else w.numel()), _PASS_WORDS + _WEIGHT_PERIOD))
        w = (torch.arange(size, device=device, dtype=torch.int64) % _WEIGHT_PERIOD + 1).to(torch.int32)
        _WEIGHTS[key] = w
    return w


def slot_sums(slots: Sequence[Sequence[torch.Tensor]], max_words: int | None = None) -> torch.Tensor:
    """The exact word sums behind :func:`slot_checksum`, for many slots at once, left on their device.

    Every slot must hold the same list of shapes and dtypes (as the slots of one layer do).  For tensor ``j``
    of slot ``n`` with 16-bit words ``x_i`` (bytes if their count is odd; with ``max_words`` an evenly
    strided sample of at most that many, the same on every rank):
    ``out[n, j] = (sum(x_i * (i % 65521 + 1)), sum(x_i))``.  Both are exact in int64 for tensors of up to
    ``2**32`` words (``|x_i * w_i| < 2**31``), so they do not depend on the device or on reduction order.

    One batched device pass per tensor position (more only for very large tensors, ``_PASS_WORDS`` words
    per pass): a handful of kernels for all slots together and no host synchronisation.
    Returns int64 ``[len(slots), T, 2]`` on the slots' device (CPU for no slots).
    """
    if not slots:
        return torch.zeros(0, 0, 2, dtype=torch.int64)
    per_tensor = []
    for j in range(len(slots[0])):
        words = [_words(slot[j], max_words) for slot in slots]
        m = words[0].numel()
        device = words[0].device
        if m == 0:
            per_tensor.append(torch.zeros(len(slots), 2, dtype=torch.int64, device=device))
            continue
        step = max(1, min(m, _PASS_WORDS))  # columns per pass
        rows = max(1, _PASS_WORDS // step)  # slots per pass
        parts = []
        for r0 in range(0, len(words), rows):
            acc = None
            for c0 in range(0, m, step):
                x = torch.stack([w[c0 : c0 + step] for w in words[r0 : r0 + rows]])  # [rows, cols]
                offset = c0 % _WEIGHT_PERIOD
                w = _checksum_weights(device, offset + x.shape[1])[offset : offset + x.shape[1]]
                s = torch.stack([(x * w).sum(1, dtype=torch.int64), x.sum(1, dtype=torch.int64)], dim=1)
                acc = s if acc is None else acc + s
            parts.append(acc)
        per_tensor.append(parts[0] if len(parts) == 1 else torch.cat(parts))
    return torch.stack(per_tensor, dim=1)


def fold_checksum(sums: torch.Tensor | np.ndarray, nbytes: Sequence[int]) -> int:
    """Fold one slot's ``[T, 2]`` word sums (:func:`slot_sums`, on the host) with its tensors' byte counts
    into one hash in ``[0, 2**61 - 1)`` (exact integer arithmetic)."""
    h = 0
    for index, ((s1, s2), n) in enumerate(zip(np.asarray(sums).reshape(-1, 2).tolist(), nbytes)):
        h = (h * 1_000_003 + index * 7919 + int(n)) % _MOD
        h = (h * 1_000_003 + s1 * 31 + s2) % _MOD
    return h


def slot_checksum(tensors: Sequence[torch.Tensor], max_words: int | None = None) -> torch.Tensor:
    """A bit-level hash of a slot's tensors (order and every byte count and byte).

    With ``max_words``, each tensor is hashed on an evenly strided sample of at most that many 16-bit words
    (the same sample on every rank): a cheap canary that still catches a wrong, missing or garbled slot.

    Exact integer arithmetic, so the value does not depend on the device or on reduction order: the
    receiver's checksum equals the sender's iff the bytes are equal (up to hash collisions).  Per tensor the
    word sums of :func:`slot_sums` (one device pass, one host transfer for the slot), folded by
    :func:`fold_checksum`.  Many slots: :func:`slot_sums` on all of them at once (what the executor does).
    Returns an int64 scalar tensor on the CPU (in ``[0, 2**61 - 1)``).
    """
    sums = slot_sums([list(tensors)], max_words)[0].cpu()
    return torch.tensor(
        fold_checksum(sums, [t.numel() * t.element_size() for t in tensors]), dtype=torch.int64
    )


# ---------------------------------------------------------------------------------------------- executor
@dataclass(frozen=True)
class _SlotLayout:
    """Where each of a slot's tensors lives inside a staged slot (byte offsets, ``_ALIGN``-aligned)."""

    offsets: tuple[int, ...]
    nbytes: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[tuple[int, ...], ...]
    slot_nbytes: int
    device: torch.device

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> _SlotLayout:
        if not tensors:
            raise ValueError("slot_tensors returned no tensors")
        offsets, nbytes, pos = [], [], 0
        for t in tensors:
            offsets.append(pos)
            n = t.numel() * t.element_size()
            nbytes.append(n)
            pos += -(-n // _ALIGN) * _ALIGN
        return cls(
            tuple(offsets),
            tuple(nbytes),
            tuple(t.dtype for t in tensors),
            tuple(tuple(t.shape) for t in tensors),
            max(pos, _ALIGN),
            tensors[0].device,
        )

    def matches(self, tensors: Sequence[torch.Tensor]) -> bool:
        return (
            tuple(t.dtype for t in tensors) == self.dtypes
            and tuple(tuple(t.shape) for t in tensors) == self.shapes
        )


@dataclass
class LayerHandle:
    """An in-flight layer transfer, returned by :meth:`TransferExecutor.start_layer`.

    Attributes:
        layer: the MoE layer.
        transfer: the full (all-rank) :class:`LayerTransfer` of the layer.
        staging_bytes: bytes of the staging buffer this layer uses on this rank.
        finished: True once :meth:`TransferExecutor.finish_layer` committed the layer.
    """

    layer: int
    transfer: LayerTransfer
    staging_bytes: int = 0
    finished: bool = False
    started_at: float = 0.0
    _layout: _SlotLayout | None = None
    _buffer: torch.Tensor | None = None
    _works: list = field(default_factory=list)
    _rounds: list = field(default_factory=list)  # (works of a batch_isend_irecv round, its receive indices)
    _send_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # into sends
    _recv_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    _recv_base: int = 0  # first staged slot index of the receives
    _copy_src: dict = field(default_factory=dict)  # src_local_slot -> staged slot index (staged copies)
    _copy_ops: list | None = None  # local_copy_schedule ops (direct local copies)
    _scratch_base: int = 0  # first staged slot index of the scratch slots (direct local copies)
    _injected: bool = False
    # (local copy source -> row of sums, sender-side slot_sums of my sends then my copy sources) when enabled
    _checksums: tuple | None = None


class TransferExecutor:
    """Execute a :class:`TransferPlan` on this rank, layer by layer, through a staging buffer.

    ``start_layer`` and ``finish_layer`` are collective over ``group``: every rank calls them for the same
    layers in the same order (layers in ``plan.layers_changed``; other layers are no-ops).  Several layers
    may be in flight at once (each has its own staging buffer); buffers are reused across layers.  Between
    ``start_layer`` and ``finish_layer`` the layer's slot tensors may be read (forward) but not modified
    (no optimizer step on them).  After a :class:`TransferError` with ``group_broken`` the group must be
    recreated.  With NCCL, the first use of ``group`` must involve all its ranks (as for any NCCL
    ``batch_isend_irecv``); a barrier on the new group does that.

    Args:
        plan: the full plan (from :func:`plan_transfer`), identical on every rank.
        slot_tensors: ``(layer, local_slot) -> list[Tensor]``, every per-slot tensor of a local slot.
        group: a (dedicated) process group whose ranks are the plan's ranks ``0..N-1``; default WORLD.
        vote: let all ranks agree (one tiny all-reduce per layer) that every rank received everything before
            anyone writes; without it a rank only knows about its own receives.
        vote_group: the group that votes (default ``group``); with expert data parallelism pass the group of
            every rank that transfers (all EP groups), so every data-parallel copy commits the same layers.
        checksums: keep the sender-side checksums so that :meth:`verify_layer` can run after the commit.
        checksum_words: hash a strided sample of at most this many 16-bit words per tensor (None: every byte).
        fail_after_sends: test hook: post only the first ``k`` send messages of every layer, then fail the
            layer (default: the env var ``MEGATRON_EPLB_TRANSFER_FAIL_AFTER_SENDS``, else off).
        use_side_stream: on CUDA, stage and write on a side stream (the caller's stream waits on it at the
            end of ``finish_layer``).
        direct_local_copies: copy local slots slot to slot at commit time (:func:`local_copy_schedule`: half
            the memory traffic, one scratch slot of staging per cycle) instead of snapshotting every source at
            ``start_layer``.  Equivalent, since a layer's slots are not modified between start and finish.
        copy_streams: on CUDA (with the side stream), split the commit's copies over this many streams by
            tensor position (a slot's tensor ``j`` only ever touches tensor ``j`` of other slots and its own
            region of the staging buffer, so the positions are independent): the copies of one position
            overlap the launch gaps and tails of another's.  1: every copy in order on the side stream.
        chunk_bytes: split each peer's message of a layer into pieces of about this many bytes (whole slots,
            at least one) posted as successive ``batch_isend_irecv`` rounds, each right after its own slots are
            staged: on CUDA the staging copy of round ``i + 1`` runs on the side stream while round ``i`` is on
            the link, so only the first piece's copy is exposed; and once the vote has passed, the commit
            writes each round's received slots as soon as that round has landed (a stream wait per round),
            so only the last piece's write follows the link.  ``None`` or 0: one message per peer per layer,
            posted after every slot is staged.  Must be equal on every rank (the receivers post matching
            pieces).
        pipeline: :meth:`run` posts layer ``L + 1`` after layer ``L``'s vote but before writing layer ``L``,
            so the write of one layer overlaps the transfer of the next (two layers' staging in flight).
            A failed layer still stops :meth:`run` before the next layer is posted.
        isolated_vote: on CUDA, run the vote's all-reduce (and its host read) on a stream of its own, so the
            host waits only for the vote itself, not for the caller's queued work (e.g. the forward).
    """

    def __init__(
        self,
        plan: TransferPlan,
        slot_tensors: Callable[[int, int], Sequence[torch.Tensor]],
        group=None,
        *,
        vote: bool = True,
        vote_group=None,
        checksums: bool = False,
        checksum_words: int | None = None,
        fail_after_sends: int | None = None,
        use_side_stream: bool = True,
        direct_local_copies: bool = True,
        copy_streams: int = 2,
        chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
        pipeline: bool = True,
        isolated_vote: bool = True,
    ) -> None:
        import torch.distributed as dist

        if plan.rank is not None:
            raise ValueError("pass the full plan (not plan.for_rank(...)); the executor filters it itself")
        self._dist = dist
        self.plan = plan
        self.slot_tensors = slot_tensors
        self.group = group
        self.rank = dist.get_rank(group)
        world = dist.get_world_size(group)
        if world != plan.num_ranks:
            raise ValueError(f"the plan is for {plan.num_ranks} ranks but the process group has {world}")
        if group is None or group is dist.group.WORLD:
            self._global = list(range(world))
        else:
            self._global = [dist.get_global_rank(group, r) for r in range(world)]
        self.vote = vote
        self.vote_group = group if vote_group is None else vote_group
        # A vote among one rank decides nothing: skip its all-reduce and host sync.
        self._vote_size = dist.get_world_size(self.vote_group)
        self.direct_local_copies = direct_local_copies
        self.checksums = checksums
        self.checksum_words = checksum_words
        if fail_after_sends is None and os.environ.get(FAIL_AFTER_SENDS_ENV, "").strip():
            fail_after_sends = int(os.environ[FAIL_AFTER_SENDS_ENV])
        self.fail_after_sends = fail_after_sends
        backend = str(dist.get_backend(group)).lower()
        self._collective_device = (
            torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        )
        self._stream = None
        if use_side_stream and torch.cuda.is_available() and "nccl" in backend:
            self._stream = torch.cuda.Stream()
        if copy_streams < 1:
            raise ValueError(f"copy_streams must be >= 1, got {copy_streams}")
        self.copy_streams = copy_streams
        self._copy_streams: list = []
        if self._stream is not None and copy_streams > 1:
            self._copy_streams = [torch.cuda.Stream() for _ in range(copy_streams)]
        if chunk_bytes is not None and chunk_bytes < 0:
            raise ValueError(f"chunk_bytes must be >= 0 or None, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes or None
        self.pipeline = pipeline
        self._vote_stream = None
        if isolated_vote and self._collective_device.type == "cuda" and torch.cuda.is_available():
            self._vote_stream = torch.cuda.Stream()
        # Absorbs finish_layer's stream waits for the receives (the commit waits round by round itself).
        self._wait_stream = torch.cuda.Stream() if self._stream is not None else None
        self._pool: list[torch.Tensor] = []
        self._in_flight_bytes = 0
        self.peak_staging_bytes = 0

    # ------------------------------------------------------------------ memory
    @property
    def staging_bytes(self) -> int:
        """Bytes of staging buffers held now (free pool + layers in flight)."""
        return sum(b.numel() for b in self._pool) + self._in_flight_bytes

    def _take_buffer(self, nbytes: int, device: torch.device) -> torch.Tensor:
        for i, b in enumerate(self._pool):
            if b.numel() >= nbytes and b.device == device:
                buf = self._pool.pop(i)
                break
        else:
            # Replace a too-small free buffer instead of keeping both.
            self._pool = [b for b in self._pool if b.device != device]
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self._in_flight_bytes += buf.numel()
        self.peak_staging_bytes = max(self.peak_staging_bytes, self.staging_bytes)
        return buf

    def _release(self, handle: LayerHandle, *, reuse: bool) -> None:
        if handle._buffer is None:
            return
        self._in_flight_bytes -= handle._buffer.numel()
        if reuse:  # after a failure a late message could still land in it: drop it instead
            self._pool.append(handle._buffer)
        handle._buffer = None

    # ---------------------------------------------------------------- transfer
    def _stream_ctx(self):
        if self._stream is None:
            import contextlib

            return contextlib.nullcontext()
        return torch.cuda.stream(self._stream)

    def _wait_ctx(self):
        if self._wait_stream is None:
            return self._stream_ctx()
        return torch.cuda.stream(self._wait_stream)

    def _vote_ctx(self):
        if self._vote_stream is None:
            import contextlib

            return contextlib.nullcontext()
        return torch.cuda.stream(self._vote_stream)

    def _layout(self, layer: int, local_slot: int) -> _SlotLayout:
        return _SlotLayout.of(list(self.slot_tensors(layer, local_slot)))

    def _tensors(self, layer: int, local_slot: int, layout: _SlotLayout) -> list[torch.Tensor]:
        tensors = list(self.slot_tensors(layer, local_slot))
        if not layout.matches(tensors):
            raise TransferError(
                f"slot {local_slot} returned tensors {[(tuple(t.shape), t.dtype) for t in tensors]}, "
                f"expected {list(zip(layout.shapes, layout.dtypes))} (every slot of a layer must match)",
                layer=layer,
                rank=self.rank,
            )
        return tensors

    @staticmethod
    def _slot_view(buf: torch.Tensor, index: int, layout: _SlotLayout) -> torch.Tensor:
        return buf[index * layout.slot_nbytes : (index + 1) * layout.slot_nbytes]

    def _pack(
        self,
        buf: torch.Tensor,
        index: int,
        tensors: Sequence[torch.Tensor],
        layout: _SlotLayout,
        only: Sequence[int] | None = None,
    ) -> None:
        staged = self._staged_tensors(buf, index, layout)
        for j in range(len(tensors)) if only is None else only:
            staged[j].copy_(tensors[j], non_blocking=True)  # same dtype and shape: a plain byte copy

    def _unpack(
        self,
        buf: torch.Tensor,
        index: int,
        tensors: Sequence[torch.Tensor],
        layout: _SlotLayout,
        only: Sequence[int] | None = None,
    ) -> None:
        staged = self._staged_tensors(buf, index, layout)
        for j in range(len(tensors)) if only is None else only:
            tensors[j].copy_(staged[j], non_blocking=True)

    @staticmethod
    def _position_groups(layout: _SlotLayout, parts: int) -> list[list[int]]:
        """Split a slot's tensor positions into at most ``parts`` groups of about equal bytes (greedy)."""
        parts = max(1, min(parts, len(layout.nbytes)))
        groups: list[list[int]] = [[] for _ in range(parts)]
        load = [0] * parts
        for j in sorted(range(len(layout.nbytes)), key=lambda i: -layout.nbytes[i]):
            g = load.index(min(load))
            groups[g].append(j)
            load[g] += layout.nbytes[j]
        return [sorted(g) for g in groups if g]

    def _staged_tensors(self, buf: torch.Tensor, index: int, layout: _SlotLayout) -> list[torch.Tensor]:
        """Typed views of staged slot ``index`` (one per slot tensor), cached on the (pooled) buffer: a pack or
        unpack is then one ``copy_`` per tensor, instead of half a dozen view ops in front of each copy (host
        time that, at ~2 x slots x tensors copies per layer, is milliseconds per layer)."""
        cache = buf.__dict__.setdefault("_eplb_views", {})
        views = cache.get((layout, index))
        if views is None:
            view = self._slot_view(buf, index, layout)
            views = [
                view[off : off + n].view(dt).view(shape)
                for off, n, dt, shape in zip(layout.offsets, layout.nbytes, layout.dtypes, layout.shapes)
            ]
            cache[(layout, index)] = views
        return views

    def start_layer(self, layer: int) -> LayerHandle:
        """Snapshot this rank's source slots of ``layer`` and post its sends/receives. Returns a handle."""
        dist = self._dist
        transfer = self.plan.layer(layer)
        handle = LayerHandle(layer, transfer, started_at=time.monotonic())
        if transfer.is_empty:
            return handle
        me = self.rank
        sends = transfer.sends
        send_rows = np.nonzero(sends[:, 0] == me)[0]
        recv_rows = np.nonzero(sends[:, 2] == me)[0]
        # Group by peer (stable, so per-peer order = plan order on both sides): one message per peer.
        send_rows = send_rows[np.argsort(sends[send_rows, 2], kind="stable")]
        recv_rows = recv_rows[np.argsort(sends[recv_rows, 0], kind="stable")]
        copies = transfer.copies_on(me)
        handle._send_rows, handle._recv_rows = send_rows, recv_rows
        if len(send_rows) == 0 and len(recv_rows) == 0 and len(copies) == 0:
            return handle
        if self.direct_local_copies:
            handle._copy_ops, n_scratch = local_copy_schedule(copies)
            copy_srcs = []
        else:
            copy_srcs, n_scratch = sorted(set(copies[:, 1].tolist())), 0
        layout = self._layout(layer, 0)
        handle._layout = layout
        handle._scratch_base = len(send_rows) + len(copy_srcs)
        n_staged = len(send_rows) + len(copy_srcs) + n_scratch + len(recv_rows)
        handle._recv_base = len(send_rows) + len(copy_srcs) + n_scratch
        # Rounds of pieces (the same on every rank: a pure function of the plan and the slot size). Round i
        # holds piece i of every peer's message, in peer order, sends then receives.
        piece = None if self.chunk_bytes is None else max(1, self.chunk_bytes // layout.slot_nbytes)
        send_rounds = _rounds(_runs(sends[send_rows, 2]), piece)
        recv_rounds = _rounds(_runs(sends[recv_rows, 0]), piece)
        # Resolve (and check) every source first, so a bad slot fails before anything is posted.
        sources = [self._tensors(layer, int(sends[row, 1]), layout) for row in send_rows.tolist()]
        copy_sources = [self._tensors(layer, src, layout) for src in copy_srcs]
        caller = torch.cuda.current_stream() if self._stream is not None else None
        with self._stream_ctx():
            if caller is not None:
                self._stream.wait_stream(caller)  # the slots' latest values are visible to the snapshot
            buf = self._take_buffer(n_staged * layout.slot_nbytes, layout.device)
            handle._buffer = buf
            handle.staging_bytes = buf.numel()
            nb, base = layout.slot_nbytes, handle._recv_base
            sent = 0
            works: list = []
            with torch.no_grad():
                for i in range(max(len(send_rounds), len(recv_rounds))):
                    round_sends = send_rounds[i] if i < len(send_rounds) else []
                    round_recvs = recv_rounds[i] if i < len(recv_rounds) else []
                    # Stage this round's slots, then post it: on CUDA the NCCL stream waits only for the
                    # copies enqueued so far, so the next round's copies overlap this round on the link.
                    for _, first, count in round_sends:
                        for k in range(first, first + count):
                            self._pack(buf, k, sources[k], layout)
                    ops = []
                    for peer, first, count in round_sends:
                        if self.fail_after_sends is not None and sent >= self.fail_after_sends:
                            break
                        region = buf[first * nb : (first + count) * nb]
                        ops.append(dist.P2POp(dist.isend, region, self._global[peer], self.group))
                        sent += 1
                    for peer, first, count in round_recvs:
                        region = buf[(base + first) * nb : (base + first + count) * nb]
                        ops.append(dist.P2POp(dist.irecv, region, self._global[peer], self.group))
                    if ops:
                        posted = dist.batch_isend_irecv(ops)
                        works.extend(posted)
                        recvs = [k for _, first, count in round_recvs for k in range(first, first + count)]
                        handle._rounds.append((posted, recvs))
                first_copy = len(send_rows)
                for j, src in enumerate(copy_srcs):
                    self._pack(buf, first_copy + j, copy_sources[j], layout)
                    handle._copy_src[src] = first_copy + j
            if self.fail_after_sends is not None:
                handle._injected = True
            handle._works = works
        return handle

    def finish_layer(self, handle: LayerHandle, timeout: float | None = None) -> int:
        """Wait for ``handle``'s layer, vote, and write the staged slots. Returns slots written on this rank.

        Args:
            handle: from :meth:`start_layer`.
            timeout: seconds to wait for this rank's receives (and again for the vote); ``None`` waits as
                long as the process group's own timeout.
        Raises:
            TransferError: a receive failed or timed out on any rank, or the failure hook fired; nothing of
                this layer was written on any rank.
        """
        if handle.finished:
            raise ValueError(f"layer {handle.layer} was already finished")
        if handle.transfer.is_empty:
            handle.finished = True
            return 0
        self._await(handle, timeout)
        written = self._commit(handle)
        handle.finished = True
        return written

    def _await(self, handle: LayerHandle, timeout: float | None) -> None:
        """The first half of :meth:`finish_layer`: wait for the receives and vote; raise if any rank failed
        (after dropping the layer's staging).  Nothing is written."""
        layer, me = handle.layer, self.rank
        problem, broken = None, False
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            # On CUDA the side stream is not made to wait here: the commit waits round by round, so each round
            # is written as soon as it has landed.  This stream only absorbs the waits (gloo waits on the host).
            with self._wait_ctx():
                for work in handle._works:
                    if deadline is None:
                        work.wait()
                    else:
                        left = max(deadline - time.monotonic(), 0.001)
                        work.wait(datetime.timedelta(seconds=left))
        except Exception as exc:  # gloo/NCCL raise RuntimeError on timeouts and dead peers
            problem, broken = f"receive failed: {exc}", True
        if problem is None and handle._injected:
            problem = f"injected failure after {self.fail_after_sends} send message(s) (test hook)"
        agreed = problem is None
        if self.vote and self._vote_size > 1:
            try:
                # On its own stream (isolated_vote) the all-reduce and the host read wait for nothing queued
                # on the caller's stream; the flag's value is decided on the host either way.
                with self._vote_ctx():
                    flag = torch.tensor(
                        [1 if agreed else 0], dtype=torch.int64, device=self._collective_device
                    )
                    work = self._dist.all_reduce(
                        flag, op=self._dist.ReduceOp.MIN, group=self.vote_group, async_op=True
                    )
                    if timeout is None:
                        work.wait()
                    else:
                        work.wait(datetime.timedelta(seconds=2 * timeout + 1))
                    agreed = bool(flag.item() == 1)
            except Exception as exc:
                agreed, broken = False, True
                problem = problem or f"the commit vote failed: {exc}"
            if not agreed and problem is None:
                problem = "another rank failed to receive its part of this layer"
        if not agreed:
            self._release(handle, reuse=not broken)
            handle._works, handle._rounds = [], []
            raise TransferError(
                f"{problem}; no slot of this layer was written", layer=layer, rank=me, group_broken=broken
            )

    def _commit(self, handle: LayerHandle) -> int:
        layer, transfer, layout, buf = handle.layer, handle.transfer, handle._layout, handle._buffer
        if layout is None or buf is None:
            return 0
        me = self.rank
        sends = transfer.sends
        copies = transfer.copies_on(me)
        if self._stream is not None and handle._copy_ops:
            # Direct local copies read the slots now: order them after the caller's latest work.
            self._stream.wait_stream(torch.cuda.current_stream())
        with self._stream_ctx(), torch.no_grad():
            if self.checksums:
                # Sender side of the canary: the word sums of every slot this rank sends or copies, in one
                # batched device pass, kept on the device (no host sync here; verify_layer reads them).
                sources = [self._staged_tensors(buf, i, layout) for i in range(len(handle._send_rows))]
                copy_index: dict[int, int] = {}
                for src, idx in handle._copy_src.items():
                    copy_index[int(src)] = len(sources)
                    sources.append(self._staged_tensors(buf, idx, layout))
                if handle._copy_ops:  # direct copies: the sources are still unwritten here
                    for src in sorted(set(copies[:, 1].tolist())):
                        copy_index[int(src)] = len(sources)
                        sources.append(self._tensors(layer, int(src), layout))
                sums = slot_sums(sources, self.checksum_words) if sources else None
                handle._checksums = (copy_index, sums)
            # Resolve (and check) every destination first, so a bad slot cannot leave a partial write.
            slots = {
                int(k): self._tensors(layer, int(k), layout) for k in set(copies[:, 1:].reshape(-1).tolist())
            }
            # Waiting twice is only harmless (and only useful) for CUDA stream waits: a gloo work waits on the
            # host, once, in _await.
            per_round = self._wait_stream is not None
            received = [
                self._tensors(layer, int(sends[row, 3]), layout) for row in handle._recv_rows.tolist()
            ]
            writes = []  # staged local copies (direct_local_copies=False)
            if handle._copy_ops is None:
                writes = [(handle._copy_src[src], slots[dst]) for _, src, dst in copies.tolist()]

            def write(only: Sequence[int]) -> None:
                # Local copies first: a received slot may be the source of a local copy.
                for op, a, b in handle._copy_ops or ():
                    if op == "copy":
                        for j in only:
                            slots[b][j].copy_(slots[a][j], non_blocking=True)
                    elif op == "stage":
                        self._pack(buf, handle._scratch_base + a, slots[b], layout, only)
                    else:
                        self._unpack(buf, handle._scratch_base + a, slots[b], layout, only)
                for index, tensors in writes:
                    self._unpack(buf, index, tensors, layout, only)
                # Then the received slots, round by round: on CUDA this stream waits for one round at a time,
                # so the writes of a round overlap the later rounds on the link (the vote already passed).
                for works, recvs in handle._rounds:
                    for work in works if per_round else ():
                        work.wait()
                    for i in recvs:
                        self._unpack(buf, handle._recv_base + i, received[i], layout, only)

            groups = self._position_groups(layout, self.copy_streams)
            if len(groups) > 1 and self._copy_streams:  # independent tensor positions on parallel streams
                side = torch.cuda.current_stream()
                for stream, only in zip(self._copy_streams, groups):
                    stream.wait_stream(side)
                    with torch.cuda.stream(stream):
                        write(only)
                for stream in self._copy_streams[: len(groups)]:
                    side.wait_stream(stream)
            else:  # in order (without CUDA streams: position group after position group, equivalent)
                for only in groups:
                    write(only)
            for work in handle._works if per_round else ():  # all rounds done before the buffer is reused
                work.wait()
        if self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)
        self._release(handle, reuse=True)
        handle._works, handle._rounds = [], []
        return len(handle._recv_rows) + len(copies)

    def run(self, layers: Iterable[int] | None = None, timeout: float | None = None) -> int:
        """Transfer ``layers`` (default: every changed layer) one after the other. Returns slots written.

        With ``pipeline`` (default), layer ``L + 1`` is posted once layer ``L`` has passed its vote and before
        layer ``L`` is written, so the write overlaps the next transfer.  Either way a failed layer raises
        :class:`TransferError` before any later layer is posted; earlier layers stay committed.
        """
        todo = self.plan.layers_changed if layers is None else tuple(layers)
        if not self.pipeline:
            return sum(self.finish_layer(self.start_layer(layer), timeout) for layer in todo)
        written = 0
        prev: LayerHandle | None = None
        for layer in todo:
            if prev is not None:
                self._await(prev, timeout)  # raises before the next layer is posted
            try:
                handle = self.start_layer(layer)
            finally:
                if prev is not None:  # every rank passed the vote: write it even if posting failed here
                    written += self._commit(prev)
                    prev.finished = True
                    prev = None
            if handle.transfer.is_empty:
                handle.finished = True
            else:
                prev = handle
        if prev is not None:
            written += self.finish_layer(prev, timeout)
        return written

    # ------------------------------------------------------------------ canary
    def verify_layer(self, handle: LayerHandle, timeout: float | None = None) -> list[tuple[int, int]]:
        """Compare each written slot's checksum with its sender's (after :meth:`finish_layer`).

        Collective over the group (one all-reduce of ``2 x (K + C) x T x 2`` int64: per moved slot and tensor
        the sender's and the receiver's exact word sums, :func:`slot_sums`).  Needs ``checksums=True``.  All
        written slots are summed in one batched device pass and the table makes one host transfer: no
        per-slot or per-tensor host synchronisation.
        Returns the mismatching destination slots as ``(rank, local_slot)``, sorted; equal on every rank.
        """
        if not handle.finished:
            raise ValueError(f"layer {handle.layer} is not finished; call finish_layer first")
        transfer = handle.transfer
        if transfer.is_empty:
            return []
        if not self.checksums:
            raise ValueError("verify_layer needs TransferExecutor(..., checksums=True)")
        copy_index, sent = handle._checksums or ({}, None)
        k, c = transfer.num_sends, transfer.num_local_copies
        me = self.rank
        layer = handle.layer
        # Row r of the table: (sender's sums, receiver's sums) of send r (r < k) or local copy r - k; each
        # side is filled by the one rank that holds it, zeros elsewhere, so one all-reduce (sum) joins them.
        send_index = {int(row): i for i, row in enumerate(handle._send_rows.tolist())}
        first: list[int | None] = [send_index.get(row) for row in range(k)]
        first += [
            copy_index[int(src)] if rank == me else None for rank, src, _ in transfer.local_copies.tolist()
        ]
        dests: list[int] = []
        second: list[int | None] = [None] * (k + c)
        for row in range(k):
            if int(transfer.sends[row, 2]) == me:
                second[row] = len(dests)
                dests.append(int(transfer.sends[row, 3]))
        for j, (rank, _, dst) in enumerate(transfer.local_copies.tolist()):
            if rank == me:
                second[k + j] = len(dests)
                dests.append(int(dst))
        # Receiver side: every written slot in one batched pass (no per-slot host sync).
        got = (
            slot_sums([list(self.slot_tensors(layer, d)) for d in dests], self.checksum_words)
            if dests
            else None
        )
        ref = got if got is not None else sent
        if ref is None:  # this rank neither sends nor writes any slot of this layer
            num_tensors = len(self.slot_tensors(layer, 0))
            zero = torch.zeros(1, num_tensors, 2, dtype=torch.int64)
        else:
            zero = torch.zeros_like(ref[:1])

        def side(index: list[int | None], sums: torch.Tensor | None) -> torch.Tensor:
            return torch.cat([zero if i is None else sums[i : i + 1] for i in index] or [zero[:0]])

        table = torch.stack([side(first, sent), side(second, got)])  # [2, k + c, T, 2]
        if table.device != self._collective_device:
            table = table.to(self._collective_device)  # at most one device <-> host transfer per layer
        if self._dist.get_world_size(self.group) > 1:
            work = self._dist.all_reduce(table, group=self.group, async_op=True)
            if timeout is None:
                work.wait()
            else:
                work.wait(datetime.timedelta(seconds=timeout))
        table = table.cpu().reshape(2, k + c, -1)
        bad = np.nonzero((table[0] != table[1]).any(dim=1).numpy())[0]
        out = []
        for i in bad.tolist():
            if i < k:
                out.append((int(transfer.sends[i, 2]), int(transfer.sends[i, 3])))
            else:
                out.append((int(transfer.local_copies[i - k, 0]), int(transfer.local_copies[i - k, 2])))
        return sorted(out)


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
