"""Expert storage of Megatron-core's ``SequentialMLP``: one ``MLP`` module per local expert.

Slot ``k`` is ``experts.local_experts[k]``: its parameters are whole (``SlotParam.whole``), its state-dict keys
``local_experts.{k}.{name}`` (the base's per-slot layout).  For Megatron dist checkpointing, a slot is run
through ``SequentialMLP.sharded_state_dict`` itself on a one-expert view (``local_experts = [slot]``), so it is
keyed and offset exactly as the unpatched model keys its logical expert.
"""

from __future__ import annotations

from typing import Any

from megatron_eplb.slots import SlotParam

from .base import ExpertStorage, register


@register
class SequentialMLPStorage(ExpertStorage):
    """``SequentialMLP``: slot ``k`` is the module ``local_experts[k]``."""

    class_name = "SequentialMLP"
    key_prefix = "local_experts."

    @property
    def num_slots(self) -> int:
        return len(self.experts.local_experts)

    def slot_params(self, k: int) -> list[SlotParam]:
        return [SlotParam.whole(p) for p in self.experts.local_experts[k].parameters()]

    def slot_param_names(self) -> list[str]:
        return [name for name, _ in self.experts.local_experts[0].named_parameters()]

    def slot_extra_state(self) -> dict[str, Any]:
        names = self.slot_param_names()
        return {k: v for k, v in self.experts.local_experts[0].state_dict().items() if k not in names}

    def slot_sharded_state_dict(self, k, expert, num_experts, prefix, sharded_offsets, metadata) -> dict:
        src, dst = f"{prefix}{self.slot_key(0, '')}", f"{prefix}{self.slot_key(k, '')}"
        return self.one_expert_sharded_state_dict(
            expert,
            num_experts,
            prefix,
            sharded_offsets,
            metadata,
            rename=lambda key: dst + key[len(src) :] if key.startswith(src) else key,
            local_experts=[self.experts.local_experts[k]],
        )
