"""Expert storage of Megatron-core's legacy ``GroupedMLP`` (megatron-core <= 0.16): two stacked weights.

``GroupedMLP`` keeps all ``S`` local experts in two parameters and reads them, in its forward, as
``weight1.view(S, H, -1)`` (``[H, S * F']``, ``F' = F`` or ``2F`` with a gated unit) and
``weight2.view(S, -1, H)`` (``[S * F, H]``).  Slot ``k`` is therefore the ``k``-th of ``S`` equal contiguous
blocks of each: ``weight1 [H, F']`` and ``weight2 [F, H]`` (``SlotParam.block``); moves, gradient sums and
optimizer state all act on these blocks in place.

State dicts keep Megatron's layout: the module's own entries are ``weight1`` / ``weight2`` stacked over its
slots, and the logical entries (:meth:`GroupedMLPStorage.state_entries` of the ``E`` logical experts) are
those of the unpatched ``GroupedMLP`` without EP, ``weight1 [H, E * F']`` and ``weight2 [E * F, H]``.  Dist
checkpoints: ``GroupedMLP.sharded_state_dict`` run on a one-expert view of each slot (Megatron's own keys,
``[E, ...]`` global shapes, offset = the logical expert), under per-slot keys ``slots.{k}.weight1`` that a
load stacks back into ``weight1`` (``dist_ckpt.py``).

Megatron's ``GroupedMLP`` needs the ``grouped_gemm`` package (or :mod:`..grouped_gemm`'s drop-in:
``install()``) and asserts ``config.bf16`` in its forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from megatron_eplb.slots import SlotParam

from .base import ExpertStorage, register

_NAMES = ("weight1", "weight2")


@register
class GroupedMLPStorage(ExpertStorage):
    """``GroupedMLP``: slot ``k`` is block ``k`` of ``weight1`` and of ``weight2``."""

    class_name = "GroupedMLP"
    key_prefix = "slots."

    @property
    def num_slots(self) -> int:
        return int(self.experts.num_local_experts)

    def _shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """A slot's ``weight1 [H, F']`` and ``weight2 [F, H]`` shapes."""
        hidden, slots = int(self.experts.config.hidden_size), self.num_slots
        w1, w2 = self.experts.weight1, self.experts.weight2
        return (hidden, w1.numel() // slots // hidden), (w2.numel() // slots // hidden, hidden)

    def slot_params(self, k: int) -> list[SlotParam]:
        shape1, shape2 = self._shapes()
        return [
            SlotParam.block(self.experts.weight1, k, self.num_slots, shape1),
            SlotParam.block(self.experts.weight2, k, self.num_slots, shape2),
        ]

    def slot_param_names(self) -> list[str]:
        return list(_NAMES)

    # ------------------------------------------------------- state-dict layout
    def state_keys(self, count: int) -> list[str]:
        return list(_NAMES)

    def state_entries(self, tensors: Sequence[Sequence[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``weight1 [H, N * F']`` and ``weight2 [N * F, H]`` of ``N`` experts, stacked as ``GroupedMLP``
        stacks its local experts (``weight1.view(N, H, -1)[i]`` is expert ``i``'s)."""
        (hidden, _), _ = self._shapes()
        w1 = torch.stack([ts[0] for ts in tensors])  # [N, H, F']
        w2 = torch.stack([ts[1] for ts in tensors])  # [N, F, H]
        return {"weight1": w1.view(hidden, -1), "weight2": w2.view(-1, hidden)}

    def split_state_entries(self, state: Mapping[str, torch.Tensor], count: int) -> list[list[torch.Tensor]]:
        shapes = self._shapes()
        parts = []
        for name, shape in zip(_NAMES, shapes):
            if name not in state:
                raise KeyError(name)
            t = state[name]
            if t.numel() != count * shape[0] * shape[1]:
                raise KeyError(
                    f"{name} of shape {list(t.shape)} does not hold {count} experts of shape {list(shape)}"
                )
            parts.append(t.reshape(count, *shape))
        return [[p[i] for p in parts] for i in range(count)]

    # ------------------------------------------------------- dist checkpoints
    def slot_sharded_state_dict(self, k, expert, num_experts, prefix, sharded_offsets, metadata) -> dict:
        blocks = dict(zip(_NAMES, (sp.data for sp in self.slot_params(k))))
        own = {f"{prefix}{name}": f"{prefix}{self.slot_key(k, name)}" for name in _NAMES}
        return self.one_expert_sharded_state_dict(
            expert,
            num_experts,
            prefix,
            sharded_offsets,
            metadata,
            rename=lambda key: own.get(key, key),
            weight1=blocks["weight1"],
            weight2=blocks["weight2"],
            state_dict=lambda prefix="", keep_vars=False: dict(blocks),
        )
