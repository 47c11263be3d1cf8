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

__all__ = ["EPLBPatchError", "SUPPORTED_MCORE_VERSIONS", "ensure_compat", "mcore_version", "model_facts"]

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


# Megatron's TransformerConfig field -> the name a checkpoint's model facts use (Megatron's flag, less "--").
_FACT_FIELDS = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_query_groups",
    "kv_channels": "kv_channels",
    "num_moe_experts": "num_experts",
    "moe_ffn_hidden_size": "moe_ffn_hidden_size",
    "moe_router_topk": "moe_router_topk",
}


def model_facts(model: torch.nn.Module, num_moe_layers: int | None = None) -> dict[str, Any]:
    """The shape facts a checkpoint stores of a Megatron-core model: its ``TransformerConfig``'s sizes under
    Megatron's flag names (``num_layers``, ``hidden_size``, ``num_experts``, ...), ``vocab_size`` and
    ``max_sequence_length`` where the model has them, and ``num_moe_layers``.  Plain ints (pickles anywhere)."""
    config = getattr(model, "config", None)
    facts: dict[str, Any] = {}
    for field, name in _FACT_FIELDS.items():
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool):
            facts[name] = int(value)
    for name in ("vocab_size", "max_sequence_length"):
        value = getattr(model, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            facts[name] = value
    if num_moe_layers is not None:
        facts["num_moe_layers"] = int(num_moe_layers)
    return facts
