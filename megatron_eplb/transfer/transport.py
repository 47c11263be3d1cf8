"""The torch.distributed point-to-point transport: the only code in the package that calls ``batch_isend_irecv``.

Seam owned here: *how bytes travel*.  :class:`TorchP2PTransport` implements
:class:`megatron_eplb.protocols.Transport` over one process group (NCCL on CUDA, gloo on CPU): a round is one
``batch_isend_irecv`` of ``P2POp`` s (sends first, then receives, in the order given), its handle the works
that call returns.  :func:`make_transport` is the factory the executor uses when it is given no transport.

A new transport (another library, a staged gloo path, a test double) is one new file implementing
``protocols.Transport`` (``post`` + ``with_group`` + ``group``), passed as ``TransferExecutor(transport=...)``;
add it to :data:`TRANSPORTS` to make it selectable by name.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..protocols import Transport, TransportError

__all__ = ["TRANSPORTS", "TorchP2PTransport", "TorchP2PRound", "make_transport"]


class TorchP2PRound:
    """The works of one posted round (:meth:`TorchP2PTransport.post`); ``works`` as ``batch_isend_irecv``
    returned them (gloo: one per message; NCCL: usually one for the whole round)."""

    def __init__(self, works: list) -> None:
        self.works = works

    def wait(self, timeout: float | None = None) -> None:
        """Wait for every work of the round (``timeout`` seconds for all of them together); a timeout or a dead
        peer raises :class:`TransportError` with ``group_broken`` (gloo closes the pair on a timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for work in self.works:
                if deadline is None:
                    work.wait()
                else:
                    left = max(deadline - time.monotonic(), 0.001)
                    work.wait(datetime.timedelta(seconds=left))
        except Exception as exc:  # gloo/NCCL raise RuntimeError on timeouts and dead peers
            raise TransportError(f"receive failed: {exc}", group_broken=True) from exc


class TorchP2PTransport:
    """:class:`~megatron_eplb.protocols.Transport` over ``torch.distributed`` ``isend``/``irecv``.

    Args:
        group: the process group whose ranks are the peers (``None``: WORLD).  With NCCL, the first use of the
            group must involve all its ranks (as for any NCCL ``batch_isend_irecv``); a barrier does that.
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        world = dist.get_world_size(group)
        if group is None or group is dist.group.WORLD:
            self._global = list(range(world))
        else:
            self._global = [dist.get_global_rank(group, r) for r in range(world)]

    def post(
        self, sends: Sequence[tuple[int, torch.Tensor]], recvs: Sequence[tuple[int, torch.Tensor]]
    ) -> TorchP2PRound:
        """One ``batch_isend_irecv`` of every send then every receive (peers: ranks of :attr:`group`)."""
        dist = self._dist
        ops = [dist.P2POp(dist.isend, buf, self._global[peer], self.group) for peer, buf in sends]
        ops += [dist.P2POp(dist.irecv, buf, self._global[peer], self.group) for peer, buf in recvs]
        return TorchP2PRound(dist.batch_isend_irecv(ops) if ops else [])

    def with_group(self, group: Any) -> TorchP2PTransport:
        return TorchP2PTransport(group)


#: Transports selectable by name (:func:`make_transport`): name -> ``factory(group)``.
TRANSPORTS: dict[str, Callable[[Any], Transport]] = {"torch": TorchP2PTransport}


def make_transport(group: Any = None, kind: str = "torch") -> Transport:
    """The transport ``kind`` (a key of :data:`TRANSPORTS`) over ``group`` (``None``: WORLD)."""
    try:
        factory = TRANSPORTS[kind]
    except KeyError:
        raise ValueError(f"unknown transport {kind!r}; known: {sorted(TRANSPORTS)}") from None
    return factory(group)
