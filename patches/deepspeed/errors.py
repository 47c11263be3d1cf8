"""The error every part of the DeepSpeed wiring raises."""

from __future__ import annotations

from megatron_eplb.config import EPLBConfigError

__all__ = ["DeepSpeedEPLBError"]


class DeepSpeedEPLBError(EPLBConfigError):
    """The DeepSpeed configuration or parallel layout cannot be used with megatron-eplb."""
