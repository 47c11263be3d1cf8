"""Seam: a drop-in for the ``grouped_gemm`` package's ``ops.gmm``, so Megatron's legacy ``GroupedMLP`` runs without it.

Megatron-core's ``GroupedMLP`` (<= 0.16) calls ``grouped_gemm.ops.gmm(a, b, batch_sizes, trans_b=False)``
through ``megatron.core.transformer.moe.grouped_gemm_util``, and refuses to build when that package is not
importable (it is a CUDA source build; it does not install on every machine, nor on CPU).  :func:`gmm` here
computes the same product with ``torch._grouped_mm`` (torch >= 2.8, CPU and CUDA), or, where that op is
missing, does not work for the device and dtype, or does not accept the strides (its 16-byte alignment), with a
loop of one matmul per group.  Differentiable in ``a`` and ``b`` either way.

:func:`install` is explicit: call it before building a model with ``moe_grouped_gemm=True``
(``examples/train.py --moe-grouped-gemm`` does).  It points Megatron's ``grouped_gemm_util`` at this module
only where the real package is not importable — the real package always wins — and never puts a module named
``grouped_gemm`` into ``sys.modules`` (other code checking for the package is not misled).  ``apply`` does
not call it: ``GroupedMLP`` checks for the package when the model is built, before ``apply``.
"""

from __future__ import annotations

import logging
import sys
import threading
import types

import torch

__all__ = ["backend", "gmm", "install", "ops"]

logger = logging.getLogger(__name__)

_ALIGN_BYTES = 16
_WORKS: dict[tuple[str, torch.dtype], bool] = {}  # (device type, dtype) -> torch._grouped_mm works there
_LOCK = threading.Lock()
_FALLBACK_LOGGED: set[str] = set()


def gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """Grouped matmul: rows ``a[offs[g-1]:offs[g]]`` times ``b[g]`` for every group ``g``.

    Args:
        a: ``[M, K]``, ``M = sum(batch_sizes)`` rows sorted by group.
        b: ``[G, K, N]`` (``[G, N, K]`` with ``trans_b``).
        batch_sizes: int ``[G]`` rows per group (host or device; zeros allowed).
        trans_b: multiply by ``b[g].T``.
    Returns:
        ``[M, N]`` in ``a``'s dtype.  The ``grouped_gemm`` package's ``ops.gmm`` contract.
    """
    if trans_b:
        b = b.transpose(-2, -1)
    if backend(a, b) == "torch._grouped_mm":
        offs = torch.cumsum(torch.as_tensor(batch_sizes), 0).to(device=a.device, dtype=torch.int32)
        try:
            return _ContiguousGrad.apply(torch._grouped_mm(a, b, offs=offs))
        except RuntimeError as exc:  # a layout the checks above missed: the loop is always right
            _log_fallback(f"torch._grouped_mm refused {list(a.shape)} x {list(b.shape)}: {exc}")
    return _gmm_loop(a, b, batch_sizes)


def backend(a: torch.Tensor, b: torch.Tensor) -> str:
    """``"torch._grouped_mm"`` where it works for ``a``'s device and dtype and accepts the strides of ``a``
    and ``b`` (``[G, K, N]``), else ``"loop"`` (one matmul per group)."""
    if not hasattr(torch, "_grouped_mm") or a.dtype != b.dtype or not _works(a.device, a.dtype):
        return "loop"
    if not (_aligned(a) and _aligned(b)):
        _log_fallback(
            f"strides of {list(a.shape)} x {list(b.shape)} ({a.dtype}) are not multiples of {_ALIGN_BYTES} bytes"
        )
        return "loop"
    return "torch._grouped_mm"


def _aligned(t: torch.Tensor) -> bool:
    """``torch._grouped_mm``'s layout rule: a 16-byte aligned start, one of the last two dims with stride 1
    and the other's stride a multiple of 16 bytes."""
    if t.data_ptr() % _ALIGN_BYTES:
        return False
    per = _ALIGN_BYTES // t.element_size()
    rows, cols = t.stride(-2), t.stride(-1)
    if cols == 1 and rows >= max(1, t.shape[-1]):
        return rows % per == 0
    if rows == 1 and cols >= max(1, t.shape[-2]):
        return cols % per == 0
    return False


def _works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` gives the per-group product, forward and backward, on ``device`` in
    ``dtype`` (checked once on tiny tensors, an empty group among them; cached)."""
    key = (device.type, dtype)
    if key not in _WORKS:
        with _LOCK:
            if key not in _WORKS:
                with torch.inference_mode(False), torch.enable_grad():  # the first call may be in inference
                    _WORKS[key] = _probe(device, dtype)
                if not _WORKS[key]:
                    _log_fallback(f"torch._grouped_mm does not work on {device.type} in {dtype}")
    return _WORKS[key]


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 16, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    b = torch.randn(3, 16, 16, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    sizes = torch.tensor([2, 0, 4])
    try:
        offs = sizes.cumsum(0).to(device=device, dtype=torch.int32)
        out = _ContiguousGrad.apply(torch._grouped_mm(a, b, offs=offs))
        out.sum().backward()
        want = _gmm_loop(a.detach().float(), b.detach().float(), sizes)
        want_grad = b.detach().float().sum(-1)[[0, 0, 2, 2, 2, 2]]  # d sum(out) / d a
        tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4  # relative to the largest entry
        return bool(
            (out.detach().float() - want).abs().max() <= tol * want.abs().max()
            and (a.grad.float() - want_grad).abs().max() <= tol * want_grad.abs().max()
            and torch.count_nonzero(b.grad[1]) == 0  # the empty group
        )
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _gmm_loop(a: torch.Tensor, b: torch.Tensor, batch_sizes) -> torch.Tensor:
    """The same product as one matmul per group (host-side group sizes: a device sync for device sizes)."""
    sizes = [int(s) for s in torch.as_tensor(batch_sizes).tolist()]
    parts = [x @ b[g] for g, x in enumerate(a.split(sizes))]
    return torch.cat(parts) if parts else a.new_zeros(0, b.shape[-1])


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (``torch._grouped_mm``'s backward refuses the
    expanded gradient of e.g. ``out.sum()``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _log_fallback(why: str) -> None:
    if why not in _FALLBACK_LOGGED:
        _FALLBACK_LOGGED.add(why)
        logger.warning("megatron-eplb grouped gemm: %s; using one matmul per group", why)


ops = types.SimpleNamespace(gmm=gmm)
"""What Megatron reads as ``grouped_gemm.ops`` after :func:`install`."""


def install() -> str:
    """Let Megatron-core's legacy ``GroupedMLP`` build and run without the ``grouped_gemm`` package.

    Idempotent.  Call before building the model.  Where the real package is importable nothing changes
    (it wins); else Megatron's ``grouped_gemm_util`` is pointed at this module (:func:`gmm`).

    Returns:
        ``"grouped_gemm"`` (the real package), ``"megatron_eplb"`` (this drop-in), or a sentence saying why
        nothing was needed (a megatron-core without the legacy ``GroupedMLP``).
    """
    from megatron.core.transformer.moe import experts

    if not hasattr(experts, "GroupedMLP"):
        return "not needed: this megatron-core has no legacy GroupedMLP"
    from megatron.core.transformer.moe import grouped_gemm_util as util

    this = sys.modules[__name__]
    if util.grouped_gemm is not None and util.grouped_gemm is not this:
        return "grouped_gemm"
    try:
        import grouped_gemm  # noqa: F401  (installed after Megatron was imported)
    except ImportError:
        if util.grouped_gemm is not this:
            util.grouped_gemm, util.ops = this, ops
            logger.info("megatron-eplb: grouped_gemm is not installed; GroupedMLP uses torch._grouped_mm")
        return "megatron_eplb"
    util.grouped_gemm, util.ops = grouped_gemm, grouped_gemm.ops
    return "grouped_gemm"
