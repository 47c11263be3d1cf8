"""Load traces: per-step, per-MoE-layer, per-expert token counts of every source rank, kept in a compact
``.npz`` file (``eplb_trace_path``), and read back for ``megatron-eplb replay``.

Routing does not depend on the placement, so a trace recorded under any placement (or none) replays every
placement, split and EP size exactly.  Shapes: ``T`` steps, ``R`` source ranks (every rank that routes
tokens: EP x expert-DP), ``L`` MoE layers, ``E`` logical experts.

The file (``numpy.savez_compressed``)::

    counts  int32 [T, R, L, E]   pairs routed on source rank r to expert e of layer l at step t
    steps   int64 [T]            the manager's step number of each row
    meta    str (JSON)           {"format": "megatron-eplb-trace", "version": 1, "ep_size": .., ...}

A JSON load file (``{"logical_count": [[...]]}``, e.g. a heat map) reads as a one-step, one-source trace;
several files given together are consecutive steps.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .stats import read_load_file

__all__ = ["TRACE_FORMAT", "LoadTrace", "read_trace", "read_traces", "write_trace"]

TRACE_FORMAT = "megatron-eplb-trace"
TRACE_VERSION = 1


@dataclass
class LoadTrace:
    """Token counts per step.

    Attributes:
        counts: int ``[T, R, L, E]`` per source rank.
        steps: int64 ``[T]`` step numbers.
        meta: what recorded it (``ep_size``, ``layer_names``, free-form keys).
    """

    counts: np.ndarray
    steps: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = np.asarray(self.counts)
        if self.counts.ndim != 4:
            raise ValueError(
                f"trace counts must be [steps, sources, layers, experts], got {self.counts.shape}"
            )
        if (self.counts < 0).any():
            raise ValueError("trace counts must be >= 0")
        self.steps = np.asarray(self.steps, dtype=np.int64).reshape(-1)
        if self.steps.shape[0] != self.counts.shape[0]:
            raise ValueError(f"{self.steps.shape[0]} step numbers for {self.counts.shape[0]} steps")

    @property
    def num_steps(self) -> int:
        return self.counts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.counts.shape[2]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[3]

    def loads(self) -> np.ndarray:
        """int64 ``[T, L, E]``: the counts summed over the source ranks (what every EP size sees)."""
        return self.counts.sum(axis=1, dtype=np.int64)


def write_trace(path: str | os.PathLike, trace: LoadTrace) -> Path:
    """Write ``trace`` as a compressed ``.npz`` (int32 counts where they fit); returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = trace.counts
    if counts.size == 0 or counts.max() < 2**31:
        counts = counts.astype(np.int32)
    meta = {"format": TRACE_FORMAT, "version": TRACE_VERSION, **trace.meta}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, counts=counts, steps=trace.steps, meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)
    return path


def read_trace(path: str | os.PathLike) -> LoadTrace:
    """A trace ``.npz`` (:func:`write_trace`), or a JSON load file as a one-step trace."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace {str(path)!r} does not exist")
    if path.suffix == ".json":
        load = read_load_file(path)
        return LoadTrace(load[None, None], np.zeros(1), {"source": str(path)})
    try:
        with np.load(path, allow_pickle=False) as data:
            counts, steps = data["counts"], data["steps"]
            meta = json.loads(str(data["meta"])) if "meta" in data else {}
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(
            f"{path}: not a megatron-eplb trace (.npz with counts, steps, meta): {exc}"
        ) from None
    if meta.get("format", TRACE_FORMAT) != TRACE_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {TRACE_FORMAT!r}")
    return LoadTrace(counts, steps, meta)


def read_traces(paths: list[str | os.PathLike]) -> LoadTrace:
    """Several traces (or load files) as consecutive steps; they need the same layers and experts.  Source
    ranks may differ between files: each file's counts are summed over its sources then."""
    traces = [read_trace(p) for p in paths]
    if len(traces) == 1:
        return traces[0]
    shape = traces[0].counts.shape[2:]
    for p, t in zip(paths, traces):
        if t.counts.shape[2:] != shape:
            raise ValueError(f"{p}: {list(t.counts.shape[2:])} layers x experts, the first has {list(shape)}")
    same_sources = len({t.counts.shape[1] for t in traces}) == 1
    counts = [t.counts if same_sources else t.counts.sum(axis=1, keepdims=True) for t in traces]
    steps = np.arange(sum(t.num_steps for t in traces))
    return LoadTrace(np.concatenate(counts), steps, {"sources": [str(p) for p in paths]})
