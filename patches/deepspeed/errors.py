"""The error every part of the DeepSpeed wiring raises (defined with the others in ``megatron_eplb.errors``)."""

from __future__ import annotations

from megatron_eplb.errors import DeepSpeedEPLBError

__all__ = ["DeepSpeedEPLBError"]
