"""Exact slot checksums: the canary that compares a moved slot with its sender (pure torch, no communication).

Seam owned here: *how a slot is hashed*.  :func:`slot_sums` gives exact int64 word sums for many slots in
one batched device pass; :func:`fold_checksum` folds them into one hash; :func:`slot_checksum` does both for
one slot.  Integer arithmetic throughout, so a value does not depend on the device or on reduction order
(the executor's ``verify_layer`` all-reduces the sums of both ends of each move and compares them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["fold_checksum", "slot_checksum", "slot_sums"]

_MOD = (1 << 61) - 1
_WEIGHT_PERIOD = 65521
_PASS_WORDS = 1 << 25  # 16-bit words summed per device pass (int16 input + int32 product: 192 MiB at most)
_WEIGHTS: dict = {}


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 view (or copy, if not contiguous) of ``t``'s bytes."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _words(t: torch.Tensor, max_words: int | None) -> torch.Tensor:
    """The 16-bit words of ``t`` (bytes if their count is odd), strided down to at most ``max_words``."""
    raw = _bytes_of(t)
    words = raw.view(torch.int16) if raw.numel() % 2 == 0 else raw
    if max_words is not None and words.numel() > max_words:
        words = words[:: -(-words.numel() // max_words)]
    return words


def _checksum_weights(device: torch.device, n: int) -> torch.Tensor:
    """int32 ``[>= n]``: ``j % 65521 + 1``, cached per device."""
    key = str(device)
    w = _WEIGHTS.get(key)
    if w is None or w.numel() < n:
        size = max(n, min(2 * (0 if w is None else w.numel()), _PASS_WORDS + _WEIGHT_PERIOD))
        w = (torch.arange(size, device=device, dtype=torch.int64) % _WEIGHT_PERIOD + 1).to(torch.int32)
        _WEIGHTS[key] = w
    return w


def slot_sums(slots: Sequence[Sequence[torch.Tensor]], max_words: int | None = None) -> torch.Tensor:
    """The exact word sums behind :func:`slot_checksum`, for many slots at once, left on their device.

    Every slot must hold the same list of shapes and dtypes (as the slots of one layer do).  For tensor ``j``
    of slot ``n`` with 16-bit words ``x_i`` (bytes if their count is odd; with ``max_words`` an evenly
    strided sample of at most that many, the same on every rank):
    ``out[n, j] = (sum(x_i * (i % 65521 + 1)), sum(x_i))``.  Both are exact in int64 for tensors of up to
    ``2**32`` words (``|x_i * w_i| < 2**31``), so they do not depend on the device or on reduction order.

    One batched device pass per tensor position (more only for very large tensors, ``_PASS_WORDS`` words
    per pass): a handful of kernels for all slots together and no host synchronisation.
    Returns int64 ``[len(slots), T, 2]`` on the slots' device (CPU for no slots).
    """
    if not slots:
        return torch.zeros(0, 0, 2, dtype=torch.int64)
    per_tensor = []
    for j in range(len(slots[0])):
        words = [_words(slot[j], max_words) for slot in slots]
        m = words[0].numel()
        device = words[0].device
        if m == 0:
            per_tensor.append(torch.zeros(len(slots), 2, dtype=torch.int64, device=device))
            continue
        step = max(1, min(m, _PASS_WORDS))  # columns per pass
        rows = max(1, _PASS_WORDS // step)  # slots per pass
        parts = []
        for r0 in range(0, len(words), rows):
            acc = None
            for c0 in range(0, m, step):
                x = torch.stack([w[c0 : c0 + step] for w in words[r0 : r0 + rows]])  # [rows, cols]
                offset = c0 % _WEIGHT_PERIOD
                w = _checksum_weights(device, offset + x.shape[1])[offset : offset + x.shape[1]]
                s = torch.stack([(x * w).sum(1, dtype=torch.int64), x.sum(1, dtype=torch.int64)], dim=1)
                acc = s if acc is None else acc + s
            parts.append(acc)
        per_tensor.append(parts[0] if len(parts) == 1 else torch.cat(parts))
    return torch.stack(per_tensor, dim=1)


def fold_checksum(sums: torch.Tensor | np.ndarray, nbytes: Sequence[int]) -> int:
    """Fold one slot's ``[T, 2]`` word sums (:func:`slot_sums`, on the host) with its tensors' byte counts
    into one hash in ``[0, 2**61 - 1)`` (exact integer arithmetic)."""
    h = 0
    for index, ((s1, s2), n) in enumerate(zip(np.asarray(sums).reshape(-1, 2).tolist(), nbytes)):
        h = (h * 1_000_003 + index * 7919 + int(n)) % _MOD
        h = (h * 1_000_003 + s1 * 31 + s2) % _MOD
    return h


def slot_checksum(tensors: Sequence[torch.Tensor], max_words: int | None = None) -> torch.Tensor:
    """A bit-level hash of a slot's tensors (order and every byte count and byte).

    With ``max_words``, each tensor is hashed on an evenly strided sample of at most that many 16-bit words
    (the same sample on every rank): a cheap canary that still catches a wrong, missing or garbled slot.

    Exact integer arithmetic, so the value does not depend on the device or on reduction order: the
    receiver's checksum equals the sender's iff the bytes are equal (up to hash collisions).  Per tensor the
    word sums of :func:`slot_sums` (one device pass, one host transfer for the slot), folded by
    :func:`fold_checksum`.  Many slots: :func:`slot_sums` on all of them at once (what the executor does).
    Returns an int64 scalar tensor on the CPU (in ``[0, 2**61 - 1)``).
    """
    sums = slot_sums([list(tensors)], max_words)[0].cpu()
    return torch.tensor(
        fold_checksum(sums, [t.numel() * t.element_size() for t in tensors]), dtype=torch.int64
    )
