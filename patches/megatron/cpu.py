"""Seam: CPU/gloo support for Megatron-core MoE (:func:`enable_cpu` and its shims).

Owns every monkey-patch that lets Megatron-core MoE layers run forward and backward on CPU: the CUDA calls
Megatron makes unconditionally, the model-parallel RNG tracker, and the dispatchers' CUDA-only paths.
Nothing here runs where CUDA is available.

A new dispatcher that needs CUDA on its path (a side stream, a device-to-host copy): add its shim here
as one ``_fix_*`` function and list it in :func:`enable_cpu`.  A new expert class usually needs nothing.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import torch

from .compat import ensure_compat

__all__ = ["enable_cpu"]

logger = logging.getLogger(__name__)

_CPU_LOCK = threading.Lock()
_CPU_FIXES: list[str] = []


def enable_cpu() -> list[str]:
    """Let Megatron-core MoE layers run forward and backward on CPU with gloo.

    A no-op where CUDA is available.  Idempotent: a second call changes nothing and returns the same list.
    The fixes (each logged once):

    * ``torch.cuda.current_device`` returns ``"cpu"`` (Megatron allocates on it; ``Router.gating`` then
      leaves the router weight on CPU instead of moving it to CUDA);
    * ``torch.cuda.synchronize`` does nothing (Megatron's dist-checkpoint writer calls it before saving);
    * :func:`ensure_compat` (on any device);
    * the model-parallel RNG tracker (``model_parallel_cuda_manual_seed``, ``get_cuda_rng_tracker().fork``)
      keeps CPU generator states;
    * the alltoall dispatcher gets no CUDA side stream and passes its split sizes as Python lists;
    * the pipeline schedules (``get_forward_backward_func``) allocate their token counter on CPU (they name
      ``device="cuda"``);
    * with PP > 1 and tied word embeddings, the last stage's copy of the word embedding is synchronised with
      the first stage's on CPU (Megatron moves it with ``.cuda()`` for that all-reduce).

    Returns:
        the names of the fixes in effect.
    """
    ensure_compat()
    with _CPU_LOCK:
        if torch.cuda.is_available():
            logger.info("enable_cpu: CUDA is available, nothing to do")
            return []
        if _CPU_FIXES:
            return list(_CPU_FIXES)
        fixes = [
            _fix_current_device(),
            _fix_synchronize(),
            _fix_rng_tracker(),
            _fix_alltoall(),
            _fix_schedules(),
            _fix_tied_embeddings(),
        ]
        _CPU_FIXES.extend(f for f in fixes if f)
        for fix in _CPU_FIXES:
            logger.info("enable_cpu: %s", fix)
        return list(_CPU_FIXES)


class _TorchOnCPU:
    """``torch`` as Megatron's pipeline schedules see it on CPU: ``zeros(..., device="cuda")`` on CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        if device is not None and str(device).startswith("cuda"):
            device = "cpu"
        return torch.zeros(*args, device=device, **kwargs)


def _fix_schedules() -> str:
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchOnCPU()
    return "pipeline schedules allocate their token counter on CPU"


def _fix_tied_embeddings() -> str:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = getattr(LanguageModule, "setup_embeddings_and_output_layer", None)
    if original is None or getattr(original, "_eplb_cpu", False):
        return ""

    def setup(self, *args: Any, **kwargs: Any) -> Any:
        real = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t  # the first/last-stage all-reduce of the tied weight, on CPU
        try:
            return original(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = real

    setup._eplb_cpu = True
    LanguageModule.setup_embeddings_and_output_layer = setup
    return "tied word embeddings are synchronised over pipeline stages on CPU"


def _fix_current_device() -> str:
    torch.cuda.current_device = lambda: "cpu"
    return "torch.cuda.current_device() -> 'cpu'"


def _fix_synchronize() -> str:
    torch.cuda.synchronize = lambda device=None: None
    return "torch.cuda.synchronize() is a no-op (dist-checkpoint writers call it)"


def _fix_rng_tracker() -> str:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    tracker = mrandom.CudaRNGStatesTracker
    original_add = tracker.add

    def add(self, name: str, seed: int) -> None:
        # The original seeds and reads the CUDA generator; on CPU it reads/seeds the CPU one instead
        # (and restores it through the patched ``_set_cuda_rng_state``).
        real_get, real_seed = torch.cuda.get_rng_state, torch.cuda.manual_seed
        torch.cuda.get_rng_state, torch.cuda.manual_seed = torch.get_rng_state, torch.manual_seed
        try:
            original_add(self, name, seed)
        finally:
            torch.cuda.get_rng_state, torch.cuda.manual_seed = real_get, real_seed

    tracker.add = add
    return "Megatron's CUDA RNG tracker keeps CPU generator states"


def _fix_alltoall() -> str:
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    if MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None:
        MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NoStream()

    def dtoh_on_cpu(self, point: str, tokens_per_expert: torch.Tensor | None = None):
        # No device-to-host copy exists on CPU; gloo's all_to_all_single wants split sizes as lists.
        if point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, name, None)
                if torch.is_tensor(value) or isinstance(value, np.ndarray):
                    setattr(self, name, [int(v) for v in value.tolist()])
        return tokens_per_expert

    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = dtoh_on_cpu
    return "MoEAlltoAllTokenDispatcher: no CUDA side stream, split sizes as lists"


class _NoStream:
    """Stands in for the alltoall dispatcher's CUDA side stream on CPU."""
