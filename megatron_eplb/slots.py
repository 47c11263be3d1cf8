"""One tensor of one expert slot: :class:`SlotParam`, the unit the core moves, sums and saves.

An expert slot holds a few tensors (e.g. its fc1 and fc2 weights).  Each is a :class:`SlotParam`: ``shape``
elements at flat ``offset`` of a parameter, either

* the **whole parameter**, where every slot has its own (Megatron's ``SequentialMLP``; ``TEGroupedMLP``'s
  per-slot ``weight{k}``), or
* a **block of a stacked parameter** shared by the slots (the legacy ``GroupedMLP``: ``weight1 [H, S * F]``
  is read as ``[S, H, F]``, so slot ``k`` is the ``k``-th of ``S`` equal contiguous blocks).

Anything shaped like the parameter — its data, its gradient, an fp32 master, the Adam moments — is cut the
same way (:meth:`SlotParam.of`); a 1-D fragment of its flattened form (ZeRO's partition) with
:meth:`SlotParam.of_fragment`.  Every cut is a view: writing it writes the parameter's tensor.

:class:`SlotShape`: where a handle's slots are (``P`` per layer, this rank's global slot ids) and its MoE
layers, the same for every handle.

Pure torch: no process group, no Megatron, no DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["SlotParam", "SlotShape", "as_slot_params"]


@dataclass(frozen=True, eq=False)
class SlotParam:
    """``shape`` elements at flat ``offset`` of ``param``: one tensor of one expert slot.

    Attributes:
        param: the parameter (a whole one, or a stacked one holding several slots).
        offset: the first element of the slot's block in ``param``'s flattened (contiguous) storage.
        shape: the slot's tensor shape (the logical expert's tensor shape).
    """

    param: torch.Tensor
    offset: int
    shape: tuple[int, ...]

    @classmethod
    def whole(cls, param: torch.Tensor) -> SlotParam:
        """The whole of ``param`` (a slot with its own parameter)."""
        return cls(param, 0, tuple(param.shape))

    @classmethod
    def block(cls, param: torch.Tensor, k: int, num_blocks: int, shape: Iterable[int]) -> SlotParam:
        """Block ``k`` of ``num_blocks`` equal contiguous blocks of ``param``, seen as ``shape``."""
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        if numel * num_blocks != param.numel():
            raise ValueError(
                f"{num_blocks} blocks of shape {list(shape)} do not make a parameter of shape {list(param.shape)}"
            )
        return cls(param, k * numel, shape)

    @property
    def numel(self) -> int:
        """Elements of the slot's tensor."""
        return math.prod(self.shape)

    @property
    def is_whole(self) -> bool:
        """Whether the slot's tensor is the whole parameter."""
        return self.offset == 0 and self.numel == self.param.numel()

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """The slot's part of ``t`` (shaped like :attr:`param`): a view shaped :attr:`shape`."""
        if t.shape != self.param.shape:
            raise ValueError(
                f"tensor of shape {list(t.shape)} for a parameter of shape {list(self.param.shape)}"
            )
        if self.is_whole:
            return t if t.shape == self.shape else t.view(self.shape)
        return t.view(-1).narrow(0, self.offset, self.numel).view(self.shape)

    def of_fragment(self, fragment: torch.Tensor, start: int) -> torch.Tensor:
        """The slot's part of ``fragment``, the 1-D elements ``[start, start + len)`` of the flattened
        parameter (ZeRO's partition of it): a 1-D view, empty where the two do not overlap."""
        lo = max(start, self.offset)
        hi = min(start + fragment.numel(), self.offset + self.numel)
        return fragment.view(-1).narrow(0, lo - start if hi > lo else 0, max(hi - lo, 0))

    @property
    def data(self) -> torch.Tensor:
        """The slot's weights (a view without autograd)."""
        return self.of(self.param.detach())


def as_slot_params(params: Iterable[torch.Tensor | SlotParam]) -> list[SlotParam]:
    """``params`` as slot tensors: a plain tensor stands for the whole of it."""
    return [p if isinstance(p, SlotParam) else SlotParam.whole(p) for p in params]


class SlotShape:
    """The shape accessors every model handle (:class:`~megatron_eplb.protocols.ExpertModel`) computes the
    same way, from its ``slots_per_rank`` (``S``), ``ep_size``, ``ep_rank`` and ``_layers`` (its MoE layer
    modules, index = MoE layer id).  A mixin of the handles in ``patches/``."""

    slots_per_rank: int
    ep_size: int
    ep_rank: int
    _layers: list[torch.nn.Module]

    @property
    def num_slots(self) -> int:
        """``P``: physical slots per layer over the EP group."""
        return self.slots_per_rank * self.ep_size

    def moe_layers(self) -> list[torch.nn.Module]:
        """The MoE layer modules, index = MoE layer id (a transfer commits in their forward pre-hook)."""
        return list(self._layers)

    def local_slots(self) -> range:
        """Global slot ids of this rank's local slots."""
        return range(self.ep_rank * self.slots_per_rank, (self.ep_rank + 1) * self.slots_per_rank)
