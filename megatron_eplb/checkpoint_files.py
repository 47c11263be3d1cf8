"""How a logical checkpoint reaches the disk and comes back: written whole or not at all, verified on read.

Used by :mod:`megatron_eplb.checkpoint` (the format) and the DeepSpeed wrapper (``latest``); no Megatron, no
DeepSpeed, no process group.

* :func:`atomic_write_text` — a small file (``latest``, an expert map) through a temporary name and a rename:
  a reader sees the old text or the new one, never a torn file;
* :func:`publish_directory` — a checkpoint directory's files are written into a hidden partial directory beside
  it (``.NAME.partial-PID-NS``), synced, then renamed into place: a save killed half-way leaves the previous
  checkpoint as it was (only the partial directory is left, and the next save of that name removes it);
* :func:`payload_checksums` / :func:`verify_checksums` — a CRC-32 of every tensor of the payload (bytes, dtype
  and shape) and one of its scalar metadata, stored in the payload at save and compared at load; a mismatch
  names the file and the tensor;
* :func:`read_payload` — ``torch.load`` whose failures (an empty or truncated file) are one clear error;
* :func:`facts_mismatch` — the model's shape facts (``hidden_size``, ``num_experts`` ...) stored at save
  against the model a load fills.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import shutil
import time
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = [
    "CHECKSUMS_KEY",
    "FACTS_KEY",
    "MAP_SHA256_KEY",
    "atomic_write_text",
    "describe_facts",
    "facts_mismatch",
    "payload_checksums",
    "publish_directory",
    "read_payload",
    "sha256_text",
    "verify_checksums",
]

log = logging.getLogger("megatron_eplb")

CHECKSUMS_KEY = "checksums"  # {path of a tensor in the payload: crc32, METADATA_PATH: crc32}
FACTS_KEY = "model_facts"  # {"hidden_size": 64, "num_experts": 16, ...}
MAP_SHA256_KEY = "expert_map_sha256"  # the expert map written beside the payload, as text
METADATA_PATH = "<metadata>"
PARTIAL_INFIX = ".partial-"
# Facts that do not change a tensor's shape: a difference is logged, not refused.
NON_SHAPE_FACTS = ("moe_router_topk",)


# ============================================================================ writing


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename (synced).

    Raises:
        CheckpointError: ``path`` is a directory (nothing is written).
        OSError: the write failed; the temporary file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a directory; give a file name (e.g. {str(path / 'file')!r})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{PARTIAL_INFIX}{os.getpid()}-{time.monotonic_ns()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def publish_directory(directory: str | os.PathLike, files: Mapping[str, Any]) -> Path:
    """Write ``files`` (``{name: bytes | str | payload for torch.save}``) as the contents of ``directory``,
    all or nothing.

    They are written into a hidden partial directory beside ``directory`` and synced; then, when
    ``directory`` does not exist, that directory is renamed to it (atomic); when it exists (an overwrite the
    caller allowed, or an empty or foreign directory), each file replaces its namesake (atomic per file;
    a crash between two renames is caught at load by the payload's map checksum).  Partial directories a
    killed save of the same name left behind are removed first.

    Raises:
        OSError: a write failed; ``directory`` is unchanged and the partial directory is removed.
    """
    directory = Path(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{directory.name}{PARTIAL_INFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".{directory.name}{PARTIAL_INFIX}{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        for name, content in files.items():
            with open(tmp / name, "wb") as f:
                _dump(content, f)
                f.flush()
                os.fsync(f.fileno())
        if not directory.exists():
            os.rename(tmp, directory)
        else:
            for name in files:
                os.replace(tmp / name, directory / name)
            tmp.rmdir()
        _fsync_dir(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _dump(content: Any, f) -> None:
    """Write one file's ``content``: bytes and text as they are, anything else with ``torch.save``."""
    if isinstance(content, bytes):
        f.write(content)
    elif isinstance(content, str):
        f.write(content.encode())
    else:
        torch.save(content, f)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ============================================================================ checksums


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _walk(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` of every leaf of nested dicts / lists / tuples, in order (dict keys joined by ``/``)."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _walk(value, f"{path}/{key}" if path else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _walk(value, f"{path}/{i}")
    else:
        yield path, obj


def _tensor_crc(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes, then of its dtype and shape."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    try:
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    except (RuntimeError, TypeError):  # dtypes without a byte view
        raw = t.contiguous().numpy().tobytes()
    return zlib.crc32(f"{t.dtype}{list(t.shape)}".encode(), zlib.crc32(raw))


def payload_checksums(payload: Mapping[str, Any]) -> dict[str, int]:
    """``{path: crc32}`` of every tensor of ``payload`` (e.g. ``model/decoder.layers.1.mlp.experts.
    local_experts.5.linear_fc1.weight``, ``optimizer/<param>/exp_avg``) and, under ``"<metadata>"``, one of its
    scalar entries (step counts, the lr scheduler's numbers, the model facts).  ``payload[CHECKSUMS_KEY]``
    itself is left out."""
    out: dict[str, int] = {}
    meta = 0
    for path, leaf in _walk({k: v for k, v in payload.items() if k != CHECKSUMS_KEY}, ""):
        if torch.is_tensor(leaf):
            out[path] = _tensor_crc(leaf)
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            meta = zlib.crc32(f"{path}={leaf!r};".encode(), meta)
    out[METADATA_PATH] = meta
    return out


def verify_checksums(payload: Mapping[str, Any], path: str | os.PathLike) -> bool:
    """Compare every tensor of ``payload`` (read from ``path``) with the checksums saved in it.

    Returns:
        True when verified; False for a payload saved without checksums (by a megatron-eplb before they were
        stored: loaded unverified, which is logged).
    Raises:
        CheckpointError: a tensor (or the metadata) differs from its checksum, or is missing or extra; the
            message names the file and the first such tensor.
    """
    saved = payload.get(CHECKSUMS_KEY)
    if saved is None:
        log.info(
            "megatron-eplb: %s was saved without checksums (by a megatron-eplb before they were stored); "
            "loading it unverified",
            path,
        )
        return False
    actual = payload_checksums(payload)
    bad = [k for k in actual if k in saved and saved[k] != actual[k]]
    missing = [k for k in saved if k not in actual]
    extra = [k for k in actual if k not in saved]
    problems = (
        [f"tensor {k!r} fails its checksum (crc32 saved {saved[k]:08x}, read {actual[k]:08x})" for k in bad]
        + [f"tensor {k!r} is missing" for k in missing]
        + [f"tensor {k!r} was not saved" for k in extra]
    )
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        first = problems[0].replace(
            "tensor '<metadata>' fails", "its metadata (step counts, scheduler) fails"
        )
        raise CheckpointError(
            f"{path}: {first}{more}: the file is corrupt (changed after it was written); load another "
            "checkpoint (an earlier tag) or restore this one from a copy"
        )
    return True


# ============================================================================ reading


def read_payload(path: str | os.PathLike) -> Any:
    """``torch.load(path)`` on the CPU; an empty, truncated or otherwise unreadable file is a
    :class:`CheckpointError` that names it (``FileNotFoundError`` when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    size = path.stat().st_size
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError) as exc:
        what = (
            "is empty (0 bytes)"
            if size == 0
            else f"cannot be read ({type(exc).__name__}: {_first_line(exc)})"
        )
        raise CheckpointError(
            f"{path} {what}: the file is truncated or corrupt (an interrupted save or copy); load another "
            "checkpoint (an earlier tag) or restore this one from a copy"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no message"


# ============================================================================ model facts


def describe_facts(facts: Mapping[str, Any]) -> str:
    """``"num_layers=4, hidden_size=64, ..."`` (``None`` values left out)."""
    return ", ".join(f"{k}={v}" for k, v in facts.items() if v is not None)


def facts_mismatch(saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> str | None:
    """A sentence naming the shape facts in which the model a checkpoint was trained with (``saved``)
    differs from ``current``, or None when they agree (facts only one side records are not compared; a
    difference in a fact that changes no shape, e.g. ``moe_router_topk``, is logged instead)."""
    if not saved or not current:
        return None
    common = [k for k in saved if k in current and saved[k] is not None and current[k] is not None]
    differ = [k for k in common if saved[k] != current[k]]
    soft = [k for k in differ if k in NON_SHAPE_FACTS]
    if soft:
        log.warning(
            "megatron-eplb: the checkpoint was trained with %s; this model has %s (loaded anyway: no shape changes)",
            describe_facts({k: saved[k] for k in soft}),
            describe_facts({k: current[k] for k in soft}),
        )
    hard = [k for k in differ if k not in NON_SHAPE_FACTS]
    if not hard:
        return None
    return (
        f"the checkpoint was trained with {describe_facts({k: saved[k] for k in hard})}; this model has "
        f"{describe_facts({k: current[k] for k in hard})} (the checkpoint's model: {describe_facts(saved)}): "
        "build the model with the checkpoint's settings"
    )
