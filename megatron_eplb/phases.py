"""The manager's phases: one state object per phase, holding the data that phase needs and nothing else,
and the record each rebalance leaves (``EPLBManager.history``)."""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .placement import ExpertPlacement
from .stats import balance_summary

__all__ = ["Gated", "Phase", "Planning", "RebalanceRecord", "Recording", "State", "Transferring"]


class Phase(enum.Enum):
    RECORDING = "recording"
    PLANNING = "planning"
    TRANSFERRING = "transferring"
    GATED = "gated"  # gate_eplb: the one rebalance is done; loads are still recorded for metrics


@dataclass
class RebalanceRecord:
    """What one rebalance did (returned by ``step()`` when it completes, kept in ``manager.history``)."""

    started_step: int
    layers_planned: list[int]
    completed_step: int | None = None
    outcome: str = "pending"  # committed | no_change | late_plan | failed_layers
    layers_committed: list[int] = field(default_factory=list)
    layers_rolled_back: list[int] = field(default_factory=list)
    balancedness_before: float = float("nan")  # predicted from the window's counts, old placement
    balancedness_after: float = float("nan")  # predicted from the window's counts, new placement
    measured_balancedness_before: float = float("nan")  # per-slot counts actually computed, old placement
    measured_balancedness_after: float = float("nan")  # per-slot counts of the next window (new placement)
    old_placement_next_window: float = float("nan")  # what the old placement would have given on that window
    moved_slots: int = 0
    moved_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # gather, plan_wait, transfer

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def measure_before(self, placement: ExpertPlacement, load: np.ndarray, per_slot: np.ndarray) -> None:
        """The window this rebalance plans from, under the placement it ran on: ``balancedness_before``
        predicted from ``load [L, E]``, ``measured_balancedness_before`` from the slots' counts ``per_slot
        [L, P]`` (when they computed any tokens)."""
        self.balancedness_before = balance_summary(placement, load)["mean"]
        if per_slot.sum() > 0:
            self.measured_balancedness_before = balance_summary(placement, per_slot, per_slot=True)["mean"]

    def measure_next_window(
        self, nxt: RebalanceRecord, old: ExpertPlacement | None, load: np.ndarray
    ) -> None:
        """Once, from the measured window of the next rebalance (``nxt``, after :meth:`measure_before`): the
        balancedness this rebalance's placement reached (``measured_balancedness_after``) and what ``old``,
        the placement before it, would have given on that window's ``load [L, E]``."""
        if np.isnan(self.measured_balancedness_after) and not np.isnan(nxt.measured_balancedness_before):
            self.measured_balancedness_after = nxt.measured_balancedness_before
            if old is not None:
                self.old_placement_next_window = balance_summary(old, load)["mean"]

    def add_seconds(self, phase: str, since: float) -> None:
        """Add the time from ``since`` (``time.monotonic()``) to now to ``seconds[phase]``."""
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.monotonic() - since


# One object per phase: the data a phase needs lives in its state and nowhere else.
@dataclass
class Recording:
    """Loads are recorded each step; a rebalance starts when one is due."""

    phase: Phase = Phase.RECORDING


@dataclass
class Gated:
    """``gate_eplb``: the one rebalance is done; loads are still recorded for metrics."""

    phase: Phase = Phase.GATED


@dataclass
class Planning:
    """The worker plans on ``window_load [L, E]``; the plan is awaited from ``due_step`` on.  ``late``: it
    was not there at ``due_step``; training goes on and every step looks again without waiting, until it
    arrives or ``eplb_worker_timeout`` after ``submitted_at`` drops it.  ``arrived`` (PP > 1, planning rank):
    this stage's plan, taken from the worker at a step where another stage's was still pending, kept until
    every stage has one (the worker gives a plan once)."""

    record: RebalanceRecord
    window_load: np.ndarray
    submitted_at: float
    due_step: int
    late: bool = False
    arrived: ExpertPlacement | None = None
    phase: Phase = Phase.PLANNING


@dataclass
class Transferring:
    """Layers move from ``old`` to ``new``: queued, then in flight (posted, finished in the layer's forward
    pre-hook or at the latest before the optimizer step), then committed or rolled back."""

    record: RebalanceRecord
    window_load: np.ndarray
    old: ExpertPlacement
    new: ExpertPlacement
    plan: Any  # TransferPlan
    executor: Any  # TransferExecutor
    queue: list[int]
    in_flight: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # layer -> (transfer, pre-hook)
    phase: Phase = Phase.TRANSFERRING

    @property
    def done(self) -> bool:
        return not self.queue and not self.in_flight


State = Recording | Gated | Planning | Transferring
