"""Recording a load trace while running (``eplb_trace_path``): :class:`TraceRecorder`, owned by the manager.

Every step's counts of every source rank, per MoE layer and logical expert, are gathered from the manager's
:class:`~megatron_eplb.load_window.LoadWindow` every few steps (before its ring overwrites them); rank 0 keeps
them and writes one :mod:`megatron_eplb.trace` file.  With pipeline stages the layers of every stage are
gathered too, under the whole model's layer ids and names.  No Megatron, no DeepSpeed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .pipeline import PipelineStage, gather_layers, gather_over_stages
from .trace import LoadTrace, write_trace

__all__ = ["TraceRecorder"]

log = logging.getLogger("megatron_eplb")


class TraceRecorder:
    """Keeps every step's ``[R, L, E]`` counts (``R`` source ranks) for a trace file.

    Args:
        window: the manager's load window (``gather_steps_per_rank(k) -> [k, R, L_s, E]``, collective; its
            ``handle`` gives the model's facts).
        every: steps between two gathers (at most the window's length).
        stage: the pipeline stage (:mod:`megatron_eplb.pipeline`), None with PP = 1.
        rank: this process's global rank (rank 0 keeps the counts and writes).
        path: the file :meth:`write` writes by default (``eplb_trace_path``).
    """

    def __init__(
        self,
        window: Any,
        every: int,
        stage: PipelineStage | None = None,
        rank: int = 0,
        *,
        path: str | os.PathLike | None = None,
    ) -> None:
        self.window, self.every, self.stage, self.rank = window, int(every), stage, rank
        self.path = path
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []  # rank 0: (counts [k, R, L, E], steps [k])
        self.upto = 0  # every step up to this one is kept

    @classmethod
    def for_config(
        cls, window: Any, config: Any, stage: PipelineStage | None = None, rank: int = 0
    ) -> TraceRecorder | None:
        """The recorder of ``config.eplb_trace_path`` (None without one): a gather every
        ``min(eplb_log_interval, eplb_window_size)`` steps, before the window's ring overwrites them."""
        if not config.eplb_trace_path:
            return None
        every = min(config.eplb_log_interval, config.eplb_window_size)
        return cls(window, every, stage, rank, path=config.eplb_trace_path)

    def maybe_gather(self, step: int) -> None:
        """At ``step`` (after it was recorded): gather when ``every`` steps are pending (collective then)."""
        if step - self.upto >= self.every:
            self.gather(step)

    def gather(self, step: int) -> None:
        """Keep the steps since the last gather, per source rank and (PP) of every stage's layers.
        Collective over the window's load group (and the pipeline group)."""
        counts = self.window.gather_steps_per_rank(step - self.upto)  # [k, R, L_s, E]
        (counts,) = gather_layers(self.stage, counts, axis=2)  # PP: every stage's layers
        if self.rank == 0:
            self.parts.append((counts, np.arange(step - counts.shape[0] + 1, step + 1)))
        self.upto = step

    def write(
        self, step: int, path: str | os.PathLike | None = None, extra: dict | None = None
    ) -> Path | None:
        """Gather what is pending at ``step`` and write every kept step to ``path`` (default :attr:`path`) with
        the model's facts (the window's handle: EP size, layers, experts, layer names, replica dispatch) and
        ``extra`` in the meta.  Collective; rank 0 writes and returns the path, other ranks return None."""
        if step > self.upto:
            self.gather(step)
        handle = self.window.handle
        names = list(getattr(handle, "layer_names", []))
        if self.stage is not None:  # PP: every stage's layers, under the whole model's names (collective)
            names = list(handle.state_to_global(dict.fromkeys(names)))
            names = [n for part in gather_over_stages(names, self.stage) for n in part]
        if self.rank != 0 or not self.parts:
            return None
        meta = {
            "ep_size": handle.ep_size,
            "num_layers": len(names) if self.stage is not None else handle.num_layers,
            "num_experts": handle.num_experts,
            "layer_names": names,
            "replica_dispatch": getattr(handle, "replica_dispatch", None),
            **dict(extra or {}),
        }
        counts = np.concatenate([c for c, _ in self.parts])
        steps = np.concatenate([s for _, s in self.parts])
        path = write_trace(path or self.path, LoadTrace(counts, steps, meta))
        log.info(
            "EPLB: wrote the load trace of %d steps (%s sources) to %s", len(steps), counts.shape[1], path
        )
        return path
