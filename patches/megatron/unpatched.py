"""A logical checkpoint for a model *without* EPLB: :func:`unpatched_state_dict`.

The logical layout (``MegatronEPLB.logical_state_dict``) is the state dict of the unpatched model without EP.
An unpatched model with EP holds logical expert ``e`` on EP rank ``e // (E / EP)`` as its local expert
``e % (E / EP)``; this cuts that rank's experts out of a logical state dict, in the layout of its expert
class (``experts/``: one module per expert, or stacked).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from megatron_eplb.errors import CheckpointError

from .experts import storage_for

__all__ = ["unpatched_state_dict"]


def unpatched_state_dict(model: torch.nn.Module, logical_state: Mapping[str, Any]) -> dict[str, Any]:
    """``model``'s state dict (an unpatched Megatron-core model, Megatron's default placement, this rank's
    experts) filled from the logical state dict ``logical_state``; load it with ``model.load_state_dict``.

    Raises:
        CheckpointError: ``logical_state`` lacks a layer's logical expert entries.
    """
    from .apply import find_moe_layers

    out = dict(logical_state)
    for name, layer in find_moe_layers(model):
        storage = storage_for(layer.experts)
        prefix = f"{name}.experts." if name else "experts."
        num_experts = int(layer.config.num_moe_experts)
        own = {k[len(prefix) :]: v for k, v in logical_state.items() if k.startswith(prefix)}
        try:
            experts = storage.split_state_entries(own, num_experts)
        except KeyError as exc:
            raise CheckpointError(
                f"MoE layer {name!r}: the logical state dict has no {storage.class_name} entry "
                f"{prefix}{exc.args[0]} for {num_experts} experts"
            ) from None
        for key in storage.state_keys(num_experts):
            out.pop(prefix + key, None)
        ep_rank = dist.get_rank(layer.experts.ep_group) if dist.is_initialized() else 0
        local = experts[ep_rank * storage.num_slots : (ep_rank + 1) * storage.num_slots]
        out.update({prefix + k: v for k, v in storage.state_entries(local).items()})
        out.update({prefix + k: v for k, v in storage.extra_entries(storage.num_slots).items()})
    return out
