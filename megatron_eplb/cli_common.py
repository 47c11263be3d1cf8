"""Helpers shared by the ``megatron-eplb`` commands: reading inputs, turning bad input into :class:`CLIError`.

Imported by the command modules (:mod:`.cli_map`, :mod:`.cli_policy`); imports none of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import CLIError, ExpertMapError
from .placement import ExpertPlacement
from .stats import read_load_file

__all__ = [
    "CLIError",
    "LOAD_HELP",
    "read_load",
    "read_map",
    "int_list",
    "check_load_matches",
    "output_path",
    "write_output",
]

LOAD_HELP = 'load file {"logical_count": [[...]]} (all-zero rows are dense layers) or a map with expert_load'


def read_load(path: str) -> np.ndarray:
    """float ``[L, E]`` from a load file (or a map with ``expert_load``); a bad file is a :class:`CLIError`."""
    try:
        return read_load_file(path)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None


def read_map(path: str) -> ExpertPlacement:
    """An expert map (copies of one expert on one rank allowed); a bad file is a :class:`CLIError`."""
    try:
        return ExpertPlacement.from_json(path, allow_same_rank_copies=True)
    except ExpertMapError as exc:
        raise CLIError(str(exc)) from None


def int_list(text: str, flag: str) -> list[int]:
    """``"8,16,32"`` -> ``[8, 16, 32]``; ``flag`` names the option in the error."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{flag} must be a comma-separated list of integers, got {text!r}") from None
    if not values:
        raise CLIError(f"{flag} is empty")
    return values


def check_load_matches(load: np.ndarray, placement: ExpertPlacement) -> None:
    """A load ``[L, E]`` must have the map's MoE layers and experts."""
    if load.shape != (placement.num_layers, placement.num_experts):
        raise CLIError(
            f"load has shape {list(load.shape)} but the map has {placement.num_layers} MoE layers x "
            f"{placement.num_experts} experts"
        )


def output_path(path: str, flag: str, example: str) -> Path:
    """Check an output file before any work is done: not a directory, and its nearest existing ancestor is a
    directory (``example``: a file name to suggest inside a directory).  Returns it as a ``Path``."""
    out = Path(path)
    if out.is_dir():
        raise CLIError(f"{flag} {path!r} is a directory; give a file name (e.g. {str(out / example)!r})")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CLIError(f"{flag} {path!r}: {str(parent)!r} is not a directory")
            break
    return out


def write_output(write, path: str, flag: str) -> None:
    """Run ``write()`` (which writes ``path``); an OS error is a :class:`CLIError` naming ``flag``."""
    try:
        write()
    except (OSError, ExpertMapError) as exc:
        raise CLIError(f"{flag} {path!r} could not be written ({exc})") from None
