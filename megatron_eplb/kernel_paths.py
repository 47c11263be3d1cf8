"""How a small integer computation in every MoE layer's forward runs on a device: one owner of the path choice
shared by the balanced split (:class:`~megatron_eplb.replica_split.BalancedSplit`) and the per-step replicas
plan (:class:`~megatron_eplb.fast_replicas.FastPlanner`).

Eagerly such a computation is hundreds of small kernels (host time in the middle of the forward), so on CUDA
it runs, by :attr:`KernelPaths.path`:

- ``"triton_graph"`` (triton imports and the layer fits the fused kernel's one block; ``"triton"`` without
  :attr:`KernelPaths.FUSED_IN_GRAPH`): the fused Triton kernel replayed as a one-kernel CUDA graph (or launched
  directly).  If it fails to compile or launch (logged once), this instance and every later one of its class
  take the graph path.  Inside a caller's own CUDA-graph capture it is launched as well (captured with the
  caller's graph) once it has run outside.
- ``"graph"``: the torch functions captured as one CUDA graph at the first call.
- ``"torch"``: on CPU, inside a caller's capture before a first graph or launch, or if capturing fails (logged
  once): the torch functions eagerly.

Which path runs is logged once per process.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["KernelPaths"]


class KernelPaths:
    """Base of a computation with a fused-kernel, a CUDA-graph and an eager path (the module docstring).

    A subclass sets :attr:`LABEL` and implements :meth:`_kernel` (the fused kernel's module, or the reason it
    cannot be used), :meth:`_launch` (the fused kernel, a fresh output), :meth:`_torch` (the torch functions),
    :meth:`_compute` (what a graph captures), :meth:`_replayed` (a fresh copy of the graph's output), and
    may override :meth:`_before_capture`.  It calls :meth:`_choose_path` from ``__init__``."""

    LABEL = ""
    """The log lines' subject, e.g. ``"balanced dispatch split"``."""

    RESULT = ""
    """What the torch functions compute, for the log lines, e.g. ``"split"``."""

    FUSED_IN_GRAPH = True
    """Replay the fused kernel inside a captured CUDA graph (input copy, replay, output copy) instead of one
    direct launch: a triton launch costs more host time than a replay (50-60 us against 30-50 us per call on an
    H200 host; ``benchmarks/replica_split_bench.py`` and ``benchmarks/fast_replicas_gpu.py`` time both), and
    the forwards it runs in are host-bound.  The balanced split overrides it: its launch measured no dearer than
    a replay, and the replay's copies are kernels on the forward's critical path."""

    _fused_failed = False  # a kernel of this class failed in this process: the graph path from then on
    _logged: set[str] = set()

    path: str
    _fused: Any

    def _choose_path(self, device: torch.device, why_not: str | None = None) -> None:
        """Set :attr:`path` for a computation on ``device``; ``why_not``: a reason not to use the kernel."""
        self._graph = None
        self._input: torch.Tensor | None = None
        self._output: Any = None
        self._launched = False
        self._fused = None
        if device.type != "cuda":
            self.path = "torch"
            return
        why = "a fused kernel failed earlier" if type(self)._fused_failed else why_not
        if why is None:
            try:
                kernel, why = self._kernel()
            except Exception as exc:  # noqa: BLE001 - no kernel: the graph path computes the same result
                kernel, why = None, f"its module failed to import: {exc}"
            self._fused = kernel if why is None else None
        if self._fused is None:
            self.path = "graph"
            self._log(f"CUDA graph of the torch {self.RESULT} ({why})")
        else:
            self.path = "triton_graph" if self.FUSED_IN_GRAPH else "triton"
            how = "replayed in a CUDA graph" if self.FUSED_IN_GRAPH else "one launch per call"
            self._log(f"fused Triton kernel ({how})")

    @classmethod
    def _log(cls, what: str, warn: bool = False) -> None:
        line = f"megatron-eplb: {cls.LABEL}: {what}"
        if line in KernelPaths._logged:
            return
        KernelPaths._logged.add(line)
        log = logging.getLogger("megatron_eplb")
        (log.warning if warn else log.info)("%s", line)

    def _kernel(self) -> tuple[Any, str | None]:
        """``(the fused kernel's module, None)``, or ``(None, why it is not used)``."""
        raise NotImplementedError

    def _launch(self, load: torch.Tensor) -> Any:
        raise NotImplementedError

    def _torch(self, load: torch.Tensor) -> Any:
        raise NotImplementedError

    def _compute(self, load: torch.Tensor) -> Any:
        """What a graph captures: the fused kernel on the ``triton_graph`` path, else the torch functions."""
        raise NotImplementedError

    def _replayed(self) -> Any:
        """A fresh copy of the graph's output after a replay."""
        raise NotImplementedError

    def _before_capture(self, load: torch.Tensor) -> None:
        """Buffers the capture writes into (allocated outside the graph)."""

    def __call__(self, load: torch.Tensor) -> Any:
        load = load.to(torch.int64)
        capturing = self.path != "torch" and torch.cuda.is_current_stream_capturing()
        if self.path == "triton" and (self._launched or not capturing):
            try:
                out = self._launch(load)
            except Exception as exc:  # noqa: BLE001 - the graph path computes the same result
                if capturing:
                    raise
                self._give_up_fused(exc)
            else:
                self._launched = True
                return out
        if self.path == "torch" or capturing:
            return self._torch(load)
        if self._graph is None and not self._capture(load):
            return self(load)
        self._input.copy_(load)
        self._graph.replay()
        return self._replayed()

    def _give_up_fused(self, exc: Exception) -> None:
        type(self)._fused_failed = True
        self.path, self._fused, self._graph = "graph", None, None
        self._log(
            f"the fused Triton kernel failed ({exc!r}); CUDA graph of the torch {self.RESULT} instead",
            warn=True,
        )

    def _capture(self, load: torch.Tensor) -> bool:
        try:
            self._input = load.clone()
            self._before_capture(load)
            side = torch.cuda.Stream(device=load.device)
            side.wait_stream(torch.cuda.current_stream(load.device))
            with torch.cuda.stream(side), torch.no_grad():
                self._compute(self._input)  # warm-up outside the capture (allocator, lazy inits, compiling)
            torch.cuda.current_stream(load.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"), torch.no_grad():
                self._output = self._compute(self._input)
            self._graph = graph
            return True
        except Exception as exc:  # noqa: BLE001 - the eager path computes the same result
            if self.path == "triton_graph":
                self._give_up_fused(exc)
                return False
            self.path = "torch"
            self._log(f"eager torch (capturing its CUDA graph failed: {exc})", warn=True)
            return False
