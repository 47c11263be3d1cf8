"""`megatron-eplb replay`: a recorded load trace under the default placement, each policy with the even and the
per-batch (``balanced``) split, the best split, per-step replicas (``--fast-slots``; across ``--num-nodes`` with
the cross-node rule, ``--cross-node-min-tokens``) and a per-step oracle
(added by ``cli.build_parser``).

Imports :mod:`.cli_common`, never :mod:`.cli`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .cli_common import CLIError
from .config import CROSS_NODE_MIN_TOKENS
from .errors import PolicyError
from .policy import policy_names
from .policy.common import check_problem_size
from .replay import replay
from .trace import read_traces

__all__ = ["add_commands", "cmd_replay", "format_table"]


def format_table(result: dict) -> str:
    """The replay's rows as a text table."""
    cfg = result["config"]
    lines = [
        f"replay: {cfg['steps']} steps x {cfg['layers']} MoE layers x {cfg['experts']} experts on EP {cfg['ep_size']}, "
        f"{cfg['num_slots']} slots (R={cfg['redundancy']}); re-plan every {cfg['interval']} steps on the last "
        f"{cfg['window']}; summaries over steps {cfg['summary_from_step']}..{cfg['steps'] - 1} (from the first re-plan)",
        f"{'strategy':<34}{'mean':>8}{'p10':>8}{'worst':>8}{'moved slots':>13}",
    ]
    fast = any("copies" in row for row in result["rows"])
    if fast:
        lines[-1] += f"{'copies/step':>13}{'x-node/step':>13}"
    for row in result["rows"]:
        line = f"{row['name']:<34}{row['mean']:>8.4f}{row['p10']:>8.4f}{row['worst']:>8.4f}{row['moved_slots']:>13d}"
        if "copies" in row:
            line += f"{row['copies']:>13.2f}{row['cross_node_copies']:>13.2f}"
        lines.append(line)
    lines.append("per-step balancedness = mean over layers of mean / max rank load (1.0 = perfect)")
    if fast:
        nodes, m = cfg.get("num_nodes", 1), cfg.get("cross_node_min_gain", 0)
        where = (
            "one node: none"
            if nodes == 1
            else f"{nodes} nodes of {cfg['ep_size'] // nodes} ranks; a copy across nodes only when it takes >= {m} "
            "more tokens off the busiest rank than an in-node one; '(any node)': without that rule"
        )
        lines.append(
            "copies/step, x-node/step: spare copies used per step (all layers), and those fetched across nodes "
            f"({where})"
        )
    if result.get("split_vs_bound_min") is not None:
        lines.append(
            f"balanced split vs the best split over the same placement, worst (step, layer): "
            f"{result['split_vs_bound_min']:.4f} of the bound's busiest rank"
        )
    return "\n".join(lines)


def plot(result: dict, path: str, title: str, names: list[str] | None = None) -> None:
    """Per-step balancedness of every row (or of the rows in ``names``), PNG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if names is None or r["name"] in names]
    colors = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(11, 4.8))
    for i, row in enumerate(rows):
        style = "--" if row["split"] == "best" else ":" if row["name"].startswith("oracle") else "-"
        values = np.asarray(row["per_step"])
        label = f"{row['name']} ({row['mean']:.3f})"
        ax.plot(
            np.arange(1, len(values) + 1), values, style, lw=1.1, color=colors[i % len(colors)], label=label
        )
    ax.set_xlabel("step")
    ax.set_ylabel("balancedness (mean / max rank load)")
    ax.set_title(f"{title}  (legend: mean from step {result['config']['summary_from_step']})")
    ax.set_ylim(top=1.005)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_replay(args: argparse.Namespace) -> int:
    try:
        trace = read_traces(args.trace)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    names = policy_names()
    for p in (*policies, args.oracle_policy):
        if p not in names:
            raise CLIError(f"unknown policy {p!r}; choose from {', '.join(names)}")
    loads = trace.loads()
    if args.steps is not None:
        loads = loads[: args.steps]
    num_experts = loads.shape[2]
    if (num_experts + args.redundancy) % args.ep_size:
        raise CLIError(
            f"--redundancy {args.redundancy}: {num_experts} experts + {args.redundancy} redundant slots do not "
            f"divide over --ep-size {args.ep_size}"
        )
    if not 0 <= args.fast_slots * args.ep_size <= args.redundancy:
        raise CLIError(
            f"--fast-slots {args.fast_slots}: the spare slots are part of the redundant ones; "
            f"--redundancy {args.redundancy} at --ep-size {args.ep_size} allows 0..{args.redundancy // args.ep_size}"
        )
    for flag, value in (
        ("--interval", args.interval),
        ("--window", args.window),
        ("--ep-size", args.ep_size),
        ("--num-nodes", args.num_nodes),
    ):
        if value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    if args.ep_size % args.num_nodes:
        raise CLIError(f"--num-nodes {args.num_nodes} does not divide --ep-size {args.ep_size}")
    if args.cross_node_min_tokens < 0:
        raise CLIError(f"--cross-node-min-tokens must be >= 0, got {args.cross_node_min_tokens}")
    try:  # --ep-size 1000000: one clear error, not a process killed for memory
        check_problem_size(loads.shape[1], num_experts, num_experts + args.redundancy, args.ep_size)
    except PolicyError as exc:
        raise CLIError(f"--ep-size {args.ep_size}: {exc}") from None
    try:
        result = replay(
            loads,
            args.ep_size,
            args.redundancy,
            policies=policies,
            interval=args.interval,
            window=args.window,
            oracle_policy=args.oracle_policy,
            bound=not args.no_bound,
            time_resolved=args.time_resolved,
            progress=not args.no_progress,
            fast_slots=args.fast_slots,
            num_nodes=args.num_nodes,
            cross_node_min_gain=args.cross_node_min_tokens,
        )
    except (PolicyError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    result["trace"] = [str(p) for p in args.trace]
    result["trace_meta"] = trace.meta
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.out}")
    if args.plot:
        title = f"{Path(args.trace[0]).name}: EP {args.ep_size}, R={args.redundancy}"
        plot(result, args.plot, title)
        print(f"wrote {args.plot}")
    return 0


def add_commands(subparsers) -> None:
    """Add ``replay`` to the ``megatron-eplb`` sub-command parser."""
    p = subparsers.add_parser(
        "replay",
        help="replay a load trace: default placement, policies with even / balanced split, best split, oracle",
    )
    p.add_argument(
        "trace", nargs="+", help="trace .npz (eplb_trace_path), or JSON load files (one step each, in order)"
    )
    p.add_argument(
        "--ep-size", type=int, required=True, help="EP size to replay at (any: the trace is per expert)"
    )
    p.add_argument("--redundancy", type=int, required=True, help="redundant slots per layer (R)")
    p.add_argument("--policies", default="greedy,low_churn", help="comma-separated policies to re-plan with")
    p.add_argument("--interval", type=int, default=50, help="steps between re-plans (default 50)")
    p.add_argument("--window", type=int, default=50, help="steps of load each plan sees (default 50)")
    p.add_argument("--oracle-policy", default="greedy", help="policy of the per-step oracle (default greedy)")
    p.add_argument("--steps", type=int, default=None, help="replay only the first N steps")
    p.add_argument("--time-resolved", action="store_true", help="also plan from the window's per-step loads")
    p.add_argument(
        "--fast-slots",
        type=int,
        default=0,
        help="spare slots per rank refilled every step with copies of its hottest experts (per-step replicas; "
        "taken from --redundancy): adds the rows 'default + fast' and '<policy> + fast'",
    )
    p.add_argument(
        "--num-nodes",
        type=int,
        default=1,
        help="nodes the EP group spans (equal consecutive ranks each): the fast rows count the copies fetched "
        "across nodes and apply the cross-node rule (default 1)",
    )
    p.add_argument(
        "--cross-node-min-tokens",
        type=int,
        default=CROSS_NODE_MIN_TOKENS,
        help="eplb_fast_cross_node_min_tokens: a spare copy across nodes only when it takes at least this many "
        "more tokens off the step's busiest rank than an in-node one (0 = anywhere); with --num-nodes > 1 each "
        f"fast row gets an '(any node)' twin without the rule (default {CROSS_NODE_MIN_TOKENS}; the trace's "
        "token counts set the scale)",
    )
    p.add_argument(
        "--no-bound", action="store_true", help="skip the best split (the exact bound; slow on big E)"
    )
    p.add_argument("--out", help="write the result (rows with their per-step series) as JSON here")
    p.add_argument("--plot", default="replay.png", help="PNG of per-step balancedness ('' = none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay)
