"""The load window: the per-step token counts of the last ``W`` steps, kept on the device, and their sums
over every rank that routes tokens (the *record* and *gather* steps of the pipeline).

Shapes: ``L`` MoE layers, ``E`` logical experts, ``S`` slots per rank, ``P = S * EP`` slots per layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .protocols import ExpertModel

__all__ = ["LoadWindow"]


class LoadWindow:
    """A ring of the last ``size`` steps' counts: logical ``[W, L, E]`` and this rank's slots ``[W, L, S]``.

    Args:
        handle: the model side; its ``loads()`` / ``slot_loads()`` are read (and reset) each step.
        size: ``W``, steps kept.
        group: every rank that routes tokens (EP x expert-DP) for the gathers; None: the world.
    """

    def __init__(self, handle: ExpertModel, size: int, group: Any = None) -> None:
        self.handle = handle
        self.group = group
        self.device = handle.loads().device
        h = handle
        self._logical = torch.zeros(size, h.num_layers, h.num_experts, dtype=torch.int64, device=self.device)
        self._slots = torch.zeros(size, h.num_layers, h.slots_per_rank, dtype=torch.int64, device=self.device)
        self.filled = 0  # steps recorded, at most ``size``
        self._next = 0  # ring index of the next step

    def record(self) -> None:
        """Keep this step's counts (device copies, no host sync) and reset the handle's counters."""
        self._logical[self._next].copy_(self.handle.loads())
        self._slots[self._next].copy_(self.handle.slot_loads())
        fast = getattr(self.handle, "fast", None)
        if fast is not None:  # per-step replicas: their tokens count on the rank that computed them (only the
            # rank sums of the per-slot counts are read), on its first slot
            self._slots[self._next, :, 0] += fast.spare_loads.sum(dim=1).to(self.device, non_blocking=True)
        self._next = (self._next + 1) % self._logical.shape[0]
        self.filled = min(self.filled + 1, self._logical.shape[0])
        self.handle.reset_loads()

    def gather(self) -> tuple[np.ndarray, np.ndarray]:
        """The window summed over every rank that routes tokens (collective over ``group``).

        Returns (logical ``[L, E]``, measured per physical slot ``[L, P]``), both int64 numpy.
        """
        return self._gather(self._logical.sum(0), self._slots.sum(0))

    def gather_steps(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """The last ``steps`` recorded steps one by one, summed over every rank that routes tokens
        (collective over ``group``).

        Returns (logical ``[k, L, E]``, measured per physical slot ``[k, L, P]``), ``k = min(steps, filled)``,
        oldest first, int64 numpy.
        """
        size = self._logical.shape[0]
        k = min(steps, self.filled)
        idx = torch.tensor([(self._next - k + i) % size for i in range(k)], device=self.device)
        return self._gather(self._logical[idx], self._slots[idx])

    def gather_steps_per_rank(self, steps: int) -> np.ndarray:
        """The last ``steps`` recorded steps' logical counts of every rank that routes tokens, one by one
        (collective over ``group``: one all-gather).

        Returns int64 numpy ``[k, R, L, E]``, ``k = min(steps, filled)``, oldest first, ``R`` the ranks of
        ``group`` in group-rank order.
        """
        size = self._logical.shape[0]
        k = min(steps, self.filled)
        idx = torch.tensor([(self._next - k + i) % size for i in range(k)], device=self.device)
        local = self._logical[idx].contiguous()  # [k, L, E]
        if not dist.is_initialized():
            return local.unsqueeze(1).cpu().numpy()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local, group=self.group)
        return torch.stack(parts, dim=1).cpu().numpy()

    def _gather(self, logical: torch.Tensor, local_slots: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Sum ``logical [..., L, E]`` and this rank's ``local_slots [..., L, S]`` (placed at its slots of
        ``[..., L, P]``) over ``group``."""
        h = self.handle
        per_slot = local_slots.new_zeros((*local_slots.shape[:-1], h.placement.num_slots))
        s = h.slots_per_rank
        per_slot[..., h.ep_rank * s : (h.ep_rank + 1) * s] = local_slots
        logical = logical.clone()
        if dist.is_initialized():
            dist.all_reduce(logical, group=self.group)
            dist.all_reduce(per_slot, group=self.group)
        return logical.cpu().numpy(), per_slot.cpu().numpy()
