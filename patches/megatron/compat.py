"""Seam: what differs between megatron-core releases, and the small helpers every other seam shares.

Owns the supported version range (:data:`SUPPORTED_MCORE_VERSIONS`, :func:`mcore_version`), the version
fixes Megatron-core needs on any device (:func:`ensure_compat`), the error type of the whole patch
(:class:`EPLBPatchError`) and the constructors whose signature moved between releases
(``ProcessGroupCollection``).

A new megatron-core release: widen :data:`SUPPORTED_MCORE_VERSIONS` and put any fix it needs here.  A new
expert class or dispatcher changes nothing here (see ``experts/`` and ``dispatchers.py``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["EPLBPatchError", "SUPPORTED_MCORE_VERSIONS", "ensure_compat", "mcore_version"]

from megatron_eplb.errors import EPLBPatchError

logger = logging.getLogger(__name__)

SUPPORTED_MCORE_VERSIONS = ((0, 16), (0, 19))  # inclusive range of (major, minor)


def mcore_version() -> tuple[int, int, int]:
    """The installed megatron-core version as ``(major, minor, patch)``."""
    from megatron.core import package_info

    return (int(package_info.MAJOR), int(package_info.MINOR), int(str(package_info.PATCH).split("rc")[0]))


def check_mcore_version() -> None:
    """Raise :class:`EPLBPatchError` outside :data:`SUPPORTED_MCORE_VERSIONS`."""
    version = mcore_version()
    low, high = SUPPORTED_MCORE_VERSIONS
    if not low <= version[:2] <= high:
        raise EPLBPatchError(
            f"megatron-core {'.'.join(map(str, version))} is not supported; supported: "
            f"{low[0]}.{low[1]} to {high[0]}.{high[1]}"
        )


def ensure_compat() -> list[str]:
    """Version fixes Megatron-core needs on any device; idempotent, called by :func:`apply`,
    :func:`enable_cpu` and ``patches.deepspeed.initialize`` (call it yourself for a model without EPLB).

    * ``moe_utils.te_general_gemm = None`` where Transformer Engine is absent: megatron-core 0.16 reads
      the name in the MoE forward without importing it (``NameError`` on CPU and on GPU alike).

    Returns:
        the fixes applied by this call (empty when nothing was needed).
    """
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return []
    moe_utils.te_general_gemm = None
    fix = "megatron.core.transformer.moe.moe_utils.te_general_gemm = None (no Transformer Engine)"
    logger.info("megatron-eplb: %s", fix)
    return [fix]


def process_groups(**groups: Any):
    """A ``ProcessGroupCollection`` holding ``groups`` (its fields are set after construction)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgc = ProcessGroupCollection()
    for name, group in groups.items():
        setattr(pgc, name, group)
    return pgc


def param_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (CPU for a module without parameters)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
