"""Moving experts between ranks when the placement changes, split by seam:

* :mod:`.plan` — *what* moves: :func:`plan_transfer` (pure, equal on every rank), :class:`TransferPlan`,
  :func:`local_copy_schedule`, the cut of messages into rounds;
* :mod:`.checksums` — *how a slot is hashed*: exact word sums (:func:`slot_sums`) and the canary hash;
* :mod:`.transport` — *how bytes travel*: :class:`TorchP2PTransport`, the torch.distributed implementation of
  :class:`megatron_eplb.protocols.Transport` (the only ``batch_isend_irecv`` caller), :func:`make_transport`;
* :mod:`.executor` — *staging, votes, rollback*: :class:`TransferExecutor` carries out a plan layer by layer
  through a transport, all-or-nothing per layer (:class:`TransferError`);
* :mod:`.testing` — a failing transport for fault tests (not imported here).

A new transport is one new file implementing ``protocols.Transport``, passed as
``TransferExecutor(..., transport=...)``.
"""

from ..protocols import Transport, TransportError, TransportHandle
from .checksums import fold_checksum, slot_checksum, slot_sums
from .executor import DEFAULT_CHUNK_BYTES, LayerHandle, TransferError, TransferExecutor
from .plan import LayerTransfer, TransferPlan, local_copy_schedule, message_rounds, plan_transfer, slot_nbytes
from .transport import TRANSPORTS, TorchP2PRound, TorchP2PTransport, make_transport

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "TRANSPORTS",
    "LayerHandle",
    "LayerTransfer",
    "TorchP2PRound",
    "TorchP2PTransport",
    "TransferError",
    "TransferExecutor",
    "TransferPlan",
    "Transport",
    "TransportError",
    "TransportHandle",
    "fold_checksum",
    "local_copy_schedule",
    "make_transport",
    "message_rounds",
    "plan_transfer",
    "slot_checksum",
    "slot_nbytes",
    "slot_sums",
]
