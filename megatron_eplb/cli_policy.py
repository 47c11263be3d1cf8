"""`megatron-eplb plan | evaluate | simulate`: the policy commands of the CLI (added by ``cli.build_parser``).

Imports :mod:`.cli_common`, never :mod:`.cli`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .checkpoint_files import atomic_write_text
from .cli_common import (
    LOAD_HELP,
    CLIError,
    check_load_matches,
    int_list,
    output_path,
    read_load,
    read_map,
    write_output,
)
from .errors import PolicyError
from .placement import ExpertPlacement
from .policy import NODE_LOCALITY, placement_diagnostics, policy_names, rebalance_with_info
from .policy.common import check_problem_size

__all__ = ["add_commands", "cmd_plan", "cmd_evaluate", "cmd_simulate"]


def _fmt_metrics(d: dict) -> str:
    text = (
        f"balancedness {d['balancedness']:.4f} (sum(mean)/sum(max) {d['sum_ratio']:.4f}, "
        f"max/mean {d['max_over_mean']:.4f}), same-rank duplicates {d['same_rank_duplicates']}"
    )
    if "cross_node_share" in d:
        text += (
            f", cross-node load {100 * d['cross_node_share']:.2f}%, copies off their home node "
            f"{d['node_local_violations']}"
        )
    return text


# ------------------------------------------------------------------------------------------------- plan
def cmd_plan(args: argparse.Namespace) -> int:
    output_path(args.out, "--out", "expert_map.json")
    load = read_load(args.load)
    num_layers, num_experts = load.shape
    previous = read_map(args.previous) if args.previous else None
    exclude = int_list(args.exclude_ranks, "--exclude-ranks") if args.exclude_ranks else ()
    options = {"churn_weight": args.churn_weight, "node_locality": args.node_locality}
    try:
        placement, info = rebalance_with_info(
            load,
            args.num_slots,
            args.ep_size,
            num_nodes=args.num_nodes,
            num_groups=args.num_groups,
            previous=previous,
            policy=args.policy,
            exclude_ranks=exclude,
            **options,
        )
    except PolicyError as exc:
        raise CLIError(str(exc)) from None
    if previous is not None:
        before, before_name = previous, f"previous map {args.previous}"
    else:
        before = ExpertPlacement.default(num_layers, num_experts, args.ep_size, args.num_slots - num_experts)
        before_name = "default placement"
    topo = {"num_nodes": args.num_nodes, "num_groups": args.num_groups}
    d_before = placement_diagnostics(before, load, **topo)
    d_after = placement_diagnostics(placement, load, previous=before, home_node=info["home_node"], **topo)
    print(
        f"plan: {num_layers} MoE layers x {num_experts} experts -> {args.num_slots} slots on {args.ep_size} ranks, "
        f"policy {info['policy']} (locality {info['locality']})"
    )
    print(f"before ({before_name}): {_fmt_metrics(d_before)}")
    print(f"after: {_fmt_metrics(d_after)}")
    print(
        f"moved slots: {d_after['moved_slots']} of {placement.phy2log.size} "
        f"({100 * d_after['moved_fraction']:.2f}%) vs {before_name}; time {1e3 * info['seconds']:.1f} ms"
    )
    if "fallback" in info:
        print(f"note: {info['fallback']}")
    write_output(lambda: placement.to_json(args.out), args.out, "--out")
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    load = read_load(args.load)
    placement = read_map(args.map)
    check_load_matches(load, placement)
    previous = read_map(args.previous) if args.previous else None
    if previous is not None and previous.phy2log.shape != placement.phy2log.shape:
        raise CLIError(
            f"--previous has shape {list(previous.phy2log.shape)}, the map {list(placement.phy2log.shape)}"
        )
    d = placement_diagnostics(
        placement, load, num_nodes=args.num_nodes, num_groups=args.num_groups, previous=previous
    )
    print(repr(placement))
    print(_fmt_metrics(d))
    per_layer = np.asarray(d["per_layer"])
    worst = int(per_layer.argmin())
    slowdown = 1.0 / per_layer[worst] if per_layer[worst] > 0 else float("inf")  # max / mean of that layer
    print(
        f"worst layer {worst}: balancedness {per_layer[worst]:.4f}, its MoE step slowdown vs perfect balance "
        f"x{slowdown:.4f}; mean over layers x{d['max_over_mean']:.4f}"
    )
    if previous is not None:
        print(f"moved slots vs {args.previous}: {d['moved_slots']} ({100 * d['moved_fraction']:.2f}%)")
    return 0


# --------------------------------------------------------------------------------------------- simulate
def _redundancy_for(spec: str, num_experts: int, ep: int) -> int:
    """Redundant slots for one EP size: ``ep`` (one per rank), ``N`` (rounded up to a valid count)."""
    if spec == "ep":
        r = ep
    else:
        try:
            r = int(spec)
        except ValueError:
            raise CLIError(f"--redundancy values must be integers or 'ep', got {spec!r}") from None
        if r < 0:
            raise CLIError(f"--redundancy values must be >= 0, got {r}")
    return r + (-(num_experts + r)) % ep


def cmd_simulate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.out:
        output_path(args.out, "--out", "simulate.json")
    if args.plot:
        output_path(args.plot, "--plot", "simulate.png")
    load = read_load(args.load)
    num_layers, num_experts = load.shape
    eps = int_list(args.ep_sizes, "--ep-sizes")
    specs = [s.strip() for s in args.redundancy.split(",") if s.strip()]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    names = policy_names()
    for p in policies:
        if p != "none" and p not in names:
            raise CLIError(f"unknown policy {p!r} in --policies; choose from none, {', '.join(names)}")
    for ep in eps:
        if ep < 1:
            raise CLIError(f"--ep-sizes: {ep} must be >= 1")
        if args.num_nodes > 1 and ep % args.num_nodes:
            raise CLIError(f"--ep-sizes: {ep} is not a multiple of --num-nodes {args.num_nodes}")
    # "none" (Megatron's layout, no redundancy) does not depend on --redundancy: one row per EP size
    jobs = [
        (p, ep, spec) for spec in specs for p in policies for ep in eps if p != "none" or spec == specs[0]
    ]
    for policy, ep, spec in jobs:  # every size checked before the first plan (--ep-sizes 1000000)
        r = 0 if policy == "none" else _redundancy_for(spec, num_experts, ep)
        try:
            check_problem_size(num_layers, num_experts, num_experts + r + (-(num_experts + r)) % ep, ep)
        except PolicyError as exc:
            raise CLIError(f"--ep-sizes {ep}: {exc}") from None
    rows = []
    done = set()
    for policy, ep, spec in tqdm(jobs, desc="simulate", unit="plan", disable=args.no_progress):
        r = 0 if policy == "none" else _redundancy_for(spec, num_experts, ep)
        slots = num_experts + r
        if slots % ep:  # "none": contiguous experts need E % EP == 0
            slots += (-slots) % ep
            r = slots - num_experts
        if (policy, ep, r) in done:  # two --redundancy values giving the same R (e.g. "ep" and 8 at EP 8)
            continue
        done.add((policy, ep, r))
        start = time.perf_counter()
        try:
            if policy == "none":
                placement = ExpertPlacement.default(num_layers, num_experts, ep, r)
                info = {"home_node": None}
            else:
                placement, info = rebalance_with_info(
                    load,
                    slots,
                    ep,
                    num_nodes=args.num_nodes,
                    num_groups=args.num_groups,
                    policy=policy,
                    node_locality=args.node_locality,
                )
        except PolicyError as exc:
            raise CLIError(f"{policy} at EP {ep}: {exc}") from None
        seconds = time.perf_counter() - start
        d = placement_diagnostics(
            placement,
            load,
            num_nodes=args.num_nodes,
            num_groups=args.num_groups,
            home_node=info["home_node"],
        )
        rows.append(
            {
                "policy": policy,
                "redundancy": r,  # redundant slots per layer of this row
                "redundancy_spec": spec if policy != "none" else "0",  # the --redundancy value it came from
                "ep_size": ep,
                "num_slots": slots,
                "balancedness": d["balancedness"],
                "slowdown": d["max_over_mean"],
                "duplicates": d["same_rank_duplicates"],
                "cross_node_share": d.get("cross_node_share"),
                "ms": 1e3 * seconds,
            }
        )
    print(
        f"{'policy':<14}{'R':>6}{'EP':>6}{'slots':>7}{'balancedness':>14}{'slowdown':>10}{'dups':>6}{'ms':>9}"
    )
    for row in rows:
        print(
            f"{row['policy']:<14}{row['redundancy']:>6}{row['ep_size']:>6}{row['num_slots']:>7}"
            f"{row['balancedness']:>14.4f}{row['slowdown']:>10.4f}{row['duplicates']:>6}{row['ms']:>9.1f}"
        )
    print("slowdown = MoE step time vs perfect balance (mean over layers of max rank load / mean rank load)")
    if args.out:
        text = json.dumps({"load": args.load, "rows": rows}, indent=1)
        write_output(lambda: atomic_write_text(args.out, text), args.out, "--out")
        print(f"wrote {args.out}")
    plot = args.plot
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key in dict.fromkeys((r["policy"], r["redundancy_spec"]) for r in rows):
            sel = [r for r in rows if (r["policy"], r["redundancy_spec"]) == key]
            label = key[0] if key[0] == "none" else f"{key[0]} (R={key[1]})"
            ax.plot([r["ep_size"] for r in sel], [r["slowdown"] for r in sel], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("EP size (ranks)")
        ax.set_ylabel("MoE step slowdown vs perfect balance (max/mean)")
        ax.set_title(Path(args.load).name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=120)
        plt.close(fig)
        print(f"wrote {plot}")
    return 0


# ------------------------------------------------------------------------------------------------ parser
def _topology(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-nodes", type=int, default=1, help="nodes the EP group spans (default 1)")
    p.add_argument(
        "--num-groups", type=int, default=1, help="expert groups of group-limited routing (default 1)"
    )


def add_commands(subparsers) -> None:
    """Add ``plan``, ``evaluate`` and ``simulate`` to the ``megatron-eplb`` sub-command parser."""

    p = subparsers.add_parser("plan", help="plan a placement from a load file and write the expert map")
    p.add_argument("--load", required=True, help=LOAD_HELP)
    p.add_argument("--ep-size", type=int, required=True, help="ranks of the expert-parallel group")
    p.add_argument(
        "--num-slots", type=int, required=True, help="physical slots per layer (experts + redundant)"
    )
    _topology(p)
    p.add_argument("--previous", help="current expert map (low_churn starts from it)")
    p.add_argument("--policy", default="auto", choices=policy_names())
    p.add_argument("--churn-weight", type=float, default=0.01, help="low_churn knob (eplb_churn_weight)")
    p.add_argument("--node-locality", default="relaxed", choices=NODE_LOCALITY)
    p.add_argument("--exclude-ranks", help="comma-separated ranks to leave empty (failed GPUs)")
    p.add_argument("--out", required=True, help="expert map JSON to write")
    p.set_defaults(func=cmd_plan)

    p = subparsers.add_parser("evaluate", help="balance metrics of an expert map under a load")
    p.add_argument("--load", required=True, help=LOAD_HELP)
    p.add_argument("--map", required=True, help="expert map JSON")
    p.add_argument("--previous", help="an earlier map, to count moved slots")
    _topology(p)
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("simulate", help="balancedness and MoE slowdown per policy and EP size")
    p.add_argument("--load", required=True, help=LOAD_HELP)
    p.add_argument("--ep-sizes", default="8,16,32,64,128,256", help="comma-separated EP sizes")
    p.add_argument(
        "--redundancy",
        default="ep",
        help="comma-separated redundant slots per layer ('ep' = one per rank); rounded up to fill every rank",
    )
    p.add_argument("--policies", default="none,deepseek,greedy", help="comma-separated; 'none' = no EPLB")
    _topology(p)
    p.add_argument("--node-locality", default="relaxed", choices=NODE_LOCALITY)
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--plot", default="simulate.png", help="PNG of slowdown vs EP size ('' = none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)
