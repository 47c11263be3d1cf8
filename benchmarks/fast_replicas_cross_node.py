"""Per-step replicas across nodes (issue #20, ``eplb_fast_cross_node_min_tokens``): the committed demo traces
replayed at EP 4 and 8 as 2 nodes, one spare slot per rank, with the cross-node rule at several thresholds
``m`` beside the rule-free choice (``m = 0``) on the same persistent placements.

    .venv/bin/python benchmarks/fast_replicas_cross_node.py    # table + benchmarks/results/fast_replicas_cross_node.json

Per fast row: mean / worst per-step balancedness from the first re-plan on, spare copies used per step (all
layers) and those fetched across nodes.  The demo traces have 2048 (token, expert) pairs per layer and step
(a mean rank load of 256 at EP 8), so ``m`` is taken to their scale; 4096 (the default) refuses every cross-node
copy there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_eplb.replay import replay  # noqa: E402
from megatron_eplb.trace import read_trace  # noqa: E402

TRACES = ("demo_train_ep2", "demo_serve_ep2")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ep-sizes", default="4,8")
    p.add_argument("--num-nodes", type=int, default=2)
    p.add_argument("--thresholds", default="16,64,4096", help="m values (the rule-free twin comes with each)")
    p.add_argument("--policies", default="greedy")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fast_replicas_cross_node.json"))
    args = p.parse_args(argv)
    rows = []
    started = time.time()
    print(f"{'trace':<16}{'EP':>3}{'m':>6}  {'row':<28}{'mean':>8}{'worst':>8}{'copies':>8}{'x-node':>8}")
    for name in TRACES:
        loads = read_trace(REPO / "examples" / "traces" / f"{name}.npz").loads()
        for ep in (int(x) for x in args.ep_sizes.split(",")):
            for m in (int(x) for x in args.thresholds.split(",")):
                result = replay(
                    loads,
                    ep,
                    ep,
                    policies=tuple(args.policies.split(",")),
                    interval=50,
                    window=50,
                    bound=False,
                    fast_slots=1,
                    num_nodes=args.num_nodes,
                    cross_node_min_gain=m,
                )
                for row in result["rows"]:
                    if row["split"] != "fast":
                        continue
                    out = {k: row[k] for k in ("name", "mean", "p10", "worst", "copies", "cross_node_copies")}
                    out.update(trace=name, ep_size=ep, num_nodes=args.num_nodes, m=row["cross_node_min_gain"])
                    out["threshold_run"] = m
                    rows.append(out)
                    print(
                        f"{name:<16}{ep:>3}{row['cross_node_min_gain']:>6}  {row['name']:<28}{row['mean']:>8.4f}"
                        f"{row['worst']:>8.4f}{row['copies']:>8.2f}{row['cross_node_copies']:>8.2f}",
                        flush=True,
                    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"seconds": round(time.time() - started, 1), "rows": rows}, indent=1)
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
