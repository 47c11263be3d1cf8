"""A failing transport for fault tests: the test double of the transport seam (no environment variables).

:class:`FailingTransport` wraps a real :class:`~megatron_eplb.protocols.Transport` and, while armed
(``fail_after_sends`` not ``None``), lets only the first ``fail_after_sends`` send messages through (counted
from the last :meth:`~FailingTransport.arm`) and fails every round it posts with a clean
:class:`~megatron_eplb.protocols.TransportError` (``group_broken=False``) once the round's surviving messages
completed.  So the rank holding it fails every layer in which it posts a message:

* ``fail_after_sends=10**6`` — every message goes out, this rank refuses the layer: every rank raises
  :class:`~megatron_eplb.transfer.TransferError`, nothing is written, the group stays usable;
* ``fail_after_sends=k`` — only ``k`` messages go out: the receivers of the rest time out
  (``group_broken``), every rank raises, nothing is written.

Use (per rank; the executor, or the manager's transport factory, takes it as ``transport=``)::

    transport = FailingTransport(TorchP2PTransport(group), fail_after_sends=0 if rank == 1 else None)
    executor = TransferExecutor(plan, slot_tensors, group, transport=transport)
    ...
    transport.arm(None)  # healthy again
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..protocols import Transport, TransportError, TransportHandle

__all__ = ["FailingTransport"]


class _FailedRound:
    """A round that waits for what was really posted, then fails cleanly."""

    def __init__(self, inner: TransportHandle, message: str) -> None:
        self.inner = inner
        self.message = message

    def wait(self, timeout: float | None = None) -> None:
        self.inner.wait(timeout)  # a late message must not land in a reused buffer
        raise TransportError(self.message, group_broken=False)


class FailingTransport:
    """A :class:`~megatron_eplb.protocols.Transport` that drops sends and fails rounds while armed.

    Args:
        inner: the transport that really moves the bytes.
        fail_after_sends: ``None``: pass every round through untouched; ``k``: let the first ``k`` send
            messages through (from now on), drop later ones, and fail every round.
    Attributes:
        sent: send messages let through since the last :meth:`arm`.
        failed_rounds: rounds failed so far.
    """

    def __init__(self, inner: Transport, fail_after_sends: int | None = 0) -> None:
        self.inner = inner
        self.failed_rounds = 0
        self.arm(fail_after_sends)

    @property
    def group(self) -> Any:
        return self.inner.group

    def arm(self, fail_after_sends: int | None) -> None:
        """Start failing after ``fail_after_sends`` more send messages (``None``: stop failing)."""
        if fail_after_sends is not None and fail_after_sends < 0:
            raise ValueError(f"fail_after_sends must be >= 0 or None, got {fail_after_sends}")
        self.fail_after_sends = fail_after_sends
        self.sent = 0

    def post(
        self, sends: Sequence[tuple[int, torch.Tensor]], recvs: Sequence[tuple[int, torch.Tensor]]
    ) -> TransportHandle:
        if self.fail_after_sends is None:
            return self.inner.post(sends, recvs)
        keep = max(0, min(len(sends), self.fail_after_sends - self.sent))
        self.sent += keep
        self.failed_rounds += 1
        message = f"injected failure after {self.fail_after_sends} send message(s) (test transport)"
        return _FailedRound(self.inner.post(list(sends)[:keep], recvs), message)

    def with_group(self, group: Any) -> FailingTransport:
        """The same fault (armed state and count) over ``group``."""
        other = FailingTransport(self.inner.with_group(group), self.fail_after_sends)
        other.sent, other.failed_rounds = self.sent, self.failed_rounds
        return other
