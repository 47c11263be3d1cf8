"""Staging: where a slot's tensors sit inside a flat byte buffer, the pool of such buffers, and the copies
in and out of them (pure local tensor work; no communication).

A staged slot is the concatenation of a slot's tensors (weights, fp32 master, Adam moments), each at a
``_ALIGN``-aligned byte offset; a layer's staging buffer holds ``n`` staged slots back to back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SlotLayout", "StagingPool", "pack", "position_groups", "staged_tensors", "unpack"]

_ALIGN = 64  # byte alignment of every tensor inside a staged slot


@dataclass(frozen=True)
class SlotLayout:
    """Where each of a slot's tensors lives inside a staged slot (byte offsets, ``_ALIGN``-aligned)."""

    offsets: tuple[int, ...]
    nbytes: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[tuple[int, ...], ...]
    slot_nbytes: int
    device: torch.device

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> SlotLayout:
        if not tensors:
            raise ValueError("slot_tensors returned no tensors")
        offsets, nbytes, pos = [], [], 0
        for t in tensors:
            offsets.append(pos)
            n = t.numel() * t.element_size()
            nbytes.append(n)
            pos += -(-n // _ALIGN) * _ALIGN
        return cls(
            tuple(offsets),
            tuple(nbytes),
            tuple(t.dtype for t in tensors),
            tuple(tuple(t.shape) for t in tensors),
            max(pos, _ALIGN),
            tensors[0].device,
        )

    def matches(self, tensors: Sequence[torch.Tensor]) -> bool:
        return (
            tuple(t.dtype for t in tensors) == self.dtypes
            and tuple(tuple(t.shape) for t in tensors) == self.shapes
        )


class StagingPool:
    """Reusable staging buffers (uint8, per device): a layer takes one at its start and gives it back."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self.in_flight_bytes = 0
        self.peak_bytes = 0

    @property
    def bytes(self) -> int:
        """Bytes held now (free buffers + buffers of layers in flight)."""
        return sum(b.numel() for b in self._free) + self.in_flight_bytes

    def take(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A buffer of at least ``nbytes`` on ``device`` (a free one if it fits)."""
        for i, b in enumerate(self._free):
            if b.numel() >= nbytes and b.device == device:
                buf = self._free.pop(i)
                break
        else:
            # Replace a too-small free buffer instead of keeping both.
            self._free = [b for b in self._free if b.device != device]
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.in_flight_bytes += buf.numel()
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return buf

    def give_back(self, buf: torch.Tensor, *, reuse: bool) -> None:
        """Return ``buf``; ``reuse=False`` drops it (after a failure a late message could still land in it)."""
        self.in_flight_bytes -= buf.numel()
        if reuse:
            self._free.append(buf)


def staged_tensors(buf: torch.Tensor, index: int, layout: SlotLayout) -> list[torch.Tensor]:
    """Typed views of staged slot ``index`` (one per slot tensor), cached on the (pooled) buffer: a pack or
    unpack is then one ``copy_`` per tensor, instead of half a dozen view ops in front of each copy (host
    time that, at ~2 x slots x tensors copies per layer, is milliseconds per layer)."""
    cache = buf.__dict__.setdefault("_eplb_views", {})
    views = cache.get((layout, index))
    if views is None:
        view = buf[index * layout.slot_nbytes : (index + 1) * layout.slot_nbytes]
        views = [
            view[off : off + n].view(dt).view(shape)
            for off, n, dt, shape in zip(layout.offsets, layout.nbytes, layout.dtypes, layout.shapes)
        ]
        cache[(layout, index)] = views
    return views


def pack(buf, index: int, tensors, layout: SlotLayout, only: Sequence[int] | None = None) -> None:
    """Copy a slot's ``tensors`` (positions ``only``, default all) into staged slot ``index``."""
    _copy_tensors(staged_tensors(buf, index, layout), tensors, only)


def unpack(buf, index: int, tensors, layout: SlotLayout, only: Sequence[int] | None = None) -> None:
    """Copy staged slot ``index`` (positions ``only``, default all) into a slot's ``tensors``."""
    _copy_tensors(tensors, staged_tensors(buf, index, layout), only)


def position_groups(layout: SlotLayout, parts: int) -> list[list[int]]:
    """Split a slot's tensor positions into at most ``parts`` groups of about equal bytes (greedy)."""
    parts = max(1, min(parts, len(layout.nbytes)))
    groups: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for j in sorted(range(len(layout.nbytes)), key=lambda i: -layout.nbytes[i]):
        g = load.index(min(load))
        groups[g].append(j)
        load[g] += layout.nbytes[j]
    return [sorted(g) for g in groups if g]


def _copy_tensors(
    dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], only: Sequence[int] | None
) -> None:
    """``dst[j].copy_(src[j])`` for the positions ``only`` (default all): same dtype and shape, a byte copy."""
    for j in range(len(src)) if only is None else only:
        dst[j].copy_(src[j], non_blocking=True)
