"""Per-step replicas (issue #20) in the replay: the recorded traces at EP 4 and 8, one spare slot per rank.

    .venv/bin/python benchmarks/fast_replicas_bench.py     # table + benchmarks/results/fast_replicas_replay.json

On the same steps, side by side: Megatron's default placement; persistent-only EPLB with ``R = EP`` redundant
slots (one per rank), re-planned from past steps, with the per-batch balanced split (greedy, low_churn, and
on the demo traces low_churn planned time-resolved); the fast path: ``EP`` of those slots are spare slots
refilled every step with copies of that step's hottest experts (:mod:`megatron_eplb.fast_replicas`) on top of
a persistent placement with no redundant slot (the default one, never re-planned, or greedy / low_churn
re-planned like the others); and the per-step oracle (a fresh greedy plan with ``R = EP`` on each step's own
counts, moves free), with the even split of its copies (the replay's row) and with the balanced split.  The
same slot count everywhere.

Traces: the committed demo traces (``examples/traces``: training code -> Wikipedia and serving, 16 experts,
top-2; re-plan every 40 steps on the last 40) and, where present (``--real``, never copied), the real load
files, which have no time axis: DeepSeek-V3 (SGLang; 4 workloads, 58 MoE layers x 256 experts, top-8) and
OLMoE (5 text domains, 3 layers x 64 experts, top-8) as consecutive "steps", each planned from the one before.
Targets (issue #20): the fast path's per-step mean balancedness >= 0.95 and >= 0.97x the oracle; "best fast /
oracle" and "targets" compare the best of the three fast rows with the stronger of the two oracles.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_eplb.policy import rebalance  # noqa: E402
from megatron_eplb.replay import balanced_rank_loads, replay, step_balancedness, summarize  # noqa: E402
from megatron_eplb.trace import read_trace, read_traces  # noqa: E402

DEEPSEEK = ("prefill_in512", "prefill_in2048", "decode_in1000out1000", "decode_in1800out100")
OLMOE_DOMAINS = ("arxiv", "book", "c4", "github", "wikipedia")
COLUMNS = (
    ("default", "default"),
    ("greedy balanced", "greedy bal."),
    ("low_churn balanced", "low_churn bal."),
    ("low_churn time-resolved balanced", "low_churn TR bal."),
    ("default + fast", "default+fast"),
    ("greedy + fast", "greedy+fast"),
    ("low_churn + fast", "low_churn+fast"),
    ("oracle (per-step plan)", "oracle"),
    ("oracle, balanced split", "oracle bal."),
)


def oracle_balanced(loads: np.ndarray, ep: int, redundancy: int) -> np.ndarray:
    """float64 ``[T]``: the per-step oracle's plans (greedy on each step's own load) with the balanced split of
    that step over their copies instead of the even one (the replay's oracle row splits evenly)."""
    out = []
    for t in range(loads.shape[0]):
        plan = rebalance(loads[t].astype(np.float64), loads.shape[2] + redundancy, ep, policy="greedy")
        out.append(step_balancedness(balanced_rank_loads(plan, loads[t : t + 1]))[0])
    return np.asarray(out)


def cases(real: Path) -> list[tuple[str, np.ndarray, dict]]:
    """``(name, loads [T, L, E], replay options)``."""
    out = []
    for name in ("demo_train_ep2", "demo_serve_ep2"):
        path = REPO / "examples" / "traces" / f"{name}.npz"
        if path.is_file():
            out.append((name, read_trace(path).loads(), dict(interval=40, window=40, time_resolved=True)))
    ds = real / "sglang_deepseek_v3"
    if all((ds / f"{n}.json").is_file() for n in DEEPSEEK):
        loads = read_traces([ds / f"{n}.json" for n in DEEPSEEK]).loads()
        out.append(("deepseek_v3_4_workloads", loads, dict(interval=1, window=1)))
    olmoe = real / "olmoe_routing_output" / "olmoe_mixtral_domain_expert_counts.json"
    if olmoe.is_file():
        counts = json.loads(olmoe.read_text())["models"]["olmoe"]["counts"]
        loads = np.stack([np.asarray(counts[d], dtype=np.int64) for d in OLMOE_DOMAINS])
        out.append(("olmoe_5_domains", loads, dict(interval=1, window=1)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--real", default="/work/shared/data/real_traces", help="folder of the real load files"
    )
    parser.add_argument("--ep-sizes", default="4,8")
    parser.add_argument("--fast-slots", type=int, default=1, help="spare slots per rank (default 1)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fast_replicas_replay.json"))
    args = parser.parse_args(argv)
    results, lines = [], []
    header = ["trace", "EP / R", *(label for _, label in COLUMNS), "best fast / oracle", "targets"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for name, loads, options in cases(Path(args.real)):
        for ep in (int(x) for x in args.ep_sizes.split(",")):
            r = ep * args.fast_slots
            if (loads.shape[2] + r) % ep or loads.shape[2] % ep:
                continue
            t0 = time.perf_counter()
            result = replay(
                loads,
                ep,
                r,
                policies=("greedy", "low_churn"),
                bound=False,
                fast_slots=args.fast_slots,
                **options,
            )
            seconds = time.perf_counter() - t0
            rows = {row["name"]: row for row in result["rows"]}
            first = result["config"]["summary_from_step"]
            rows["oracle, balanced split"] = dict(
                name="oracle, balanced split", **summarize(oracle_balanced(loads, ep, r)[first:])
            )
            result["rows"].append(rows["oracle, balanced split"])
            oracle = max(rows["oracle (per-step plan)"]["mean"], rows["oracle, balanced split"]["mean"])
            fast = max(rows[n]["mean"] for n in ("default + fast", "greedy + fast", "low_churn + fast"))
            met = fast >= 0.95 and fast >= 0.97 * oracle
            cells = [
                f"{rows[key]['mean']:.3f} / {rows[key]['worst']:.3f}" if key in rows else "–"
                for key, _ in COLUMNS
            ]
            lines.append(
                f"| {name} | {ep} / {r} | "
                + " | ".join(cells)
                + f" | {fast / oracle:.3f} | {'met' if met else 'NOT met'} |"
            )
            print(lines[-1], f"({seconds:.1f} s)", flush=True)
            for row in result["rows"]:
                row.pop("per_step", None)
            result.update(
                trace=name, seconds=seconds, best_fast=fast, fast_vs_oracle=fast / oracle, targets_met=met
            )
            results.append(result)
    print(
        "\nper-step balancedness, mean / worst over the steps from the first re-plan on "
        f"({args.fast_slots} spare slot(s) per rank)\n"
    )
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"table": lines, "results": results}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
