"""EPLBManager: the explicit state machine that runs record → gather → plan → move → commit.

Two calls per training step::

    loss.backward()
    manager.before_optimizer_step()   # replica gradients summed, so every copy takes the identical update
    optimizer.step()
    manager.step()                    # record this step's loads; maybe gather / plan / move / commit

In inference only ``manager.step()``, once per forward pass.

States (one transition function, every transition logged)::

    RECORDING ──due──▶ PLANNING ──plan arrived──▶ TRANSFERRING(layer k…) ──last layer──▶ RECORDING
        ▲               ↻ │ not ready yet: training goes on, asked again next step           │
        │                 │ dropped (eplb_worker_timeout passed, worker dead) / no change      │
        └─────────────────┴──────────────────────────────────────────── gate_eplb ──▶ GATED ◀─┘

A plan is awaited ``num_wait_worker_iterations`` steps after planning starts; that step waits at most
``eplb_max_plan_wait`` for it, later steps do not wait at all (a late plan never stalls training for
``eplb_worker_timeout``): the planning rank looks, one broadcast tells every rank, and all take the plan at
the same step, or all drop it.

The model side is a *handle* (``megatron_eplb.patches.megatron.apply`` returns one) satisfying
:class:`megatron_eplb.protocols.ExpertModel`; the optimizer side an
:class:`~megatron_eplb.protocols.OptimizerSlots`; slot moves go through a
:class:`~megatron_eplb.protocols.Transport`.  This module never imports Megatron or DeepSpeed.

A transfer never blocks a step: ``step()`` posts a layer's P2P sends/receives and returns; the layer
finishes, is checked and switches placement just before its next forward (the weights and optimizer
state it carries do not change in between), or is rolled back if that forward did not run before the
next optimizer step.  This module decides when; what each step does lives with its owner: the loads in
:mod:`~megatron_eplb.load_window`, the plan in :mod:`~megatron_eplb.worker`, the moves in
:class:`~megatron_eplb.layer_mover.LayerMover`, metrics in :mod:`~megatron_eplb.stats` and
:mod:`~megatron_eplb.monitor`, gradients in :mod:`~megatron_eplb.gradients`, checkpoints and the record map in
:mod:`~megatron_eplb.checkpoint`, the trace in :mod:`~megatron_eplb.trace_recorder`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint_manager import load_manager_checkpoint, record_map, save_manager_checkpoint, write_record_map
from .comm import any_rank
from .config import EPLBConfig
from .gradients import clip_grad_norm_
from .layer_mover import LayerMover
from .load_window import LoadWindow
from .monitor import log_realized
from .optimizer_state import OptimizerSlotState
from .phases import Gated, Phase, Planning, RebalanceRecord, Recording, State, Transferring
from .pipeline import gather_steps, max_over_world, round_summary, stage_of
from .placement import ExpertPlacement
from .protocols import ExpertModel, OptimizerSlots, Transport
from .stats import balance_summary, layers_to_replan, moved_slots, realized_steps, update_baseline
from .trace_recorder import TraceRecorder
from .transfer import plan_transfer
from .worker import (
    PLAN_ARRIVED,
    PLAN_DROPPED,
    PLAN_PENDING,
    PolicyWorker,
    look_for_plan,
    share_plan,
    submit_plan,
)

__all__ = [
    "EPLBManager",
    "Gated",
    "OptimizerSlotState",
    "Phase",
    "Planning",
    "RebalanceRecord",
    "Recording",
    "Transferring",
]

log = logging.getLogger("megatron_eplb")


class EPLBManager:
    """Runs the EPLB pipeline for one model handle. One instance per process; all ranks call it in step.

    The manager owns the placement: it decides every new one, and its :class:`~megatron_eplb.layer_mover.
    LayerMover` (:attr:`mover`) is the only caller of the handle's ``commit_layer`` (the handle routes with
    what it was last told).

    Args:
        handle: the model side (:class:`~megatron_eplb.protocols.ExpertModel`, from ``patches.megatron.apply``).
        config: the :class:`EPLBConfig` (default: all defaults).
        optimizer: a plain torch optimizer whose per-slot state moves with the weights.
        optimizer_state: the per-slot optimizer storage instead (:class:`~megatron_eplb.protocols.OptimizerSlots`;
            DeepSpeed's comes from ``patches.deepspeed``).
        load_group: every rank that routes tokens (EP x expert-DP); None: the world.
        policy_fn: a picklable placement policy for the worker (default ``policy.rebalance``).
        monitor: a :class:`~megatron_eplb.monitor.Monitor` (rank 0) for metrics and rebalance records.
        transport_factory: transfer group -> :class:`~megatron_eplb.protocols.Transport` for slot moves
            (default: torch P2P); fault tests pass ``transfer.testing.FailingTransport``.
    """

    def __init__(
        self,
        handle: ExpertModel,
        config: EPLBConfig | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        optimizer_state: OptimizerSlots | None = None,
        load_group: Any = None,
        policy_fn: Any = None,
        monitor: Any = None,
        transport_factory: Callable[[Any], Transport] | None = None,
    ) -> None:
        self.handle = handle
        self.config = config or EPLBConfig()
        #: With PP > 1 this stage's place among the model's MoE layers (:mod:`megatron_eplb.pipeline`): the
        #: manager of each stage runs its own layers over ``load_group`` (the stage's ranks), in lockstep
        #: with the other stages' managers (see :meth:`_end_round`); None with PP = 1.
        self.stage = stage_of(handle)
        total = self.stage.total_layers if self.stage is not None else handle.num_layers
        self.config.validate_for(total, handle.num_experts, handle.ep_size)
        self.optimizer = optimizer
        self.optimizer_state = optimizer_state or (
            OptimizerSlotState(optimizer) if optimizer is not None else None
        )
        if load_group is None and self.stage is not None:  # PP: the ranks of this stage
            load_group = self.stage.stage_group
        self.load_group = load_group  # all ranks that route tokens (EP x expert-DP); None = world
        self.monitor = monitor
        self.step_count = 0
        self.history: list[RebalanceRecord] = []
        # every eplb_log_interval steps: realized per-step balancedness vs Megatron's default placement
        self.realized: list[dict[str, float]] = []
        self._rank = dist.get_rank() if dist.is_initialized() else 0
        if self._rank == 0:
            for note in self.config.notes():
                log.warning("megatron-eplb: %s", note)
        # the first rank of the stage plans (and runs the worker) for its layers; with PP = 1, rank 0
        self._planner_rank = (
            dist.get_global_rank(load_group, 0) if self.stage is not None and load_group is not None else 0
        )
        self._round_sync_at: int | None = None  # PP: the step all stages agree on a rebalance's length
        self._round_end: int | None = None  # PP: the step every stage's rebalance has completed
        self._round_steps = 0  # PP: steps this stage's transfer takes (0: nothing to move)
        self._round_records: list[RebalanceRecord] = []
        self._last_window_load: np.ndarray | None = None  # PP: the window this stage's last rebalance used
        self.window = LoadWindow(handle, self.config.eplb_window_size, load_group)
        self._device = self.window.device
        self._last_update_load: np.ndarray | None = None  # [L, E] load at each layer's last update
        self._last_rebalance_step = 0
        self._last_rebalance_time = time.monotonic()
        self._placement_before_last: ExpertPlacement | None = None  # for the next window's comparison
        self.state: State = Recording()
        self._policy_fn = policy_fn
        # The planning rank starts its worker process now: a cold start (spawn, imports) inside the first
        # awaited plan stalled that step by seconds.
        self._worker: PolicyWorker | None = (
            PolicyWorker(policy_fn=policy_fn)
            if self.config.dynamic_eplb and self._rank == self._planner_rank
            else None
        )
        #: the move and commit steps (posts, finishes, checks, commits or rolls back each layer; owns the
        #: transfer group, made here: collective over the world)
        self.mover = LayerMover(
            handle,
            self.optimizer_state,
            self.config,
            vote_group=self.load_group,
            device=self._device,
            pipeline=self.stage is not None,
            transport_factory=transport_factory,
            step_count=lambda: self.step_count,
        )
        self._completed: list[RebalanceRecord] = []
        #: extra keys for the trace file's meta (e.g. the data's domains)
        self.trace_meta: dict[str, Any] = {}
        # eplb_trace_path: every step's counts of every source rank (rank 0 writes the file at close())
        self._trace = TraceRecorder.for_config(self.window, self.config, self.stage, self._rank)

    # ------------------------------------------------------------- the calls
    def before_optimizer_step(self) -> None:
        """Sum the gradients of every logical expert's copies (collective over the EP group).

        A layer still in flight here did not run its forward this step; its transfer is rolled back (its
        staged copy would be stale after the optimizer step)."""
        if isinstance(self.state, Transferring):
            self.mover.finish(self.state, commit=False)
        self.handle.sum_replica_grads()

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale every gradient so that the logical model's gradient norm (each logical expert once) is at
        most ``max_norm``; returns the norm before (:func:`megatron_eplb.gradients.clip_grad_norm_`).
        Collective over the EP group."""
        return clip_grad_norm_(self.handle, max_norm, self._device)

    @property
    def phase(self) -> Phase:
        """The current phase (the type of :attr:`state`)."""
        return self.state.phase

    def step(self) -> RebalanceRecord | None:
        """Advance one step (after the optimizer step; in inference after each forward).

        Returns the record of the last rebalance that completed since the previous call, else None.
        """
        if isinstance(self.state, Transferring):
            # inference: layers whose forward has not run since their transfer began finish here
            self.mover.finish(self.state)
        self.state = self._next(self.state, before_count=True)
        self.step_count += 1
        self.window.record()
        if self.step_count % self.config.eplb_log_interval == 0:
            self._log_realized_balance()
        if self._trace is not None:
            self._trace.maybe_gather(self.step_count)
        self._end_round()
        self.state = self._next(self.state)
        self._end_round()
        done, self._completed = self._completed, []
        return done[-1] if done else None

    # ---------------------------------------------------------- transitions
    def _next(self, state: State, before_count: bool = False) -> State:
        """The transition function: the state after this step's work in ``state``. Called from
        :meth:`step` only (forward hooks finish layers but never change the phase).

        ``before_count``: the first call of a step, before its loads are recorded: only a finished
        transfer completes there (its layers committed in this step's forwards).
        """
        if isinstance(state, Transferring) and state.done:
            outcome = "committed" if not state.record.layers_rolled_back else "failed_layers"
            return self._finish(state, outcome, f"{len(state.record.layers_committed)} layers committed")
        if before_count:
            return state
        if isinstance(state, Recording) and self._due():
            state = self._start_planning()
        if isinstance(state, Planning) and self.step_count >= state.due_step:
            state = self._await_plan(state)
        if isinstance(state, Transferring):
            self.mover.start(state)
        if self._round_sync_at == self.step_count:  # PP: every stage is here at this step
            self._round_sync_at = None
            self._round_end = self.step_count + max_over_world(self._round_steps, self._device)
        return state

    def _end_round(self) -> None:
        """PP > 1, at the step every stage's rebalance has completed (the same step on every rank): the record
        map of all stages' layers (gathered over the pipeline group; rank 0 writes), the whole model's record
        (global layer ids; what :meth:`step` returns and the monitor gets), and under ``gate_eplb`` every stage
        gated when any stage committed."""
        if self._round_end is None or self.step_count < self._round_end:
            return
        self._round_end = None
        if self._any_rank(self.mover.group_broken, world=True):  # a stage's transfer group broke: remake
            self.mover.renew_group()
        records, self._round_records = self._round_records, []
        mine = records[-1].as_dict() if records else None
        load = self._last_window_load if mine is not None else None
        placement, merged = round_summary(self.handle.placement, self.stage, load, mine)
        write_record_map(self.config.expert_map_record_path, placement)
        if merged["outcome"] == "none":
            return
        self._completed.append(RebalanceRecord(**merged))
        if self.monitor is not None:
            self.monitor.rebalance(self.step_count, merged, placement, placement.expert_load)
        if self.config.gate_eplb and merged["outcome"] == "committed":
            self.state = Gated()

    def _log_transition(self, old: Phase, new: Phase, why: str) -> None:
        if self._rank == 0:
            log.info("EPLB step %d: %s -> %s (%s)", self.step_count, old.value, new.value, why)

    def _due(self) -> bool:
        cfg = self.config
        if not cfg.dynamic_eplb or self._round_sync_at is not None or self._round_end is not None:
            return False
        by_steps = self.step_count - self._last_rebalance_step >= cfg.num_iterations_eplb_update
        by_time = False
        if cfg.eplb_update_interval is not None:
            # Agree across ranks: one scalar all-reduce per step, only when a time interval is configured.
            # (with PP over every stage: they plan in lockstep)
            by_time = self._any_rank(
                time.monotonic() - self._last_rebalance_time >= cfg.eplb_update_interval,
                world=self.stage is not None,
            )
        return by_steps or by_time

    # ------------------------------------------------------------- record
    def gather_window(self) -> tuple[np.ndarray, np.ndarray]:
        """Loads of the window summed over every rank that routes tokens (collective over ``load_group``).

        Returns (logical ``[L, E]``, measured per physical slot ``[L, P]``), both int64 numpy.
        """
        return self.window.gather()

    def _log_realized_balance(self) -> None:
        """Every ``eplb_log_interval`` steps: the realized balancedness of those steps beside Megatron's default
        placement (:func:`~megatron_eplb.stats.realized_steps`; with PP of every stage's layers). Collective;
        every rank appends it to :attr:`realized`, rank 0 logs it and writes it to the monitor."""
        logical, per_slot = self.window.gather_steps(self.config.eplb_log_interval)
        placement, logical, per_slot = gather_steps(self.stage, self.handle.placement, logical, per_slot)
        entry = realized_steps(placement, logical, per_slot, self.step_count)
        if entry is not None:
            self.realized.append(entry)
            if self._rank == 0:
                log_realized(entry, self.monitor)

    # --------------------------------------------------------------- plan
    def _start_planning(self) -> State:
        """RECORDING -> PLANNING: gather the window, submit it to the worker (planning rank)."""
        cfg = self.config
        t0 = time.monotonic()
        if self.stage is not None:  # every stage starts at this step and agrees on the length at the await
            self._round_sync_at = self.step_count + cfg.num_wait_worker_iterations
            self._round_steps = 0
        load, per_slot = self.gather_window()
        placement = self.handle.placement
        layers = layers_to_replan(load, self._last_update_load, cfg.eplb_update_threshold)
        record = RebalanceRecord(started_step=self.step_count, layers_planned=layers)
        record.measure_before(placement, load, per_slot)
        if self.history:  # the last rebalance's placement, measured on this window
            self.history[-1].measure_next_window(record, self._placement_before_last, load)
        step_loads = None
        if cfg.eplb_time_resolved and layers:  # the window's steps one by one (collective)
            step_loads, _ = self.window.gather_steps(self.window.filled)
        record.seconds["gather"] = time.monotonic() - t0
        self._last_rebalance_step = self.step_count
        self._last_rebalance_time = time.monotonic()
        state = Planning(record, load, time.monotonic(), self.step_count + cfg.num_wait_worker_iterations)
        if not layers:
            return self._finish(state, "no_change", "every layer's load is similar to its last update")
        if self._rank == self._planner_rank:
            if self._worker is None:
                self._worker = PolicyWorker(policy_fn=self._policy_fn)
            submit_plan(self._worker, placement, load, layers, cfg, step_loads)
        state.submitted_at = time.monotonic()
        self._log_transition(
            Phase.RECORDING,
            Phase.PLANNING,
            f"window of {self.window.filled} steps, {len(layers)} layers to plan",
        )
        return state

    def _await_plan(self, state: Planning) -> State:
        """PLANNING at or past its due step: the plan is there -> TRANSFERRING (or RECORDING when nothing
        moves); not yet -> PLANNING (training goes on, the next step looks again); dropped (late past
        ``eplb_worker_timeout``, the worker died or the policy failed) -> RECORDING.  The planning rank
        decides and one broadcast tells every rank, so all take the same branch at the same step and a plan
        is applied whole or not at all.  Only the due step itself may wait, at most ``eplb_max_plan_wait``."""
        t0 = time.monotonic()
        record = state.record
        status, new_sub = PLAN_PENDING, None
        if self._rank == self._planner_rank and state.arrived is not None:  # PP: kept from an earlier look
            status, new_sub = PLAN_ARRIVED, state.arrived
        elif self._rank == self._planner_rank:
            status, new_sub = look_for_plan(
                self._worker,
                submitted_at=state.submitted_at,
                late=state.late,
                config=self.config,
                step=self.step_count,
                monitor=self.monitor,
            )
        pipeline = self.stage is not None
        group = self.load_group if pipeline else None
        status, new_sub = share_plan(status, new_sub, self._planner_rank, group, every_stage=pipeline)
        record.add_seconds("plan_wait", t0)
        if status == PLAN_PENDING:
            state.arrived = new_sub  # PP: this stage's plan came, another stage's did not: keep it
            if not state.late and self._rank == 0:
                log.warning(
                    "EPLB step %d: the plan is not ready at its due step; training goes on with the current "
                    "placement, and the plan is taken at the first step it is ready (or dropped %.1fs after "
                    "its submission, eplb_worker_timeout)",
                    self.step_count,
                    self.config.eplb_worker_timeout,
                )
            state.late = True
            if self.stage is not None:  # PP: every stage looks again at the next step, and agrees there
                self._round_sync_at = self.step_count + 1
            return state
        if status == PLAN_DROPPED:
            if self._rank == 0:
                log.warning(
                    "EPLB step %d: no plan within eplb_worker_timeout=%.1fs (late, or the worker died or "
                    "failed); keeping the current placement for this round",
                    self.step_count,
                    self.config.eplb_worker_timeout,
                )
            return self._finish(state, "late_plan", "plan late or worker dead")
        old = self.handle.placement
        layers = record.layers_planned
        new = old.with_layers(layers, new_sub)
        record.balancedness_after = balance_summary(new, state.window_load)["mean"]
        self._placement_before_last = old
        self._last_update_load = update_baseline(self._last_update_load, state.window_load, layers)
        plan = plan_transfer(old, new)
        if not plan.layers_changed:
            return self._finish(state, "no_change", "the policy kept every slot")
        executor = self.mover.executor(plan)
        record.moved_slots = int(moved_slots(old, new).sum())
        queue = list(plan.layers_changed)
        self._round_steps = -(-len(queue) // self.config.eplb_layers_per_step)
        self._log_transition(
            Phase.PLANNING, Phase.TRANSFERRING, f"{len(queue)} layers, {record.moved_slots} slots to move"
        )
        return Transferring(record, state.window_load, old, new, plan, executor, queue)

    def _any_rank(self, flag: bool, world: bool = False) -> bool:
        return any_rank(flag, None if world else self.load_group, self._device)

    def _finish(self, state: Planning | Transferring, outcome: str, why: str) -> State:
        """End a rebalance: keep its record, write the map (``expert_map_record_path``), report it; return
        the next state (GATED after a committed one under ``gate_eplb``, else RECORDING)."""
        record = state.record
        record.outcome = outcome
        record.completed_step = self.step_count
        self.history.append(record)
        if self.stage is not None:  # PP: the map, the record, the monitor and the gate wait for every stage
            self._round_records.append(record)  # (_end_round)
            self._last_window_load = state.window_load
            nxt = Recording()
            self._log_transition(state.phase, nxt.phase, why)
            return nxt
        self._completed.append(record)
        if outcome in ("committed", "failed_layers", "no_change"):  # the map a run ends with, with its load
            write_record_map(
                self.config.expert_map_record_path, self.handle.placement.with_load(state.window_load)
            )
        if self.monitor is not None:
            self.monitor.rebalance(self.step_count, record, self.handle.placement, state.window_load)
        nxt = Gated() if self.config.gate_eplb and outcome == "committed" else Recording()
        self._log_transition(state.phase, nxt.phase, why)
        return nxt

    # --------------------------------------------------------- checkpoints
    def save_checkpoint(
        self, directory: str | os.PathLike, extra: dict[str, Any] | None = None, *, overwrite: bool = False
    ) -> Path:
        """Save the logical training checkpoint (every logical expert once, the optimizer state, the steps,
        ``extra``; the map beside it) to ``directory``, all or nothing; replace one there only with
        ``overwrite``.  :func:`megatron_eplb.checkpoint_manager.save_manager_checkpoint`.  Collective; rank 0 writes."""
        return save_manager_checkpoint(self, directory, extra, overwrite=overwrite)

    def load_checkpoint(self, directory: str | os.PathLike, strict: bool = True) -> dict[str, Any]:
        """Load :meth:`save_checkpoint`'s directory whatever the current placement or EP size, and continue
        counting from the saved step (:func:`megatron_eplb.checkpoint_manager.load_manager_checkpoint`).  Collective.
        Returns the payload's metadata and ``placement``."""
        return load_manager_checkpoint(self, directory, strict)

    def record_map(self) -> Path | None:
        """Write the placement now, with the window's ``[L, E]`` load, to ``expert_map_record_path``
        (:func:`megatron_eplb.checkpoint_manager.record_map`).  Collective; rank 0 writes.  Returns the path, None
        without a record path."""
        return record_map(self)

    def resume_at(self, step: int) -> None:
        """Continue counting from ``step`` (a resumed run); the next rebalance is a full interval away."""
        self.step_count = self._last_rebalance_step = int(step)
        if self._trace is not None:
            self._trace.upto = self.step_count
        self._last_rebalance_time = time.monotonic()

    def close(self) -> None:
        """Stop the worker; with ``eplb_trace_path``, gather the last steps and write the trace (then
        collective: every rank calls it)."""
        if self._trace is not None:
            self.write_trace()
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    # -------------------------------------------------------------- trace
    def write_trace(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write every step recorded so far to ``path`` (default ``eplb_trace_path``) as a
        :mod:`megatron_eplb.trace` file.  Collective (the last steps are gathered first); rank 0 writes and
        returns the path, other ranks return None."""
        if self._trace is None:
            raise RuntimeError("write_trace() needs eplb_trace_path set in the config")
        return self._trace.write(self.step_count, path, self.trace_meta)
