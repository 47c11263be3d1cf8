"""megatron_eplb/errors.py: every error class in one module, re-exported where it was raised before."""

from __future__ import annotations

from megatron_eplb import EPLBConfigError


def test_errors_live_in_one_module_and_keep_their_old_paths():
    from megatron_eplb import errors
    from megatron_eplb.cli import CLIError
    from megatron_eplb.config import EPLBConfigError as FromConfig
    from megatron_eplb.placement import ExpertMapError
    from megatron_eplb.policy import PolicyError

    assert FromConfig is EPLBConfigError is errors.EPLBConfigError
    assert ExpertMapError is errors.ExpertMapError and PolicyError is errors.PolicyError
    assert CLIError is errors.CLIError
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.EPLBError) and cls.__doc__, name
    for cls in (errors.EPLBConfigError, errors.ExpertMapError, errors.PolicyError, errors.CheckpointError):
        assert issubclass(cls, ValueError)
    assert issubclass(errors.DeepSpeedEPLBError, errors.EPLBConfigError)
    assert issubclass(errors.TransferError, RuntimeError) and issubclass(
        errors.PolicyWorkerError, RuntimeError
    )
    exc = errors.TransferError("boom", layer=3, rank=1)
    assert str(exc) == "layer 3 rank 1: boom" and exc.layer == 3 and not exc.group_broken
    assert issubclass(errors.TransportError, RuntimeError) and errors.TransportError("x").group_broken
