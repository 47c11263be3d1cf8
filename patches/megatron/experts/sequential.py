"""Expert storage of Megatron-core's ``SequentialMLP``: one ``MLP`` module per local expert.

Slot ``k`` is ``experts.local_experts[k]``; its state-dict keys are ``local_experts.{k}.{name}``.  For Megatron
dist checkpointing, a slot is run through ``SequentialMLP.sharded_state_dict`` itself on
:class:`_OneExpertView`, so it is keyed and offset exactly as the unpatched model keys its logical expert.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import ExpertStorage, register


@register
class SequentialMLPStorage(ExpertStorage):
    """``SequentialMLP``: slot ``k`` is the module ``local_experts[k]``."""

    class_name = "SequentialMLP"
    key_prefix = "local_experts."

    @property
    def num_slots(self) -> int:
        return len(self.experts.local_experts)

    def slot_params(self, k: int) -> list[torch.nn.Parameter]:
        return list(self.experts.local_experts[k].parameters())

    def slot_param_names(self) -> list[str]:
        return [name for name, _ in self.experts.local_experts[0].named_parameters()]

    def slot_extra_state(self) -> dict[str, Any]:
        names = self.slot_param_names()
        return {k: v for k, v in self.experts.local_experts[0].state_dict().items() if k not in names}

    def slot_sharded_state_dict(self, k, expert, num_experts, prefix, sharded_offsets, metadata) -> dict:
        view = _OneExpertView(self.experts, self.experts.local_experts[k], expert, num_experts)
        original = type(self.experts).sharded_state_dict  # the class's: the instance's is wrapped
        src, dst = f"{prefix}{self.key_prefix}0.", f"{prefix}{self.key_prefix}{k}."
        return {
            dst + key[len(src) :] if key.startswith(src) else key: sharded
            for key, sharded in original(view, prefix, sharded_offsets, metadata).items()
        }


class _ExpertRank:
    """Stands in for the EP group in :class:`_OneExpertView`: ``rank()`` is the expert, ``size()`` the count."""

    def __init__(self, expert: int, num_experts: int) -> None:
        self._rank, self._size = expert, num_experts

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


class _OneExpertView:
    """An experts module seen as holding only logical expert ``expert`` of ``num_experts``, as local expert 0
    of EP rank ``expert``: Megatron's ``SequentialMLP.sharded_state_dict`` run on it keys and offsets the slot
    exactly as the unpatched model keys that expert.  Other attributes are the real module's."""

    def __init__(
        self, experts: torch.nn.Module, slot: torch.nn.Module, expert: int, num_experts: int
    ) -> None:
        self._experts = experts
        self.local_experts = [slot]
        self.num_local_experts = 1
        self.ep_group = _ExpertRank(expert, num_experts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._experts, name)
