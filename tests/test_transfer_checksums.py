"""Tests for megatron_eplb.transfer.checksums: exact word sums and the slot hash (pure torch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_eplb.transfer import fold_checksum, slot_checksum, slot_sums


def test_slot_checksum_bit_level():
    a = [torch.arange(12, dtype=torch.float32).reshape(3, 4), torch.ones(3, dtype=torch.bfloat16)]
    b = [t.clone() for t in a]
    assert int(slot_checksum(a)) == int(slot_checksum(b))
    b[0][1, 2] = torch.nextafter(b[0][1, 2], torch.tensor(100.0))
    assert int(slot_checksum(a)) != int(slot_checksum(b))
    swapped = [a[0].flatten().flip(0).reshape(3, 4), a[1]]
    assert int(slot_checksum(a)) != int(slot_checksum(swapped))
    assert int(slot_checksum([torch.zeros(3, dtype=torch.uint8)])) != int(
        slot_checksum([torch.zeros(5, dtype=torch.uint8)])
    )
    assert slot_checksum(a).dtype == torch.int64


def _reference_sums(t: torch.Tensor, max_words=None) -> tuple[int, int]:
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    x = raw.view(np.int16) if raw.size % 2 == 0 else raw
    if max_words is not None and x.size > max_words:
        x = x[:: -(-x.size // max_words)]
    x = x.astype(np.int64)
    w = np.arange(x.size, dtype=np.int64) % 65521 + 1
    return int((x * w).sum()), int(x.sum())


@pytest.mark.parametrize("max_words", [None, 7])
def test_slot_sums_batched_exact(monkeypatch, max_words):
    from megatron_eplb.transfer import checksums as tr

    gen = torch.Generator().manual_seed(3)
    slots = [
        [
            torch.randn(5, 9, generator=gen),
            torch.randn(11, generator=gen).bfloat16(),
            torch.randint(0, 2, (3,), generator=gen).bool(),  # odd byte count: hashed bytewise
            torch.zeros(0),
        ]
        for _ in range(4)
    ]
    sums = slot_sums(slots, max_words)
    assert sums.shape == (4, 4, 2) and sums.dtype == torch.int64
    for n, slot in enumerate(slots):
        for j, t in enumerate(slot):
            assert tuple(sums[n, j].tolist()) == (_reference_sums(t, max_words) if t.numel() else (0, 0))
        nbytes = [t.numel() * t.element_size() for t in slot]
        assert int(slot_checksum(slot, max_words)) == fold_checksum(sums[n], nbytes)
    # Tiny passes (several slots and column pieces per tensor): the same exact sums.
    monkeypatch.setattr(tr, "_PASS_WORDS", 8)
    monkeypatch.setattr(tr, "_WEIGHTS", {})
    assert torch.equal(slot_sums(slots, max_words), sums)
    # Extreme words: |x * w| stays below 2**31 (int32 products), the int64 sums stay exact.
    big = [[torch.full((70000,), -32768, dtype=torch.int16)]]
    assert tuple(slot_sums(big)[0, 0].tolist()) == _reference_sums(big[0][0])
