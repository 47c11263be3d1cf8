"""The seams of the core: what the manager, the executor and the checkpoint code need of the world.

Three protocols, each implemented outside the core (``megatron_eplb.patches`` for Megatron-core and
DeepSpeed, plain torch here):

* :class:`ExpertModel` — the model side: shape facts, the expert-parallel group, per-slot tensors, the
  recorded token counts, and the routing tables the owner of the placement pushes;
* :class:`OptimizerSlots` — the optimizer tensors that belong to one expert slot (masters, moments);
* :class:`Transport` — how slot bytes move between EP ranks, one round of sends/receives at a time (torch
  P2P today: ``megatron_eplb.transfer.transport``); its rounds return a :class:`TransportHandle` and fail
  with :class:`TransportError`.

Shapes: ``L`` MoE layers, ``E`` logical experts per layer, ``S`` slots per rank, ``P = S * EP`` physical
slots per layer.  Type-checking only (plus the one error type of the transport seam): nothing here
imports Megatron or DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from .errors import TransportError
from .placement import ExpertPlacement
from .slots import SlotParam

__all__ = ["ExpertModel", "OptimizerSlots", "Transport", "TransportError", "TransportHandle"]


@runtime_checkable
class ExpertModel(Protocol):
    """A model whose MoE layers hold physical expert slots (``patches.megatron.apply`` returns one)."""

    num_layers: int
    """``L``: MoE layers (ids ``0..L-1``; with pipeline stages the stage's own, see below)."""
    num_experts: int
    """``E``: logical experts per MoE layer."""
    slots_per_rank: int
    """``S``: physical slots on each EP rank."""
    ep_size: int
    """Ranks of the expert-parallel group."""
    ep_rank: int
    """This rank's index in the expert-parallel group."""
    ep_group: Any
    """The expert-parallel ``torch.distributed`` process group."""

    # Optional, with pipeline parallelism (PP > 1): ``stage`` (a :class:`megatron_eplb.pipeline.PipelineStage`:
    # the stage's MoE layers ``0..L-1`` are the model's ``offset..offset+L-1``), ``state_to_global(state)`` /
    # ``state_to_stage(state)`` (a dict keyed by parameter name between the stage's and the whole model's
    # names).  The manager and the checkpoints use them when present.

    @property
    def placement(self) -> ExpertPlacement:
        """The placement the layers route with now (``phy2log [L, P]``); the same on every EP rank."""
        ...

    def moe_layers(self) -> list[torch.nn.Module]:
        """The ``L`` MoE layer modules in order (a transfer finishes in its layer's forward pre-hook)."""
        ...

    def loads(self) -> torch.Tensor:
        """int64 ``[L, E]`` on the device: tokens routed to each logical expert since the last reset."""
        ...

    def slot_loads(self) -> torch.Tensor:
        """int64 ``[L, S]`` on the device: tokens this rank's slots computed since the last reset.  May be
        collective over the EP group (DeepSpeed's MoE layer counts what each rank sends, summed here): the
        manager calls it on every rank at the same point of each step."""
        ...

    def reset_loads(self) -> None:
        """Zero both counters."""
        ...

    def slot_params(self, layer: int, local_slot: int) -> list[SlotParam]:
        """The tensors of one local slot (same order and shapes for every slot): whole parameters, or blocks
        of parameters that stack several slots (:class:`~megatron_eplb.slots.SlotParam`)."""
        ...

    def logical_entries(
        self, layer: int, experts: Sequence[Sequence[torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """State-dict entries of ``layer``'s experts in the logical layout (the unpatched model's without EP)
        from the ``E`` logical experts' tensors (``[E]`` lists in :meth:`slot_params` order)."""
        ...

    def split_logical_entries(self, layer: int, state: Any) -> list[list[torch.Tensor]]:
        """The inverse of :meth:`logical_entries`: ``[E]`` lists of tensors from ``state``."""
        ...

    def commit_layer(self, layer: int, phy2log_row: Sequence[int] | np.ndarray) -> None:
        """Route ``layer`` with the new row ``[P]`` of ``phy2log`` (its slots already hold those experts)."""
        ...

    def sum_replica_grads(self) -> None:
        """Replace each replicated expert's slot gradients by their sum over its copies (collective)."""
        ...

    # Optional: ``model_facts() -> dict`` (the model's shape facts, e.g. ``{"hidden_size": 64, "num_experts":
    # 16}``), stored in a checkpoint so that a load into another model names the difference.

    def logical_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with every logical expert once (the unpatched model's keys)."""
        ...

    def load_logical_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> Any:
        """Fill every slot from its logical expert in ``state_dict`` (any placement or EP size saved it)."""
        ...


@runtime_checkable
class OptimizerSlots(Protocol):
    """The optimizer storage of expert slots (plain torch: ``megatron_eplb.optimizer_state.OptimizerSlotState``;
    DeepSpeed: ``patches.deepspeed.DeepSpeedSlotState``).

    Rules (:mod:`megatron_eplb.optimizer_state`): slot state is what is shaped like the parameter (an fp32
    master under key ``"fp32"`` where the optimizer keeps one, then the moments, keys sorted); Adam's
    ``step`` is one count per optimizer, never slot state: read and written only through
    :meth:`optimizer_step` / :meth:`set_optimizer_step`.

    Optional: ``begin_layer(layer, slots)`` / ``end_layer(layer)`` around a layer's transfer (the manager calls
    them when present; collective in the same order on every rank): a layout whose per-slot storage is not the
    same on every slot (ZeRO partitions cutting through a layer) returns whole tensors from :meth:`tensors` in
    between and writes them back at the end.
    """

    def tensors(self, params: Sequence[torch.Tensor | SlotParam]) -> list[torch.Tensor]:
        """Tensors that *are* the optimizer's storage for ``params`` (writing them writes the state), in
        an order that is the same on every rank; empty before the optimizer's first step.  A
        :class:`~megatron_eplb.slots.SlotParam` gets its part of each (a plain tensor: all of it)."""
        ...

    def full_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """Whole-tensor copies of ``p``'s slot state, each shaped like ``p`` (collective over ``p``'s
        data-parallel group where the optimizer partitions it)."""
        ...

    def set_full_state(self, p: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Write :meth:`full_state`-shaped ``values`` into ``p``'s state, creating it where missing (keys
        this layout does not keep, e.g. ``"fp32"`` without a master, are ignored).  Local."""
        ...

    def optimizer_step(self) -> int:
        """The optimizer's step count (0 before its first step)."""
        ...

    def set_optimizer_step(self, step: int) -> None:
        """Set the step count in every parameter's state (after :meth:`set_full_state` on a load)."""
        ...


@runtime_checkable
class TransportHandle(Protocol):
    """One posted round of a :class:`Transport` (returned by :meth:`Transport.post`)."""

    def wait(self, timeout: float | None = None) -> None:
        """Wait for every message of the round: on the host (CPU tensors, or any ``timeout``), or, for device
        buffers without ``timeout``, by ordering the *current* CUDA stream after the round (NCCL's
        ``work.wait()``), so it may be called again from another stream.  ``timeout`` in seconds for the whole
        round (``None``: the process group's own timeout).

        Raises:
            TransportError: the round failed (``group_broken`` says whether the group survived); any other
                exception counts as a broken group.
        """
        ...


@runtime_checkable
class Transport(Protocol):
    """Moves byte buffers between the ranks of one process group; the executor never calls P2P itself.

    A transfer posts a layer as successive rounds (each peer's message cut into pieces, piece ``i`` of every
    message in round ``i``); the rounds of both ends of a message are posted in the same order, so messages
    between two ranks match in posting order.  A new transport is one new file implementing this protocol
    (``megatron_eplb.transfer.transport.TorchP2PTransport`` is the torch.distributed one), passed as
    ``TransferExecutor(..., transport=...)``.
    """

    group: Any
    """The process group (``None``: WORLD) whose ranks ``0..N-1`` are the peers of :meth:`post`."""

    def post(
        self, sends: Sequence[tuple[int, torch.Tensor]], recvs: Sequence[tuple[int, torch.Tensor]]
    ) -> TransportHandle:
        """Post one round: every ``(peer, buffer)`` send and receive (contiguous byte buffers; peers are
        ranks of :attr:`group`) at once, without waiting; return its handle.  The buffers must stay
        untouched until the handle's ``wait`` returned (on CUDA: until the waiting stream passed it)."""
        ...

    def with_group(self, group: Any) -> Transport:
        """The same transport (same settings) over ``group``, a new group of the same ranks (after a
        :class:`TransportError` with ``group_broken`` the owner recreates the group and rebinds)."""
        ...
