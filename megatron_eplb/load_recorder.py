"""The *record* step: a handle's per-forward token counts, summed on the device with no host sync.

Both model handles (``patches/megatron``, ``patches/deepspeed_moe``) keep their counts here: per MoE layer and
logical expert the (token, expert) pairs routed on this rank, and per local slot the tokens it computed.  The
MoE forward is host-bound, so every op launched on its path is host time: a forward adds with one in-place op
into a live buffer (or only keeps a reference), and the folding happens when the counts are read.

Shapes: ``L`` MoE layers, ``E`` logical experts, ``S`` slots per rank, ``T`` tokens of one forward.

Pure torch: no process group, no Megatron, no DeepSpeed.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["MAX_ACC_SHAPES", "MAX_PENDING_SLOT_COUNTS", "LoadRecorder"]

#: Routed-map accumulators kept per MoE layer (distinct token counts ``T``); see :meth:`LoadRecorder.count_routed`.
MAX_ACC_SHAPES = 4
#: Per layer, slot counts kept between two reads before they are summed (:meth:`LoadRecorder.keep_slot_counts`).
MAX_PENDING_SLOT_COUNTS = 256


class LoadRecorder:
    """Token counts of ``L`` MoE layers since the last :meth:`reset`: logical ``[L, E]`` and local slots
    ``[L, S]``, int64 on ``device``.

    Attributes:
        logical: int64 ``[L, E]``, the live buffer of :meth:`loads`; ``logical_rows``: its ``[E]`` row views,
            made once, so the per-forward adds go straight into them (no indexing on the hot path).
        slots: int64 ``[L, S]``, the live buffer of :meth:`slot_loads`; ``slot_rows``: its ``[S]`` row views.
        slot_pending: per layer, the slot counts kept since the last read (:meth:`keep_slot_counts`).

    The buffers are only ever zeroed in place, so the views stay live (graph-safe).
    """

    def __init__(self, num_layers: int, num_experts: int, slots_per_rank: int, device: torch.device) -> None:
        self.device = device
        self.logical = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
        self.slots = torch.zeros(num_layers, slots_per_rank, dtype=torch.int64, device=device)
        self.logical_rows = list(self.logical.unbind(0))
        self.slot_rows = list(self.slots.unbind(0))
        # Per layer, int32 accumulators of the routed map, keyed by its shape ``[T, E]``: each forward adds its
        # bool map with ONE elementwise op (``acc += routed``); the column sums are taken on read (``loads()``).
        # One op instead of four (cast, memset, column sum, add) is what makes the recording cheap.  The
        # accumulators are never replaced (graph-safe), at most ``MAX_ACC_SHAPES`` per layer; other shapes are
        # counted with the direct column sum.
        self._route_acc: list[dict[torch.Size, torch.Tensor]] = [{} for _ in range(num_layers)]
        # Per layer, the per-slot token counts exactly as a dispatcher hands them to the experts (e.g. a host
        # tensor): a forward only keeps a reference (a list append, no op); ``slot_loads()`` sums them all at
        # once.  In the middle of the host-bound MoE forward even one small op costs tens of µs.
        self.slot_pending: list[list[Any]] = [[] for _ in range(num_layers)]

    # ---------------------------------------------------------------- record
    def count_routed(self, layer: int, routed: torch.Tensor) -> None:
        """Count the bool ``[T, E]`` map ``routed`` (padding already masked) into ``layer``'s logical loads:
        one in-place add into the layer's accumulator of that shape (summed by :meth:`loads`)."""
        accs = self._route_acc[layer]
        acc = accs.get(routed.shape)
        if acc is None:
            if len(accs) >= MAX_ACC_SHAPES:  # many token counts: count directly, hold no more memory
                self.logical_rows[layer].add_(routed.sum(dim=0, dtype=torch.int64))
                return
            acc = accs[routed.shape] = torch.zeros(routed.shape, dtype=torch.int32, device=routed.device)
        acc.add_(routed)  # int32 += bool; overflows only after 2**31 forwards between two reads

    def count_into(self, layer: int) -> torch.Tensor:
        """The live int64 ``[E]`` row of ``layer``'s logical loads, for a caller that counts the routed pairs
        itself (the balanced split's count): adding a forward's counts into it in place records them."""
        return self.logical_rows[layer]

    def keep_slot_counts(self, layer: int, counts: Any) -> None:
        """Keep ``counts`` (``[S]`` tokens per local slot of one forward of ``layer``: a tensor on any device,
        or a host sequence) for :meth:`slot_loads`.  During CUDA graph capture a CUDA tensor is added in place
        at once (graph-safe); otherwise only a reference is kept, folded when more than
        ``MAX_PENDING_SLOT_COUNTS`` pile up unread."""
        if getattr(counts, "is_cuda", False) and torch.cuda.is_current_stream_capturing():
            self.slot_rows[layer].add_(counts)  # graph-safe: in place into a live buffer
            return
        pending = self.slot_pending[layer]
        pending.append(counts)
        if len(pending) >= MAX_PENDING_SLOT_COUNTS:  # nobody reads: bound what is kept
            self._fold_slot_counts()

    # ------------------------------------------------------------------ read
    def loads(self) -> torch.Tensor:
        """int64 ``[L, E]``: the live logical buffer, brought up to date by this call (the accumulators are
        folded in: two small ops per layer and shape, no host sync); clone it to keep a snapshot."""
        for row, accs in zip(self.logical_rows, self._route_acc):
            for acc in accs.values():
                row.add_(acc.sum(dim=0, dtype=torch.int64))
                acc.zero_()
        return self.logical

    def slot_loads(self) -> torch.Tensor:
        """int64 ``[L, S]``: the live per-slot buffer, brought up to date by this call (the counts kept since
        the last call are summed in: a few ops for all layers together)."""
        self._fold_slot_counts()
        return self.slots

    def reset(self) -> None:
        """Zero every count (in place, no host sync)."""
        self.logical.zero_()
        for accs in self._route_acc:
            for acc in accs.values():
                acc.zero_()
        self.slots.zero_()
        for pending in self.slot_pending:
            pending.clear()

    def _fold_slot_counts(self) -> None:
        """Add the kept per-forward slot counts into :attr:`slots` and drop them: per device they came on,
        one stack ``[N, S]``, one ``index_add_`` into an ``[L, S]`` table, one copy to the device."""
        by_device: dict[torch.device, tuple[list[int], list[torch.Tensor]]] = {}
        for idx, pending in enumerate(self.slot_pending):
            for counts in pending:
                counts = torch.as_tensor(counts)
                layers, rows = by_device.setdefault(counts.device, ([], []))
                layers.append(idx)
                rows.append(counts.reshape(-1))
            pending.clear()
        num_layers, slots_per_rank = self.slots.shape
        for device, (layers, rows) in by_device.items():
            table = torch.zeros(num_layers, slots_per_rank, dtype=torch.int64, device=device)
            table.index_add_(0, torch.tensor(layers, device=device), torch.stack(rows).to(torch.int64))
            self.slots.add_(table.to(self.device))
