"""LayerMover: the *move* and *commit* steps of a rebalance, one layer at a time.

The manager decides *when* (its state machine, :mod:`megatron_eplb.manager`); this module does *how*: post a
layer's slot transfers, finish the layer just before its next forward (a forward pre-hook) or at the latest
before the optimizer step, check it (the optional canary), then commit its new placement on the handle — or
roll it back, so that a failed transfer leaves the layer's weights, optimizer state and placement untouched.

What moves with a slot: its parameters (``handle.slot_params``) and, in training, their optimizer state
(``OptimizerSlots.tensors``). The bytes go through a :class:`~megatron_eplb.transfer.TransferExecutor` over
the mover's own transfer group (a copy of the EP group, remade when a timed-out receive broke it).

The data of one rebalance (plan, executor, queue, in-flight layers, record) lives in the
:class:`~megatron_eplb.phases.Transferring` state the mover is handed; the mover keeps only the transfer
group. No Megatron, no DeepSpeed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from .comm import any_rank, collective_device, new_group_like
from .config import EPLBConfig
from .phases import Transferring
from .protocols import ExpertModel, OptimizerSlots, Transport
from .transfer import TransferError, TransferExecutor, TransferPlan

__all__ = ["CANARY_SAMPLE_WORDS", "LayerMover"]

log = logging.getLogger("megatron_eplb")

CANARY_SAMPLE_WORDS = 65536  # 16-bit words hashed per tensor by the 'sampled' canary


class LayerMover:
    """Moves the slots of a :class:`Transferring` rebalance, layer by layer; the only caller of the handle's
    ``commit_layer``.

    Args:
        handle: the model side (:class:`~megatron_eplb.protocols.ExpertModel`).
        optimizer_state: the per-slot optimizer storage (:class:`~megatron_eplb.protocols.OptimizerSlots`),
            or None (inference: only weights move).
        config: the :class:`EPLBConfig` (``eplb_layers_per_step``, ``eplb_transfer_canary``,
            ``eplb_worker_timeout``); ``dynamic_eplb`` off: no transfer group is made.
        vote_group: every rank that routes tokens (EP x expert-DP); the ranks agree over it. None: the world.
        device: where the agreement's flags live (the collective device of ``vote_group``).
        pipeline: PP > 1: a broken transfer group is only marked (:attr:`group_broken`) and remade by the
            manager when every stage is at the round's end (:meth:`renew_group`), since a new group needs
            every rank.
        transport_factory: transfer group -> :class:`~megatron_eplb.protocols.Transport` (default: torch P2P).
        step_count: the manager's current step, for the log lines.

    Making the transfer group is collective over the world (construct the mover on every rank, in one order).
    """

    def __init__(
        self,
        handle: ExpertModel,
        optimizer_state: OptimizerSlots | None,
        config: EPLBConfig,
        *,
        vote_group: Any,
        device: torch.device,
        pipeline: bool,
        transport_factory: Callable[[Any], Transport] | None,
        step_count: Callable[[], int],
    ) -> None:
        self.handle = handle
        self.optimizer_state = optimizer_state
        self.config = config
        self.vote_group = vote_group
        self._device = device
        self._pipeline = pipeline
        self._transport_factory = transport_factory
        self._step_count = step_count
        #: the transfer group: a copy of the EP group, so slot moves never queue behind the model's collectives
        self.group = new_group_like(handle.ep_group) if config.dynamic_eplb else None
        #: PP: a timed-out transfer broke :attr:`group` (remade by :meth:`renew_group` at the round's end)
        self.group_broken = False

    # ------------------------------------------------------------- setup
    def executor(self, plan: TransferPlan) -> TransferExecutor:
        """The executor of ``plan`` over the transfer group (the canary as ``eplb_transfer_canary`` says)."""
        canary = self.config.eplb_transfer_canary
        return TransferExecutor(
            plan,
            self.slot_tensors,
            group=self.group,
            vote_group=self.vote_group,
            checksums=canary != "off",
            checksum_words=CANARY_SAMPLE_WORDS if canary == "sampled" else None,
            transport=None if self._transport_factory is None else self._transport_factory(self.group),
        )

    def renew_group(self) -> None:
        """Make a new transfer group (after :attr:`group_broken`). Collective over the world."""
        self.group = new_group_like(self.handle.ep_group)
        self.group_broken = False

    def slot_tensors(self, layer: int, local_slot: int) -> list[torch.Tensor]:
        """Every tensor that moves with local slot ``local_slot`` of ``layer``: its parameters' data, then
        (training) their optimizer state. The same shapes and dtypes for every slot of a layer."""
        params = list(self.handle.slot_params(layer, local_slot))
        tensors = [sp.data for sp in params]
        if self.optimizer_state is not None:
            tensors += self.optimizer_state.tensors(params)
        return tensors

    # -------------------------------------------------------------- move
    def start(self, state: Transferring) -> None:
        """Post the next ``eplb_layers_per_step`` layers' transfers (collective). Each layer finishes and
        commits just before its next forward — the transfer overlaps the rest of this step and the forward
        of the layers before it — or at the latest before the next optimizer step."""
        t0 = time.monotonic()
        count = self.config.eplb_layers_per_step
        batch, state.queue = state.queue[:count], state.queue[count:]
        layers = self.handle.moe_layers()
        begin = getattr(self.optimizer_state, "begin_layer", None)  # optional: e.g. ZeRO's partition pieces
        for layer in batch:
            if begin is not None:
                begin(
                    layer,
                    [list(self.handle.slot_params(layer, k)) for k in range(self.handle.slots_per_rank)],
                )
            transfer = state.executor.start_layer(layer)
            hook = layers[layer].register_forward_pre_hook(self._commit_hook(state, layer))
            state.in_flight[layer] = (transfer, hook)
        state.record.add_seconds("transfer", t0)

    def _commit_hook(self, state: Transferring, layer: int):
        def hook(module, args):
            self.finish(state, upto=layer, commit=True)

        return hook

    def finish(self, state: Transferring, upto: int | None = None, commit: bool = True) -> None:
        """Finish in-flight layers (up to ``upto``) in layer order (every rank runs the same collectives in
        one order). The phase does not change here: the manager completes the rebalance once nothing is left."""
        for layer in sorted(state.in_flight):
            if upto is not None and layer > upto:
                break
            self._finish_layer(state, layer, commit)

    # ------------------------------------------------------------ commit
    def _finish_layer(self, state: Transferring, layer: int, commit: bool) -> None:
        """Wait for one layer's transfer, check it, then switch the layer to its new placement — or leave
        the layer's old weights and placement intact (failed receive, canary mismatch, or ``commit=False``:
        the layer's forward did not run before the optimizer step, so its staged copy would be stale)."""
        t0 = time.monotonic()
        record, executor = state.record, state.executor
        transfer, hook = state.in_flight.pop(layer)
        hook.remove()
        canary = self.config.eplb_transfer_canary != "off"
        undo = self._snapshot_destinations(state, layer) if canary or not commit else {}
        problem, broken = None, False
        try:
            executor.finish_layer(transfer, timeout=self._transfer_timeout())
        except TransferError as exc:
            problem, broken = str(exc), exc.group_broken
        if problem is None and canary:
            bad = executor.verify_layer(transfer, timeout=self.config.eplb_worker_timeout)
            if any_rank(bool(bad), self.vote_group, self._device):
                problem = (
                    f"canary: moved slots {bad or '(on another expert-DP copy)'} differ from their senders"
                )
        if problem is None and commit:
            self.handle.commit_layer(layer, state.new.phy2log[layer])
            record.layers_committed.append(layer)
            record.moved_bytes += state.plan.layer(layer).num_sends * self._slot_bytes(layer)
        else:
            if problem is None:
                problem = "its forward did not run before the optimizer step"
            elif any_rank(broken, self.vote_group, self._device):  # a timed-out receive closes gloo's pair
                if self._pipeline:  # PP: a new group needs every rank (made at the round's end)
                    self.group_broken = True
                else:
                    self.group = new_group_like(self.handle.ep_group)
                    executor.group = self.group
            self._restore(layer, undo)
            record.layers_rolled_back.append(layer)
            log.error(
                "EPLB step %d: layer %d transfer rolled back (%s); it keeps its old placement and weights",
                self._step_count(),
                layer,
                problem,
            )
        end = getattr(self.optimizer_state, "end_layer", None)
        if end is not None:
            end(layer)
        record.add_seconds("transfer", t0)

    def _snapshot_destinations(self, state: Transferring, layer: int) -> dict[int, list[torch.Tensor]]:
        """Copies of the local slots this layer's transfer overwrites (for a rollback after the write)."""
        part = state.plan.layer(layer)
        me = self.handle.ep_rank
        slots = set(part.recvs_to(me)[:, 3].tolist()) | set(part.copies_on(me)[:, 2].tolist())
        return {s: [t.detach().clone() for t in self.slot_tensors(layer, s)] for s in sorted(slots)}

    def _restore(self, layer: int, undo: dict[int, list[torch.Tensor]]) -> None:
        with torch.no_grad():
            for slot, saved in undo.items():
                for dst, src in zip(self.slot_tensors(layer, slot), saved):
                    dst.copy_(src)

    def _transfer_timeout(self) -> float | None:
        """How long ``finish_layer`` waits on the host: ``eplb_worker_timeout`` over gloo; none over NCCL,
        where a wait with a timeout blocks the host until the receives land (slot moves at 0.51 of NCCL's
        bandwidth instead of 0.8 on two H200s) while the compute stream can simply wait for them; a hung
        NCCL peer is ended by the process group's own timeout (its watchdog), as for any collective."""
        if collective_device(self.group).type == "cuda":
            return None
        return self.config.eplb_worker_timeout

    def _slot_bytes(self, layer: int) -> int:
        return sum(t.numel() * t.element_size() for t in self.slot_tensors(layer, 0))
