"""`megatron-eplb validate-map | inspect`: the expert-map commands of the CLI (added by ``cli.build_parser``)."""

from __future__ import annotations

import argparse

import numpy as np

from .cli_common import check_load_matches, read_load, read_map
from .errors import ExpertMapError
from .placement import ExpertPlacement
from .stats import balance_summary

__all__ = ["add_commands", "cmd_validate_map", "cmd_inspect"]


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
    placement = read_map(args.map)
    load = read_load(args.load) if args.load else placement.expert_load
    if load is not None:
        check_load_matches(load, placement)
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


def add_commands(subparsers) -> None:
    """Add ``validate-map`` and ``inspect`` to the ``megatron-eplb`` sub-command parser."""
    p = subparsers.add_parser("validate-map", help="check an expert-map JSON (one-line verdict)")
    p.add_argument("map")
    p.add_argument("--num-layers", type=int)
    p.add_argument("--num-experts", type=int)
    p.add_argument("--ep-size", type=int)
    p.add_argument("--allow-same-rank-copies", action="store_true")
    p.set_defaults(func=cmd_validate_map)

    p = subparsers.add_parser("inspect", help="per-layer replicas and, with loads, balancedness")
    p.add_argument("map")
    p.add_argument("--load", help='load file {"logical_count": [[...]]} (all-zero rows are dense layers)')
    p.set_defaults(func=cmd_inspect)
