"""Replay the committed demo traces and the real load files (where present) under every strategy.

    .venv/bin/python benchmarks/replay_traces.py            # writes benchmarks/results/replay_traces.json + PNGs

Traces: ``examples/traces/demo_train_ep2.npz`` (training, code -> Wikipedia, EP 2) and
``demo_serve_ep2.npz`` (serving code prompts from that checkpoint), replayed at EP 2, 4 and 8 with one
redundant slot per rank; re-plan every 40 steps on the last 40 (from their sum, and time-resolved: from
their steps, ``megatron_eplb.policy.time_resolved``).  The real files have no time axis
(each is one accumulated histogram): the DeepSeek-V3 files (SGLang, 58 MoE layers x 256 experts) are
taken as consecutive "steps" in the order prefill 512, prefill 2048, decode 1000/1000, decode 1800/100, and
OLMoE's five text domains (3 layers x 64 experts) in the order arxiv, book, c4, github, wikipedia; each
step is planned from the one before (interval = window = 1), i.e. a placement made on one workload serving
the next.  They are read from ``/work/shared/data/real_traces`` (``--real``) and never copied.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_eplb.cli_replay import format_table, plot  # noqa: E402
from megatron_eplb.replay import replay  # noqa: E402
from megatron_eplb.trace import read_trace, read_traces  # noqa: E402

DEEPSEEK = ("prefill_in512", "prefill_in2048", "decode_in1000out1000", "decode_in1800out100")
OLMOE_DOMAINS = ("arxiv", "book", "c4", "github", "wikipedia")


def cases(real: Path) -> list[tuple[str, np.ndarray, list[tuple[int, int]], dict]]:
    """``(name, loads [T, L, E], [(ep, R)], replay options)``."""
    out = []
    for name in ("demo_train_ep2", "demo_serve_ep2"):
        path = REPO / "examples" / "traces" / f"{name}.npz"
        if path.is_file():
            options = dict(interval=40, window=40, time_resolved=True)
            out.append((name, read_trace(path).loads(), [(2, 2), (4, 4), (8, 8)], options))
    ds = real / "sglang_deepseek_v3"
    if all((ds / f"{n}.json").is_file() for n in DEEPSEEK):
        loads = read_traces([ds / f"{n}.json" for n in DEEPSEEK]).loads()
        out.append(("deepseek_v3_4_workloads", loads, [(8, 8), (32, 32)], dict(interval=1, window=1)))
    olmoe = real / "olmoe_routing_output" / "olmoe_mixtral_domain_expert_counts.json"
    if olmoe.is_file():
        counts = json.loads(olmoe.read_text())["models"]["olmoe"]["counts"]
        loads = np.stack([np.asarray(counts[d], dtype=np.int64) for d in OLMOE_DOMAINS])
        out.append(("olmoe_5_domains", loads, [(8, 8), (16, 16)], dict(interval=1, window=1)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--real", default="/work/shared/data/real_traces", help="folder of the real load files"
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "replay_traces.json"))
    parser.add_argument("--plots", default=str(REPO / "docs" / "img"), help="folder for the PNGs ('' = none)")
    parser.add_argument("--policies", default="greedy,low_churn")
    args = parser.parse_args(argv)
    policies = tuple(p for p in args.policies.split(",") if p)
    results = []
    for name, loads, sizes, options in cases(Path(args.real)):
        for ep, r in sizes:
            result = replay(loads, ep, r, policies=policies, progress=True, **options)
            result["trace"] = name
            print(f"\n== {name}\n{format_table(result)}", flush=True)
            if args.plots and ep == 4 and name == "demo_train_ep2":
                shown = [
                    "default",
                    "low_churn even",
                    "low_churn balanced",
                    "low_churn time-resolved balanced",
                ]
                shown += ["greedy balanced", "oracle (per-step plan)"]
                png = str(Path(args.plots) / f"replay_{name}_ep{ep}.png")
                plot(result, png, f"{name}: EP {ep}, R={r}", shown)
            for row in result["rows"]:
                del row["per_step"]  # the summaries are enough here
            results.append(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
