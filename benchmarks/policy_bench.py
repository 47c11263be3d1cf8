"""Placement policies on the real DeepSeek-V3 loads (SGLang's published expert statistics).

Reads ``../shared/data/real_traces/sglang_deepseek_v3/*.json`` relative to the repository (58 MoE layers x
256 experts after dropping dense rows) and measures, per setting, each policy's balancedness (mean over
layers of mean rank load / max rank load, a logical expert's load split evenly over its copies), time per
call, moved slots and same-rank duplicate copies.  ``deepseek`` is our exact-parity implementation of
DeepSeek's eplb.py (numpy), the baseline of every setting.

Settings: EP32/288 slots global; EP64/320 global; EP32/288 on 4 nodes with 8 expert groups, strict
(against the exact cap: the best pairing of groups to nodes, enumerated per layer) and relaxed locality;
steady load (an initial plan, then 20 rebalances each on a fresh 200k-token window sampled from the file);
shift (plan on one file, rebalance on another; a sweep of churn_weight gives the moved-vs-balance curve).

Prints one table, writes ``benchmarks/results/policy_bench.json`` and ``benchmarks/results/policy_shift.png``.
Run: ``python benchmarks/policy_bench.py [--quick]`` (about 1-2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_eplb.policy import placement_diagnostics, rebalance_with_info  # noqa: E402
from megatron_eplb.stats import balance_summary, moved_slots, read_load_file  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "real_traces" / "sglang_deepseek_v3"
RESULTS = ROOT / "benchmarks" / "results"
CHURN_SWEEP = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1)
WINDOW_TOKENS, TOP_K, STEADY_STEPS = 200_000, 8, 20


def pairings(items: list[int]):
    """Every way to split ``items`` into unordered pairs."""
    if not items:
        yield []
        return
    first = items[0]
    for i in range(1, len(items)):
        rest = items[1:i] + items[i + 1 :]
        for tail in pairings(rest):
            yield [(first, items[i])] + tail


def strict_cap(load: np.ndarray, num_groups: int = 8, num_nodes: int = 4) -> float:
    """Best balancedness any strict node-local placement can reach (2 groups per node): per layer, the best
    pairing of groups to nodes gives mean node load / max node load (perfect balance within nodes)."""
    assert num_groups == 2 * num_nodes
    group = load.reshape(load.shape[0], num_groups, -1).sum(axis=2)  # [L, G]
    pairs = np.array(list(pairings(list(range(num_groups)))))  # [105, nodes, 2]
    node_load = group[:, pairs[:, :, 0]] + group[:, pairs[:, :, 1]]  # [L, 105, nodes]
    best_max = node_load.max(axis=2).min(axis=1)
    return float((group.sum(axis=1) / num_nodes / best_max).mean())


def timed(repeats: int, fn, *args, **kwargs):
    """(result, (median, min) seconds) of ``repeats`` calls of ``fn(*args, **kwargs)``."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return out, (float(np.median(times)), float(np.min(times)))


def plan(load, slots, ranks, **kw):
    return rebalance_with_info(load, slots, ranks, **kw)


def static_settings(files: dict, repeats: int) -> list[dict]:
    rows = []
    settings = [
        ("EP32 288 global", dict(num_slots=288, num_ranks=32), ["deepseek", "greedy"]),
        ("EP64 320 global", dict(num_slots=320, num_ranks=64), ["deepseek", "greedy"]),
        (
            "EP32 288 4 nodes strict",
            dict(num_slots=288, num_ranks=32, num_nodes=4, num_groups=8, node_locality="strict"),
            ["deepseek", "hierarchical"],
        ),
        (
            "EP32 288 4 nodes relaxed",
            dict(num_slots=288, num_ranks=32, num_nodes=4, num_groups=8, node_locality="relaxed"),
            ["deepseek", "hierarchical"],
        ),
    ]
    for name, kw, policies in settings:
        kw = dict(kw)
        slots, ranks = kw.pop("num_slots"), kw.pop("num_ranks")
        topo = {k: kw[k] for k in ("num_nodes", "num_groups") if k in kw}
        for policy in policies:
            per_file = {}
            for fname, load in files.items():
                (placement, info), sec = timed(repeats, plan, load, slots, ranks, policy=policy, **kw)
                d = placement_diagnostics(placement, load, home_node=info["home_node"], **topo)
                entry = {"balancedness": d["balancedness"], "ms": 1e3 * sec[0], "ms_min": 1e3 * sec[1]}
                entry["duplicates"] = d["same_rank_duplicates"]
                if "cross_node_share" in d:
                    entry["cross_node_share"] = d["cross_node_share"]
                    entry["node_local_violations"] = d["node_local_violations"]
                if "strict" in name:
                    entry["cap"] = strict_cap(load)
                    entry["of_cap"] = d["balancedness"] / entry["cap"]
                per_file[fname] = entry
            rows.append({"setting": name, "policy": policy, "files": per_file})
    return rows


def sample_window(rng, probs: np.ndarray) -> np.ndarray:
    """One window: WINDOW_TOKENS x TOP_K expert choices per layer, multinomial from ``probs`` [L, E]."""
    return np.stack([rng.multinomial(WINDOW_TOKENS * TOP_K, p) for p in probs]).astype(np.float64)


def steady(files: dict, seed: int = 0) -> list[dict]:
    """Initial plan, then STEADY_STEPS rebalances on fresh windows; balancedness on the file's true load.

    Stateless policies re-plan from scratch each time; ``low_churn`` (what ``auto`` does with a previous
    placement) starts from the current one.  The initial plan is ``greedy`` (``deepseek`` for itself).
    """
    rows = []
    for policy in ("deepseek", "greedy", "low_churn"):
        per_file = {}
        for fname, true in files.items():
            rng = np.random.default_rng(seed)
            probs = true / true.sum(axis=1, keepdims=True)
            reference = balance_summary(plan(true, 288, 32, policy="greedy")[0], true)["mean"]
            first = "deepseek" if policy == "deepseek" else "greedy"
            current, _ = plan(sample_window(rng, probs), 288, 32, policy=first)
            moved, bal, secs = [], [], []
            for _ in range(STEADY_STEPS):
                window = sample_window(rng, probs)
                start = time.perf_counter()
                new, _ = plan(
                    window, 288, 32, policy=policy, previous=current if policy == "low_churn" else None
                )
                secs.append(time.perf_counter() - start)
                moved.append(moved_slots(current, new).sum() / new.phy2log.size)
                bal.append(balance_summary(new, true)["mean"])
                current = new
            per_file[fname] = {
                "balancedness": float(np.mean(bal)),
                "balancedness_last": float(bal[-1]),
                "greedy_on_true": reference,
                "of_greedy_on_true": float(np.mean(bal)) / reference,
                "moved_pct": 100 * float(np.mean(moved)),
                "ms": 1e3 * float(np.mean(secs)),
                "duplicates": int(placement_diagnostics(current, true)["same_rank_duplicates"]),
            }
        rows.append({"setting": "steady EP32 288 (20 windows)", "policy": policy, "files": per_file})
    return rows


def shift(files: dict) -> list[dict]:
    """Plan (greedy) on file A, rebalance on file B: stateless policies vs low_churn over CHURN_SWEEP."""
    names = list(files)
    pairs = []
    pre = [n for n in names if n.startswith("prefill")]
    dec = [n for n in names if n.startswith("decode")]
    if pre and dec:
        pairs.append((pre[0], dec[0]))  # prefill -> decode: a big shift
    if len(pre) >= 2:
        pairs.append((pre[1], pre[0]))  # prefill -> prefill: a small one
    if not pairs and len(names) >= 2:
        pairs.append((names[0], names[1]))
    out = []
    for a, b in pairs:
        old, _ = plan(files[a], 288, 32, policy="greedy")
        target = files[b]
        points = [
            {
                "policy": "previous (no rebalance)",
                "moved_pct": 0.0,
                "balancedness": balance_summary(old, target)["mean"],
            }
        ]
        for policy in ("deepseek", "greedy"):
            (new, _), sec = timed(1, plan, target, 288, 32, policy=policy)
            points.append(
                {
                    "policy": policy,
                    "moved_pct": 100 * moved_slots(old, new).sum() / new.phy2log.size,
                    "balancedness": balance_summary(new, target)["mean"],
                    "ms": 1e3 * sec[0],
                }
            )
        for cw in CHURN_SWEEP:
            (new, _), sec = timed(1, plan, target, 288, 32, previous=old, churn_weight=cw)
            points.append(
                {
                    "policy": "low_churn",
                    "churn_weight": cw,
                    "moved_pct": 100 * moved_slots(old, new).sum() / new.phy2log.size,
                    "balancedness": balance_summary(new, target)["mean"],
                    "ms": 1e3 * sec[0],
                }
            )
        out.append({"from": a, "to": b, "points": points})
    return out


def plot_shift(shifts: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, s in enumerate(shifts):
        color = f"C{k}"
        lc = [p for p in s["points"] if p["policy"] == "low_churn"]
        ax.plot(
            [p["moved_pct"] for p in lc],
            [p["balancedness"] for p in lc],
            "o-",
            color=color,
            label=f"low_churn, churn_weight sweep: {s['from'][:-5]} -> {s['to'][:-5]}",
        )
        for p in lc if k == 0 else []:
            ax.annotate(
                f"{p['churn_weight']:g}",
                (p["moved_pct"], p["balancedness"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(4, -8),
            )
        for p, marker in zip([p for p in s["points"] if p["policy"] != "low_churn"], ("x", "s", "^")):
            ax.plot(
                p["moved_pct"],
                p["balancedness"],
                marker,
                color=color,
                ms=8,
                label=f"{p['policy']} ({s['to'][:-5]})",
            )
    ax.set_xlabel("moved slots (% of all slots)")
    ax.set_ylabel("balancedness on the new load (mean/max)")
    ax.set_title("Load shift, EP32 with 288 slots: moves vs balance")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (setting, policy): min/mean over files."""
    lines = []
    for row in rows:
        f = list(row["files"].values())
        bal = [x["balancedness"] for x in f]
        line = {
            "setting": row["setting"],
            "policy": row["policy"],
            "bal_min": min(bal),
            "bal_max": max(bal),
            "ms": float(np.mean([x["ms"] for x in f])),
            "ms_min": float(min(x.get("ms_min", x["ms"]) for x in f)),
            "moved_pct": float(np.mean([x["moved_pct"] for x in f])) if "moved_pct" in f[0] else None,
            "duplicates": int(sum(x["duplicates"] for x in f)),
        }
        if "of_cap" in f[0]:
            line["note"] = f"of cap {min(x['of_cap'] for x in f):.4f}-{max(x['of_cap'] for x in f):.4f}"
        if "cross_node_share" in f[0] and "relaxed" in row["setting"]:
            line["note"] = "cross-node load " + "-".join(
                f"{100 * v:.1f}%"
                for v in (min(x["cross_node_share"] for x in f), max(x["cross_node_share"] for x in f))
            )
        if "of_greedy_on_true" in f[0]:
            line["note"] = f"of greedy-on-true {min(x['of_greedy_on_true'] for x in f):.4f}"
        lines.append(line)
    return lines


def print_table(lines: list[dict], shifts: list[dict]) -> None:
    head = (
        f"{'setting':<30}{'policy':<14}{'balancedness':>17}{'ms med/min':>12}{'moved %':>9}{'dups':>6}  note"
    )
    print(head)
    print("-" * len(head))
    for x in lines:
        moved = f"{x['moved_pct']:.2f}" if x["moved_pct"] is not None else "-"
        print(
            f"{x['setting']:<30}{x['policy']:<14}{x['bal_min']:>8.4f}-{x['bal_max']:.4f}{x['ms']:>6.1f}/{x['ms_min']:<5.1f}{moved:>9}"
            f"{x['duplicates']:>6}  {x.get('note', '')}"
        )
    for s in shifts:
        print(f"\nshift {s['from']} -> {s['to']} (EP32, 288 slots): moved % vs balancedness")
        for p in s["points"]:
            label = p["policy"] + (f" churn_weight={p['churn_weight']:g}" if "churn_weight" in p else "")
            ms = f"{p['ms']:.0f} ms" if "ms" in p else ""
            print(f"  {label:<34}{p['moved_pct']:>7.2f}%  {p['balancedness']:.4f}  {ms}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA), help="folder of SGLang DeepSeek-V3 load files")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per (policy, file)")
    parser.add_argument("--quick", action="store_true", help="two files, one timed call, no shift sweep")
    parser.add_argument("--out", default=str(RESULTS / "policy_bench.json"))
    args = parser.parse_args(argv)
    data = Path(args.data)
    paths = sorted(data.glob("*.json")) if data.is_dir() else []
    if not paths:
        print(f"skipped: no load files in {data} (the real traces are not part of the repository)")
        return 0
    if args.quick:
        paths, args.repeats = paths[:2], 1
    files = {p.name: read_load_file(p) for p in paths}
    print(f"{len(files)} files: {', '.join(files)}; shapes {sorted({v.shape for v in files.values()})}")
    start = time.perf_counter()
    rows = static_settings(files, args.repeats) + steady(files)
    shifts = [] if args.quick else shift(files)
    lines = summarize(rows)
    print_table(lines, shifts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"files": list(files), "summary": lines, "rows": rows, "shift": shifts}, indent=1)
    )
    print(f"\nwrote {out}")
    if shifts:
        png = out.with_name("policy_shift.png")
        plot_shift(shifts, png)
        print(f"wrote {png}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
