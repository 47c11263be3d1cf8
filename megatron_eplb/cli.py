"""`megatron-eplb` command line: validate-map, inspect, plan, evaluate, simulate."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .placement import ExpertMapError, ExpertPlacement
from .stats import balance_summary, read_load_file

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _load(path: str) -> np.ndarray:
    try:
        return read_load_file(path)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None


def cmd_validate_map(args: argparse.Namespace) -> int:
    try:
        placement = ExpertPlacement.from_json(args.map, allow_same_rank_copies=args.allow_same_rank_copies)
        placement.validate(num_layers=args.num_layers, num_experts=args.num_experts, num_ranks=args.ep_size)
    except ExpertMapError as exc:
        print(f"INVALID {exc}")
        return 1
    print(
        f"OK {args.map}: {placement.num_layers} MoE layers, {placement.num_experts} logical experts, "
        f"{placement.num_ranks} ranks x {placement.slots_per_rank} slots, {placement.num_redundant} redundant"
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        placement = ExpertPlacement.from_json(args.map, allow_same_rank_copies=True)
    except ExpertMapError as exc:
        raise CLIError(str(exc)) from None
    load = _load(args.load) if args.load else placement.expert_load
    if load is not None and load.shape != (placement.num_layers, placement.num_experts):
        raise CLIError(
            f"load has shape {list(load.shape)} but the map has {placement.num_layers} MoE layers x "
            f"{placement.num_experts} experts"
        )
    print(repr(placement))
    per_layer = balance_summary(placement, load)["per_layer"] if load is not None else None
    header = f"{'layer':>5}  {'replicated experts (copies)':<48}"
    if per_layer is not None:
        header += f"  {'balancedness':>12}"
    print(header)
    for layer in range(placement.num_layers):
        counts = placement.replica_count[layer]
        multi = np.nonzero(counts > 1)[0]
        text = ", ".join(f"{e}x{counts[e]}" for e in multi) or "-"
        line = f"{layer:>5}  {text[:48]:<48}"
        if per_layer is not None:
            line += f"  {per_layer[layer]:>12.4f}"
        print(line)
    if load is not None:
        s = balance_summary(placement, load)
        print(f"balancedness: mean over layers {s['mean']:.4f}, sum(mean)/sum(max) {s['sum_ratio']:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-eplb", description="Expert-parallel load balancing tools")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate-map", help="check an expert-map JSON (one-line verdict)")
    p.add_argument("map")
    p.add_argument("--num-layers", type=int)
    p.add_argument("--num-experts", type=int)
    p.add_argument("--ep-size", type=int)
    p.add_argument("--allow-same-rank-copies", action="store_true")
    p.set_defaults(func=cmd_validate_map)

    p = sub.add_parser("inspect", help="per-layer replicas and, with loads, balancedness")
    p.add_argument("map")
    p.add_argument("--load", help='load file {"logical_count": [[...]]} (all-zero rows are dense layers)')
    p.set_defaults(func=cmd_inspect)

    from . import cli_policy  # plan / evaluate / simulate

    cli_policy.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"megatron-eplb {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
