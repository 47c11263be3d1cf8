"""`megatron-eplb` command line: parses the arguments and dispatches to the commands.

The commands live in their own modules, which never import this one:

- :mod:`.cli_map`: ``validate-map``, ``inspect``;
- :mod:`.cli_policy`: ``plan``, ``evaluate``, ``simulate``;
- :mod:`.cli_replay`: ``replay``.

A command raises :class:`~megatron_eplb.errors.CLIError` for bad input; :func:`main` prints it as one line
and returns exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from . import cli_map, cli_policy, cli_replay
from .errors import CLIError

__all__ = ["main", "build_parser", "CLIError"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-eplb", description="Expert-parallel load balancing tools")
    sub = parser.add_subparsers(dest="command", required=True)
    cli_map.add_commands(sub)
    cli_policy.add_commands(sub)
    cli_replay.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"megatron-eplb {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (`megatron-eplb inspect MAP | head`): not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0


if __name__ == "__main__":
    sys.exit(main())
