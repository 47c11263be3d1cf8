"""The seams of the core: what the manager, the executor and the checkpoint code need of the world.

Three protocols, each implemented outside the core (``megatron_eplb.patches`` for Megatron-core and
DeepSpeed, plain torch here):

* :class:`ExpertModel` — the model side: shape facts, the expert-parallel group, per-slot tensors, the
  recorded token counts, and the routing tables the owner of the placement pushes;
* :class:`OptimizerSlots` — the optimizer tensors that belong to one expert slot (masters, moments);
* :class:`Transport` — how slot bytes move between EP ranks (torch P2P today).

Shapes: ``L`` MoE layers, ``E`` logical experts per layer, ``S`` slots per rank, ``P = S * EP`` physical
slots per layer.  Type-checking only: nothing here imports Megatron or DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from .placement import ExpertPlacement

__all__ = ["ExpertModel", "OptimizerSlots", "Transport"]


@runtime_checkable
class ExpertModel(Protocol):
    """A model whose MoE layers hold physical expert slots (``patches.megatron.apply`` returns one)."""

    num_layers: int
    """``L``: MoE layers (global ids ``0..L-1``)."""
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
        """int64 ``[L, S]`` on the device: tokens this rank's slots computed since the last reset."""
        ...

    def reset_loads(self) -> None:
        """Zero both counters."""
        ...

    def slot_params(self, layer: int, local_slot: int) -> list[torch.nn.Parameter]:
        """The parameters of one local slot (same order and shapes for every slot)."""
        ...

    def commit_layer(self, layer: int, phy2log_row: Sequence[int] | np.ndarray) -> None:
        """Route ``layer`` with the new row ``[P]`` of ``phy2log`` (its slots already hold those experts)."""
        ...

    def sum_replica_grads(self) -> None:
        """Replace each replicated expert's slot gradients by their sum over its copies (collective)."""
        ...

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
    """

    def tensors(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tensors that *are* the optimizer's storage for ``params`` (writing them writes the state), in
        an order that is the same on every rank; empty before the optimizer's first step."""
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
class Transport(Protocol):
    """Moves byte buffers between the ranks of one process group (the executor never calls P2P itself)."""

    def exchange(self, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]]) -> Any:
        """Post every ``(peer rank, buffer)`` send and receive at once; return a handle whose ``wait()``
        returns when all of them completed (raises on failure)."""
        ...
