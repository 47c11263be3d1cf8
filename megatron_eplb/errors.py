"""Every typed error of megatron-eplb, in one place.

The modules that raise them import them from here, and re-export them under their old paths
(``from megatron_eplb.placement import ExpertMapError`` keeps working).  Every error derives from
:class:`EPLBError`, so ``except EPLBError`` catches anything this package raises on purpose, and keeps its
built-in base (``ValueError`` for bad input, ``RuntimeError`` for failures while running) so existing
``except ValueError`` / ``except RuntimeError`` handlers still catch it.

This module imports nothing (no torch, no numpy): importing it is free.
"""

from __future__ import annotations

__all__ = [
    "EPLBError",
    "EPLBConfigError",
    "ExpertMapError",
    "PolicyError",
    "CheckpointError",
    "TransferError",
    "TransportError",
    "PolicyWorkerError",
    "EPLBPatchError",
    "DeepSpeedEPLBError",
    "CLIError",
]


class EPLBError(Exception):
    """Base of every error megatron-eplb raises on purpose (the message says what, where and what to do)."""


# ------------------------------------------------------------------------------------------ bad input
class EPLBConfigError(EPLBError, ValueError):
    """An EPLB configuration key is unknown, has a wrong type or value, or does not fit the model."""


class ExpertMapError(EPLBError, ValueError):
    """A placement or expert-map file is malformed or does not match the model."""


class PolicyError(EPLBError, ValueError):
    """Bad arguments to a placement policy (the message says which and what to do)."""


class CheckpointError(EPLBError, ValueError):
    """A state dict does not hold what the placement needs (a missing expert, copies that differ, ...)."""


class EPLBPatchError(EPLBError, ValueError):
    """The model, its configuration or a placement cannot be used by the Megatron-core patch."""


class DeepSpeedEPLBError(EPLBConfigError):
    """The DeepSpeed configuration or parallel layout cannot be used with megatron-eplb."""


class CLIError(EPLBError):
    """A user-facing error of the ``megatron-eplb`` command line: printed as one line, exit code 2."""


# ------------------------------------------------------------------------------------ while running
class TransferError(EPLBError, RuntimeError):
    """A layer's transfer failed; no rank wrote anything for that layer (old tensors are intact).

    Attributes:
        layer: the MoE layer.
        rank: the rank (in the transfer group) that raised.
        group_broken: True when a wait timed out or a peer vanished; the transfer process group should then
            be destroyed and created anew before the next transfer (gloo closes the pair on a timeout).
    """

    def __init__(self, message: str, *, layer: int, rank: int, group_broken: bool = False) -> None:
        super().__init__(f"layer {layer} rank {rank}: {message}")
        self.layer = layer
        self.rank = rank
        self.group_broken = group_broken


class TransportError(EPLBError, RuntimeError):
    """A :class:`~megatron_eplb.protocols.Transport` round failed.

    Attributes:
        group_broken: True when the process group may be unusable now (a timeout, a vanished peer): the owner
            recreates it and rebinds the transport (``Transport.with_group``).  False for a clean failure
            (every posted message completed; e.g. a test double refusing a round): the group stays usable.
    """

    def __init__(self, message: str, *, group_broken: bool = True) -> None:
        super().__init__(message)
        self.group_broken = group_broken


class PolicyWorkerError(EPLBError, RuntimeError):
    """The policy raised inside the worker; the message carries the worker's traceback."""
