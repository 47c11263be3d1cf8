"""Per-slot optimizer state of a plain torch optimizer, and the rules every slot-state layout follows.

The manager moves a slot's optimizer tensors with its weights (:meth:`OptimizerSlotState.tensors`) and
the logical checkpoint reads and writes whole tensors per parameter (:meth:`~OptimizerSlotState.full_state`,
:meth:`~OptimizerSlotState.set_full_state`).  The DeepSpeed layout
(``megatron_eplb.patches.deepspeed.DeepSpeedSlotState``) implements the same
:class:`megatron_eplb.protocols.OptimizerSlots` protocol with the same rules:

* **Slot state is what is shaped like the parameter**: an fp32 master copy (key :data:`MASTER_KEY`, only
  where the optimizer keeps one apart from the parameter) and the moments (``exp_avg``, ``exp_avg_sq``,
  ...), keys sorted.  Scalars are not slot state.
* **Adam's ``step`` is one count per optimizer, not per slot.**  Every parameter of the model takes every
  optimizer step (experts without tokens get a zero gradient; copies get the summed one), so every
  parameter's ``step`` is the same number.  ``tensors`` and ``full_state`` never carry it (a moved slot
  keeps its own ``step``, which is that same number); a checkpoint stores it once
  (:meth:`~OptimizerSlotState.optimizer_step`) and a load writes it into every parameter's state after
  the moments (:meth:`~OptimizerSlotState.set_optimizer_step`), so a resumed run continues from that count
  under any placement or EP size.

Pure torch: no process group, no Megatron, no DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .slots import SlotParam, as_slot_params

__all__ = [
    "MASTER_KEY",
    "STEP_KEY",
    "OptimizerSlotState",
    "param_shaped_state",
    "read_step",
    "write_state",
    "write_step",
]

MASTER_KEY = "fp32"
"""Key of the fp32 master copy in :meth:`OptimizerSlotState.full_state` (where there is one)."""
STEP_KEY = "step"
"""Adam's step count: one number per optimizer, never slot state."""


def param_shaped_state(state: Mapping[str, Any], like: torch.Tensor) -> dict[str, torch.Tensor]:
    """The entries of one parameter's optimizer ``state`` that are tensors shaped like ``like``, keys sorted
    (the tensors themselves: writing them writes the optimizer's state)."""
    return {
        k: v
        for k, v in sorted(state.items())
        if torch.is_tensor(v) and v.shape == like.shape and k != STEP_KEY
    }


def write_state(state: dict[str, Any], values: Mapping[str, torch.Tensor], like: torch.Tensor) -> None:
    """Write ``values`` (full tensors) into one parameter's optimizer ``state``: in place where the entry
    exists, else a new tensor on ``like``'s device and dtype.  :data:`MASTER_KEY` and :data:`STEP_KEY` are
    skipped (a master is not kept here; the step is :func:`write_step`'s)."""
    for key, value in values.items():
        if key in (MASTER_KEY, STEP_KEY):
            continue
        current = state.get(key)
        if torch.is_tensor(current) and current.shape == like.shape:
            current.copy_(value.reshape(like.shape))
        else:
            state[key] = value.detach().reshape(like.shape).to(device=like.device, dtype=like.dtype).clone()


def read_step(optimizer: torch.optim.Optimizer) -> int:
    """The optimizer's step count: the largest ``step`` over its per-parameter states and param groups
    (0 before the first step)."""
    steps = [s.get(STEP_KEY) for s in optimizer.state.values()]
    steps += [g.get(STEP_KEY) for g in optimizer.param_groups]
    return max((int(float(s)) for s in steps if s is not None), default=0)


def write_step(optimizer: torch.optim.Optimizer, step: int) -> None:
    """Set ``step`` in every non-empty per-parameter state (created as torch's Adam creates it where
    missing) and in every param group that keeps one."""
    for group in optimizer.param_groups:
        if STEP_KEY in group:
            group[STEP_KEY] = int(step)
        on_device = bool(group.get("capturable") or group.get("fused"))
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            current = state.get(STEP_KEY)
            if torch.is_tensor(current):
                current.fill_(float(step))
            elif current is not None:
                state[STEP_KEY] = type(current)(step)
            else:
                dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                device = p.device if on_device else torch.device("cpu")
                state[STEP_KEY] = torch.tensor(float(step), dtype=dtype, device=device)


class OptimizerSlotState:
    """The per-slot optimizer tensors of a plain torch optimizer (per-parameter ``state`` dicts).

    Implements :class:`megatron_eplb.protocols.OptimizerSlots` (rules in this module's docstring).  Local:
    no call communicates.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def tensors(self, params: Iterable[torch.Tensor | SlotParam]) -> list[torch.Tensor]:
        """The optimizer's own state tensors of ``params`` (param order, keys sorted; no ``step``), each cut
        to the slot's part where a :class:`~megatron_eplb.slots.SlotParam` is a block of its parameter;
        empty before the first step."""
        out: list[torch.Tensor] = []
        for sp in as_slot_params(params):
            out.extend(
                sp.of(t)
                for t in param_shaped_state(self.optimizer.state.get(sp.param, {}), sp.param).values()
            )
        return out

    def full_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{key: tensor}`` copies of ``p``'s slot state (no master: the parameter is its own)."""
        return {
            k: v.detach().clone() for k, v in param_shaped_state(self.optimizer.state.get(p, {}), p).items()
        }

    def set_full_state(self, p: torch.Tensor, values: Mapping[str, torch.Tensor]) -> None:
        """Write :meth:`full_state`-shaped ``values`` into ``p``'s state (created where missing); a
        :data:`MASTER_KEY` entry is ignored.  Call :meth:`set_optimizer_step` afterwards."""
        if any(k not in (MASTER_KEY, STEP_KEY) for k in values):
            write_state(self.optimizer.state.setdefault(p, {}), values, p)

    def optimizer_step(self) -> int:
        """The optimizer's step count (:func:`read_step`)."""
        return read_step(self.optimizer)

    def set_optimizer_step(self, step: int) -> None:
        """Set the step count of every parameter that has state (:func:`write_step`)."""
        write_step(self.optimizer, step)
