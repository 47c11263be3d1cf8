"""The executor: carries out a :class:`~.plan.TransferPlan` on this rank, layer by layer (async, all-or-nothing).

Seam owned here: *staging, agreement and rollback*.  It talks to a :class:`~megatron_eplb.protocols.Transport`
for every byte that crosses ranks (default: :class:`~.transport.TorchP2PTransport` over the group) and never
posts point-to-point operations itself; the votes and the canary's table are small collectives over
torch.distributed groups.

``start_layer`` snapshots the slots the layer sends into a staging buffer and posts the sends/receives (one
message per peer, cut into pieces of ``chunk_bytes`` posted round by round through the transport, so that
staging the next piece overlaps the link); ``finish_layer`` waits, lets all ranks vote, and only when every
rank received everything writes the destination slots: local copies first, slot to slot in an order where
no source is overwritten before it is read (a cycle of local copies goes through one staged scratch slot,
:func:`~.plan.local_copy_schedule`), then the received slots (on CUDA each round as soon as it has landed).
``run`` posts the next layer before writing the previous one (``pipeline``).  A slot may be both a source and
a destination in the same layer (swap chains), and a failure or timeout leaves every rank's old tensors
untouched (:class:`TransferError`).

Model protocol (vLLM style, kept small): ``slot_tensors(layer, local_slot) -> list[torch.Tensor]`` returns
every per-slot tensor of that local slot — weights and, in training, the slot's optimizer state (fp32
master, Adam ``exp_avg``/``exp_avg_sq``).  For a given layer every slot on every rank must return the same
list of shapes and dtypes.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..comm import collective_device
from ..errors import TransferError, TransportError
from ..protocols import Transport
from .checksums import slot_sums
from .plan import LayerTransfer, TransferPlan, local_copy_schedule, message_rounds
from .staging import SlotLayout, StagingPool, pack, position_groups, staged_tensors, unpack
from .transport import make_transport

__all__ = ["DEFAULT_CHUNK_BYTES", "LayerHandle", "TransferError", "TransferExecutor"]

#: Default piece size of a peer's message (``TransferExecutor(chunk_bytes=...)``): large enough that NCCL
#: send/recv runs near its peak rate (on two H200s 0.83 of one message per layer; 256 MiB pieces gave 0.69),
#: small enough that staging the first piece is a small part of a layer.
DEFAULT_CHUNK_BYTES = 512 << 20


# ---------------------------------------------------------------------------------------------- executor
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
    _layout: SlotLayout | None = None
    _buffer: torch.Tensor | None = None
    _rounds: list = field(default_factory=list)  # (TransportHandle of a posted round, its receive indices)
    _send_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # into sends
    _recv_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    _recv_base: int = 0  # first staged slot index of the receives
    _copy_src: dict = field(default_factory=dict)  # src_local_slot -> staged slot index (staged copies)
    _copy_ops: list | None = None  # local_copy_schedule ops (direct local copies)
    _scratch_base: int = 0  # first staged slot index of the scratch slots (direct local copies)
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
        transport: how the slots' bytes travel (:class:`~megatron_eplb.protocols.Transport`, one round of
            sends/receives per ``post``); default :func:`~.transport.make_transport` over ``group`` (torch
            P2P).  Its ``group`` must be ``group``; assigning :attr:`group` later rebinds it
            (``transport.with_group``).  Tests pass a failing double (``megatron_eplb.transfer.testing``).
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
            at least one) posted as successive transport rounds (``Transport.post``), each right after its own
            slots are staged: on CUDA the staging copy of round ``i + 1`` runs on the side stream while round ``i`` is on
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
        transport: Transport | None = None,
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
        self.rank = dist.get_rank(group)
        world = dist.get_world_size(group)
        if world != plan.num_ranks:
            raise ValueError(f"the plan is for {plan.num_ranks} ranks but the process group has {world}")
        if transport is None:
            transport = make_transport(group)
        elif not self._same_group(transport.group, group):
            raise ValueError("transport.group is not the executor's group (build the transport over it)")
        self._group = group
        self.transport: Transport = transport
        self.vote = vote
        self.vote_group = group if vote_group is None else vote_group
        self._vote_follows_group = vote_group is None
        # A vote among one rank decides nothing: skip its all-reduce and host sync.
        self._vote_size = dist.get_world_size(self.vote_group)
        self.direct_local_copies = direct_local_copies
        self.checksums = checksums
        self.checksum_words = checksum_words
        backend = str(dist.get_backend(group)).lower()
        self._collective_device = collective_device(group)
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
        self._staging = StagingPool()

    @property
    def group(self):
        """The transfer process group; assigning a new one (same ranks, e.g. after a ``group_broken``
        failure) rebinds the transport to it (and the vote, when ``vote_group`` was not given)."""
        return self._group

    @group.setter
    def group(self, group) -> None:
        self._group = group
        self.transport = self.transport.with_group(group)
        if self._vote_follows_group:
            self.vote_group = group

    def _same_group(self, a, b) -> bool:
        world = self._dist.group.WORLD
        return (world if a is None else a) is (world if b is None else b)

    # ------------------------------------------------------------------ memory
    @property
    def staging_bytes(self) -> int:
        """Bytes of staging buffers held now (free pool + layers in flight)."""
        return self._staging.bytes

    @property
    def peak_staging_bytes(self) -> int:
        """The most staging bytes held at once so far."""
        return self._staging.peak_bytes

    def _release(self, handle: LayerHandle, *, reuse: bool) -> None:
        if handle._buffer is not None:
            self._staging.give_back(handle._buffer, reuse=reuse)
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

    def _layout(self, layer: int, local_slot: int) -> SlotLayout:
        return SlotLayout.of(list(self.slot_tensors(layer, local_slot)))

    def _tensors(self, layer: int, local_slot: int, layout: SlotLayout) -> list[torch.Tensor]:
        tensors = list(self.slot_tensors(layer, local_slot))
        if not layout.matches(tensors):
            raise TransferError(
                f"slot {local_slot} returned tensors {[(tuple(t.shape), t.dtype) for t in tensors]}, "
                f"expected {list(zip(layout.shapes, layout.dtypes))} (every slot of a layer must match)",
                layer=layer,
                rank=self.rank,
            )
        return tensors

    def start_layer(self, layer: int) -> LayerHandle:
        """Snapshot this rank's source slots of ``layer`` and post its sends/receives. Returns a handle."""
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
        send_rounds = message_rounds(sends[send_rows, 2], piece)
        recv_rounds = message_rounds(sends[recv_rows, 0], piece)
        # Resolve (and check) every source first, so a bad slot fails before anything is posted.
        sources = [self._tensors(layer, int(sends[row, 1]), layout) for row in send_rows.tolist()]
        copy_sources = [self._tensors(layer, src, layout) for src in copy_srcs]
        caller = torch.cuda.current_stream() if self._stream is not None else None
        with self._stream_ctx():
            if caller is not None:
                self._stream.wait_stream(caller)  # the slots' latest values are visible to the snapshot
            buf = self._staging.take(n_staged * layout.slot_nbytes, layout.device)
            handle._buffer = buf
            handle.staging_bytes = buf.numel()
            nb, base = layout.slot_nbytes, handle._recv_base
            with torch.no_grad():
                for i in range(max(len(send_rounds), len(recv_rounds))):
                    round_sends = send_rounds[i] if i < len(send_rounds) else []
                    round_recvs = recv_rounds[i] if i < len(recv_rounds) else []
                    # Stage this round's slots, then post it: on CUDA the NCCL stream waits only for the
                    # copies enqueued so far, so the next round's copies overlap this round on the link.
                    for _, first, count in round_sends:
                        for k in range(first, first + count):
                            pack(buf, k, sources[k], layout)
                    out = [
                        (peer, buf[first * nb : (first + count) * nb]) for peer, first, count in round_sends
                    ]
                    into = [
                        (peer, buf[(base + first) * nb : (base + first + count) * nb])
                        for peer, first, count in round_recvs
                    ]
                    if out or into:
                        posted = self.transport.post(out, into)
                        recvs = [k for _, first, count in round_recvs for k in range(first, first + count)]
                        handle._rounds.append((posted, recvs))
                first_copy = len(send_rows)
                for j, src in enumerate(copy_srcs):
                    pack(buf, first_copy + j, copy_sources[j], layout)
                    handle._copy_src[src] = first_copy + j
        return handle

    def finish_layer(self, handle: LayerHandle, timeout: float | None = None) -> int:
        """Wait for ``handle``'s layer, vote, and write the staged slots. Returns slots written on this rank.

        Args:
            handle: from :meth:`start_layer`.
            timeout: seconds to wait for this rank's receives (and again for the vote); ``None`` waits as
                long as the process group's own timeout.
        Raises:
            TransferError: a receive failed or timed out on any rank, or the transport refused a round
                (:class:`~megatron_eplb.protocols.TransportError`); nothing of this layer was written on any
                rank.
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
                for posted, _ in handle._rounds:
                    try:
                        posted.wait(None if deadline is None else max(deadline - time.monotonic(), 0.001))
                    except TransportError as exc:
                        if exc.group_broken:
                            raise
                        problem = problem or str(exc)  # clean: wait for the other rounds, keep the buffer
        except Exception as exc:  # a timeout or a dead peer (any error but a clean TransportError)
            problem, broken = str(exc) if isinstance(exc, TransportError) else f"receive failed: {exc}", True
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
            handle._rounds = []
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
                sources = [staged_tensors(buf, i, layout) for i in range(len(handle._send_rows))]
                copy_index: dict[int, int] = {}
                for src, idx in handle._copy_src.items():
                    copy_index[int(src)] = len(sources)
                    sources.append(staged_tensors(buf, idx, layout))
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
                        pack(buf, handle._scratch_base + a, slots[b], layout, only)
                    else:
                        unpack(buf, handle._scratch_base + a, slots[b], layout, only)
                for index, tensors in writes:
                    unpack(buf, index, tensors, layout, only)
                # Then the received slots, round by round: on CUDA this stream waits for one round at a time,
                # so the writes of a round overlap the later rounds on the link (the vote already passed).
                for posted, recvs in handle._rounds:
                    if per_round:
                        posted.wait()
                    for i in recvs:
                        unpack(buf, handle._recv_base + i, received[i], layout, only)

            groups = position_groups(layout, self.copy_streams)
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
            for posted, _ in handle._rounds if per_round else ():  # all rounds done before the buffer's reuse
                posted.wait()
        if self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)
        self._release(handle, reuse=True)
        handle._rounds = []
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
