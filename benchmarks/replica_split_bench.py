"""The ``balanced`` dispatch's split (:func:`megatron_eplb.replica_split.balanced_shares`): time per call and
quality against the exact bound.

    .venv/bin/python benchmarks/replica_split_bench.py [--device cuda] [--out results.json]

Per setting (experts, EP, redundant slots): a greedy placement planned on one load, split of another load
(the split only sees this batch): microseconds per call (eager; on CUDA also replayed as a CUDA graph, the
split has no host sync and static shapes), kernels per call (CUDA), and the worst and mean ratio of the
bound's busiest rank to the split's (1.0 = as good as an LP) over 16 layers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_eplb.policy import rebalance  # noqa: E402
from megatron_eplb.replica_split import (  # noqa: E402
    DEFAULT_ITERATIONS,
    balanced_shares,
    best_split_bound,
    copy_bounds,
    rank_loads_of_shares,
    replica_tables,
)

SETTINGS = [(16, 2, 2), (16, 4, 4), (64, 8, 8), (64, 8, 16), (256, 32, 32), (256, 64, 64)]


def _time(fn, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1e6


def _graph_of(fn, w: torch.Tensor):
    """``fn(static)`` captured as a CUDA graph: ``(graph, static input, static output)``."""
    static = w.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static)
    graph.replay()
    return graph, static, out


def _kernels(fn, w: torch.Tensor) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(w)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def bench(
    experts: int,
    ranks: int,
    redundant: int,
    device: torch.device,
    iterations: int,
    repeats: int,
    compiled: bool = False,
) -> dict:
    rng = np.random.default_rng(experts + ranks + redundant)
    layers = 16
    plan = rebalance(
        rng.gamma(0.5, size=(layers, experts)) * 1000, experts + redundant, ranks, policy="greedy"
    )
    load = (rng.gamma(0.5, size=(layers, experts)) * 8192 * 8 / experts * 2).astype(np.int64)
    ratios = []
    for layer in range(layers):
        tables = replica_tables(plan.phy2log[layer], ranks, experts)
        shares = balanced_shares(torch.as_tensor(load[layer]), tables, iterations)
        lower, _ = best_split_bound(load[layer], plan.phy2log[layer], ranks)
        ratios.append(lower / float(rank_loads_of_shares(shares, tables).max()))
    tables = replica_tables(plan.phy2log[0], ranks, experts, device)
    w = torch.as_tensor(load[0], device=device)
    row = {
        "experts": experts,
        "ep": ranks,
        "redundant": redundant,
        "replicated_experts": int(tables.replicated.numel()),
        "iterations": iterations,
        "vs_bound_worst": float(min(ratios)),
        "vs_bound_mean": float(np.mean(ratios)),
        "us_eager": _time(lambda: balanced_shares(w, tables, iterations), device, repeats),
    }

    def split(x):
        return copy_bounds(balanced_shares(x, tables, iterations))

    if device.type == "cuda":
        row["kernels"] = _kernels(split, w)
        graph, _, out = _graph_of(split, w)
        row["graph_equal"] = bool(torch.equal(out, split(w)))
        row["us_cuda_graph"] = _time(graph.replay, device, repeats)
    if compiled:
        # The same split through torch.compile (inductor fuses the ~470 small ops into a few kernels).
        t0 = time.perf_counter()
        fused = torch.compile(split, fullgraph=True, dynamic=False)
        row["compiled_equal"] = bool(torch.equal(fused(w), split(w)))
        row["compile_s"] = time.perf_counter() - t0
        row["us_compiled"] = _time(lambda: fused(w), device, repeats)
        if device.type == "cuda":
            row["kernels_compiled"] = _kernels(fused, w)
            graph, _, out = _graph_of(fused, w)
            row["compiled_graph_equal"] = bool(torch.equal(out, split(w)))
            row["us_compiled_graph"] = _time(graph.replay, device, repeats)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=None)
    parser.add_argument("--compile", action="store_true", help="also time the split through torch.compile")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    rows = [bench(e, n, r, device, args.iterations, args.repeats, args.compile) for e, n, r in SETTINGS]
    print(
        f"{'E':>5}{'EP':>5}{'R':>5}{'K':>5}{'worst':>8}{'mean':>8}{'us eager':>10}{'us graph':>10}{'kernels':>9}"
    )
    for r in rows:
        print(
            f"{r['experts']:>5}{r['ep']:>5}{r['redundant']:>5}{r['replicated_experts']:>5}{r['vs_bound_worst']:>8.4f}"
            f"{r['vs_bound_mean']:>8.4f}{r['us_eager']:>10.0f}{r.get('us_cuda_graph', float('nan')):>10.0f}"
            f"{r.get('kernels', 0):>9}"
        )
    if args.compile:
        print(
            f"{'E':>5}{'EP':>5}{'R':>5}{'equal':>7}{'compile s':>11}{'us compiled':>13}{'us graph':>10}{'kernels':>9}"
        )
        for r in rows:
            print(
                f"{r['experts']:>5}{r['ep']:>5}{r['redundant']:>5}{str(r['compiled_equal']):>7}{r['compile_s']:>11.1f}"
                f"{r['us_compiled']:>13.0f}{r.get('us_compiled_graph', float('nan')):>10.0f}{r.get('kernels_compiled', 0):>9}"
            )
    print(
        f"device {device}; K = replicated experts of the timed layer; worst/mean = bound's busiest rank / split's"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": str(device), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
