"""Byte-level text data for the examples: real text, vocabulary 256, nothing downloaded.

Domains come from ``../shared/data/text/*.txt`` (OLMoE's routing texts: code, Wikipedia, arXiv, books, web)
when present, else from the Python standard library's own sources (``code``) and its docstrings/comments
(``prose``).  Switching domain mid-run shifts which experts are hot: a real load drift for dynamic EPLB.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np
import torch

__all__ = ["VOCAB_SIZE", "ByteBatches", "available_domains", "decode", "encode", "load_domain"]

VOCAB_SIZE = 256
_REPO = Path(__file__).resolve().parent.parent
SHARED_TEXT = Path(os.environ.get("MEGATRON_EPLB_TEXT_DIR", _REPO.parent / "shared" / "data" / "text"))
_FILES = {
    "code": "github_oss_with_stack_texts.txt",
    "wikipedia": "wikipedia_texts.txt",
    "arxiv": "arxiv_texts.txt",
    "books": "b3g_texts.txt",
    "web": "c4_texts.txt",
}


def available_domains() -> list[str]:
    """Domain names usable with :func:`load_domain` on this machine."""
    if SHARED_TEXT.is_dir() and any((SHARED_TEXT / f).is_file() for f in _FILES.values()):
        return [d for d, f in _FILES.items() if (SHARED_TEXT / f).is_file()]
    return ["code", "prose"]


def _stdlib_text(kind: str, limit: int) -> bytes:
    """Fallback corpus: the standard library's sources (``code``) or its comment/docstring lines (``prose``)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, size = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_bytes()
        if kind == "prose":
            lines = [ln.strip().lstrip(b"#").strip() for ln in text.splitlines()]
            text = b"\n".join(
                ln for ln in lines if ln and ln[:1].isalpha() and b"(" not in ln and b"=" not in ln
            )
        out.append(text)
        size += len(text)
        if size >= limit:
            break
    return b"\n".join(out)[:limit]


def load_domain(name: str, limit: int = 2_000_000) -> np.ndarray:
    """uint8 ``[n]`` bytes of a domain (``code``/``wikipedia``/... or the fallback ``code``/``prose``)."""
    path = SHARED_TEXT / _FILES.get(name, f"{name}.txt")
    if path.is_file():
        data = path.read_bytes()[:limit]
    elif name in ("code", "prose", "wikipedia"):
        data = _stdlib_text("code" if name == "code" else "prose", limit)
    else:
        raise FileNotFoundError(
            f"text domain {name!r} not found (looked for {path}); available: {available_domains()}"
        )
    return np.frombuffer(data, dtype=np.uint8)


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8", errors="replace")), dtype=torch.long)


def decode(tokens) -> str:
    return bytes(int(t) % 256 for t in tokens).decode("utf-8", errors="replace")


class ByteBatches:
    """Deterministic random windows of one domain: ``(tokens [B, T], labels [B, T])`` int64.

    Every rank draws from its own stream (seed, rank) so data parallelism sees different batches;
    the same (seed, rank, step) always gives the same batch.
    """

    def __init__(
        self, data: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0, rank: int = 0
    ) -> None:
        if len(data) <= seq_len + 1:
            raise ValueError(f"corpus of {len(data)} bytes is shorter than seq_len + 1 = {seq_len + 1}")
        self.data = torch.from_numpy(data.astype(np.int64))
        self.batch_size, self.seq_len = batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)

    def skip(self, count: int) -> None:
        """Advance past ``count`` batches (a resumed run continues where the saved one stopped)."""
        for _ in range(count):
            torch.randint(0, len(self.data) - self.seq_len - 1, (self.batch_size,), generator=self.generator)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            0, len(self.data) - self.seq_len - 1, (self.batch_size,), generator=self.generator
        )
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]
        window = self.data[idx]
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()
