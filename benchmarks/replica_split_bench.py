"""The ``balanced`` dispatch's split (:func:`megatron_eplb.replica_split.balanced_shares`): time per call and
quality against the exact bound; on CUDA also the fused Triton kernel
(:mod:`megatron_eplb.replica_split_triton`), checked bitwise against the torch split.

    .venv/bin/python benchmarks/replica_split_bench.py [--device cuda] [--out results.json] [--route-only]

Per setting (experts, EP, redundant slots): a greedy placement planned on one load, split of another load
(the split only sees this batch): microseconds per call (eager; on CUDA also replayed as a CUDA graph, the
split has no host sync and static shapes), kernels per call (CUDA), and the worst and mean ratio of the
bound's busiest rank to the split's (1.0 = as good as an LP) over 16 layers.

The fused kernel (CUDA with triton; "n/a" elsewhere): microseconds per call launched directly (back to back,
so the larger of the host's launch cost and the kernel's GPU time), replayed as a CUDA graph, the kernel's
own GPU time (profiler), kernels per call, ``BalancedSplit``'s whole call (the patch's cost: direct launch and
in a graph), and whether it equals ``copy_bounds(balanced_shares(...))`` on the setting's 16 layers x 8 loads.
Before the timings, :func:`check_fused` compares it bitwise on further random placements and loads (1 to 8
copies, up to 64 replicated experts, one rank, no replicas, ties, zeros, large counts, 0 to 16 rounds).
Exit status 1 if the kernel disagrees on any row, fails, or (on CUDA) triton does not import
(``--skip-triton`` to time the torch split alone).

The routing onto slots that consumes the split (``route_to_slots`` of ``patches/megatron/dispatchers.py``), at
a layer's sizes (:data:`ROUTE_SETTINGS`: 8192 tokens, E = 64, P = 72, top-8; E = 32, P = 40, top-4; the default
placement over 8 ranks; fp32 and bf16 probs): microseconds per call, forward and forward + backward in
``probs``, by replica dispatch (even round-robin, balanced split) and path (the torch functions; on CUDA with
triton also the public ``route_to_slots``, which takes the fused kernels of
:mod:`megatron_eplb.slot_routing_triton`, checked bitwise against the torch path: exit status 1 if it differs
or fell back); on CUDA their kernels and GPU time per forward and per forward + backward (profiler), on CPU
the aten ops per forward.  ``--route-only`` times this part alone (``--out`` then writes its rows).
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
    device_tables,
    rank_loads_of_shares,
    replica_tables,
    source_offsets,
)

SETTINGS = [(16, 2, 2), (16, 4, 4), (64, 8, 8), (64, 8, 16), (256, 32, 32), (256, 64, 64)]

# route_bench's layers: (tokens, experts, redundant slots, top-k, EP ranks)
ROUTE_SETTINGS = [(8192, 64, 8, 8, 8), (8192, 32, 8, 4, 8)]

# check_fused's placements: (experts, ranks, slots per rank, most copies, empty slots)
CHECK_SHAPES = [
    (4, 1, 6, 3, 0),  # N = 1: every copy on the one rank
    (8, 2, 5, 2, 0),
    (8, 2, 8, 8, 1),
    (8, 4, 16, 8, 0),  # every expert 8 copies: C = 8
    (16, 4, 5, 2, 0),
    (16, 4, 8, 5, 2),
    (32, 8, 5, 3, 0),
    (30, 3, 12, 4, 3),  # nothing a power of two
    (64, 8, 9, 2, 0),
    (64, 16, 8, 8, 0),
    (64, 32, 6, 8, 0),  # ~60 replicated experts, C ~ 7
    (100, 20, 7, 3, 1),
    (256, 32, 9, 2, 0),
    (256, 64, 5, 2, 0),
]


def random_placement(
    rng, experts: int, ranks: int, slots_per_rank: int, copies: int, empty: int = 0
) -> np.ndarray:
    """A random ``phy2log`` row ``[ranks * slots_per_rank]``: every expert once, the other slots extra copies
    (at most ``copies`` per expert, copies of one expert may share a rank) and ``empty`` (or more) empty slots."""
    slots = ranks * slots_per_rank
    extra = slots - experts - empty
    if extra < 0:
        raise ValueError(f"{slots} slots cannot hold {experts} experts and {empty} empty slots")
    room = np.repeat(np.arange(experts), copies - 1)
    extras = rng.choice(room, size=min(extra, room.shape[0]), replace=False)
    empty += extra - extras.shape[0]
    row = np.concatenate([np.arange(experts), extras, np.full(empty, -1)]).astype(np.int64)
    rng.shuffle(row)
    return row


def check_loads(rng, experts: int) -> np.ndarray:
    """int64 ``[8, E]``: uniform, skewed (gamma), all tied, all zero, mostly zero, one hot expert, large
    counts (up to 2**26), tiny counts (many ties)."""
    hot = np.zeros(experts, dtype=np.int64)
    hot[rng.integers(experts)] = 100_000
    return np.stack(
        [
            rng.integers(0, 1000, size=experts),
            (rng.gamma(0.3, size=experts) * 4000).astype(np.int64),
            np.full(experts, 37),
            np.zeros(experts, dtype=np.int64),
            rng.integers(0, 50, size=experts) * (rng.random(experts) < 0.3),
            hot,
            rng.integers(0, 1 << 26, size=experts),
            rng.integers(0, 4, size=experts),
        ]
    ).astype(np.int64)


def fused_mismatches(loads: torch.Tensor, tables, iterations: int, what: str) -> tuple[int, list[str]]:
    """Rows where the fused kernel's bounds differ from ``copy_bounds(balanced_shares(...))``.

    Args:
        loads: int64 ``[B, E]`` on the tables' device.
    Returns:
        ``(rows checked, descriptions of the rows that differ)``."""
    from megatron_eplb.replica_split_triton import balanced_bounds

    want = copy_bounds_batched(balanced_shares(loads, tables, iterations))  # [B, E, C - 1]
    bad = []
    for i in range(loads.shape[0]):
        got = balanced_bounds(loads[i], tables, iterations)
        if not torch.equal(got, want[i]):
            rows = (got != want[i]).any(1).nonzero().flatten().tolist()
            bad.append(f"{what} iterations={iterations} load#{i}: experts {rows[:8]} differ")
    return loads.shape[0], bad


def copy_bounds_batched(shares: torch.Tensor) -> torch.Tensor:
    """``copy_bounds`` of int64 ``[B, E, C]`` shares: ``[B, E, C - 1]``."""
    return shares.cumsum(dim=-1)[..., :-1].contiguous()


def check_fused(device: torch.device, seeds: int = 3) -> tuple[int, list[str]]:
    """The fused kernel against the torch split on :data:`CHECK_SHAPES` (``seeds`` placements each, 8 loads,
    8 rounds; one shape also 0, 1, 2, 3 and 16 rounds) and on a layer with no replicas.

    Returns:
        ``(rows checked, descriptions of the rows that differ)``."""
    rows, bad = 0, []
    for experts, ranks, slots, copies, empty in CHECK_SHAPES:
        rng = np.random.default_rng(experts * 1000 + ranks * 10 + copies)
        for seed in range(seeds):
            row = random_placement(rng, experts, ranks, slots, copies, empty)
            tables = replica_tables(row, ranks, experts, device)
            loads = torch.as_tensor(check_loads(rng, experts), device=device)
            what = f"E={experts} N={ranks} K={tables.replicated.numel()} C={tables.copy_rank.shape[1]} seed {seed}"
            for iterations in (0, 1, 2, 3, 8, 16) if experts == 16 and copies == 5 else (DEFAULT_ITERATIONS,):
                n, b = fused_mismatches(loads, tables, iterations, what)
                rows, bad = rows + n, bad + b
    tables = replica_tables(np.array([1, 0, -1, 2, 3, -1]), 2, 4, device)  # no replicas: C = 1, no bounds
    n, b = fused_mismatches(
        torch.as_tensor(check_loads(np.random.default_rng(0), 4), device=device), tables, 8, "K=0"
    )
    return rows + n, bad + b


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
    return _profile(fn, w)[0]


def _profile(fn, w: torch.Tensor, repeats: int = 1) -> tuple[int, float]:
    """``(CUDA kernels per call, their summed GPU time per call in us)`` of ``fn(w)`` (the profiler's)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn(w)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.time_range.elapsed_us() for e in events)
    return len(events) // repeats, busy / repeats


def bench(
    experts: int,
    ranks: int,
    redundant: int,
    device: torch.device,
    iterations: int,
    repeats: int,
    compiled: bool = False,
    fused: bool = False,
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
        "copies": int(tables.copy_rank.shape[1]),
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
    if fused:
        try:
            row.update(_bench_fused(plan.phy2log, load, ranks, experts, device, iterations, repeats))
        except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON, exit status 1
            row.update(triton_error=repr(exc), triton_equal=False, triton_mismatches=[repr(exc)])
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


def _bench_fused(phy2log, load, ranks, experts, device, iterations, repeats) -> dict:
    """The fused kernel's columns for one setting (CUDA): see the module's docstring."""
    from megatron_eplb.replica_split import BalancedSplit
    from megatron_eplb.replica_split_triton import balanced_bounds, fits

    rng = np.random.default_rng(experts + ranks)
    rows, bad, fitting = 0, [], []
    for layer in range(phy2log.shape[0]):
        tables = replica_tables(phy2log[layer], ranks, experts, device)
        if not fits(experts, tables.copy_rank.shape[1], tables.replicated.numel(), ranks):
            continue  # BalancedSplit keeps the graph path for this layer
        fitting.append(layer)
        loads = np.concatenate([load[layer : layer + 1], check_loads(rng, experts)[1:]])
        n, b = fused_mismatches(torch.as_tensor(loads, device=device), tables, iterations, f"layer {layer}")
        rows, bad = rows + n, bad + b
    out = {"triton_rows": rows, "triton_mismatches": bad, "triton_equal": not bad}
    out["layers_too_large"] = phy2log.shape[0] - len(fitting)
    if not fitting:
        return out
    first = fitting[0]  # timed: the first layer the kernel takes (the other columns time layer 0)
    out["triton_timed_layer"] = first
    tables = replica_tables(phy2log[first], ranks, experts, device)
    w = torch.as_tensor(load[first], device=device)

    def kernel(x):
        return balanced_bounds(x, tables, iterations)

    repeats = max(10 * repeats, 500)  # tens of microseconds a call: more calls for a steady mean
    out["us_triton"] = _time(lambda: kernel(w), device, repeats)
    out["kernels_triton"], out["us_triton_gpu"] = _profile(kernel, w, repeats=50)
    graph, _, result = _graph_of(kernel, w)
    out["triton_graph_equal"] = bool(torch.equal(result, copy_bounds(balanced_shares(w, tables, iterations))))
    out["us_triton_graph"] = _time(graph.replay, device, repeats)
    for in_graph in (False, True):
        BalancedSplit.FUSED_IN_GRAPH = in_graph
        call = BalancedSplit(replica_tables(phy2log[first], ranks, experts, device), iterations)
        key = "us_split_call_graph" if in_graph else "us_split_call"
        out[key] = _time(lambda call=call: call(w), device, repeats)
        out[key.replace("us_", "path_")] = call.path
    BalancedSplit.FUSED_IN_GRAPH = True
    return out


def route_bench(
    tokens: int,
    experts: int,
    redundant: int,
    topk: int,
    ranks: int,
    device: torch.device,
    repeats: int,
    dtype: torch.dtype = torch.float32,
    fused: bool = False,
) -> list[dict]:
    """``route_to_slots`` on one layer (default placement, random top-k routing): one row per replica dispatch
    (``even``: round-robin; ``balanced``: this batch's split, computed outside the timed call) and path
    (``torch``: :func:`~megatron_eplb.slot_routing.route_to_slots_torch`; with ``fused``, also ``fused``: the
    public :func:`~megatron_eplb.slot_routing.route_to_slots`, which takes the Triton kernels on CUDA, checked
    bitwise against the torch path: outputs and the gradient of ``probs``)."""
    from torch.profiler import ProfilerActivity, profile

    from megatron_eplb import slot_routing
    from megatron_eplb.placement import ExpertPlacement
    from megatron_eplb.slot_routing import SlotTables, route_to_slots_torch, slot_tables

    placement = ExpertPlacement.default(1, experts, ranks, redundant)
    slots = experts + redundant
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, experts, generator=gen)
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool)
    routing_map.scatter_(1, logits.topk(topk, dim=1).indices, True)
    probs = (torch.softmax(logits, dim=1) * routing_map).to(dtype).to(device).requires_grad_()
    routing_map = routing_map.to(device)
    upstream = torch.randn(tokens, slots, generator=gen).to(dtype).to(device)
    tables = slot_tables(torch.tensor(placement.log2phy[0]), torch.tensor(placement.replica_count[0]))
    tables = SlotTables(*device_tables(list(tables), device))  # built on the host, as the handle does
    counts = torch.stack([routing_map.sum(0)] * ranks)  # every source rank routes alike
    split_tables = replica_tables(placement.phy2log[0], ranks, experts, device)
    split = (source_offsets(counts)[1], copy_bounds(balanced_shares(counts.sum(0), split_tables)))
    paths = {"torch": route_to_slots_torch}
    if fused:
        paths["fused"] = slot_routing.route_to_slots
    rows = []
    for dispatch, kwargs in (("even", dict(offset=1)), ("balanced", dict(split=split))):
        want = None
        for path, route in paths.items():

            def forward(kwargs=kwargs, route=route):
                return route(probs, routing_map, tables, slots, **kwargs)

            def forward_backward(kwargs=kwargs, route=route):
                phys_probs, _ = forward(kwargs, route)
                phys_probs.backward(upstream)

            probs.grad = None
            phys_probs, phys_map = forward()
            phys_probs.backward(upstream)
            got = (phys_map, _bits(phys_probs.detach()), _bits(probs.grad).clone())  # grad: accumulated below
            want = got if want is None else want
            row = {
                "tokens": tokens,
                "experts": experts,
                "slots": slots,
                "topk": topk,
                "spread_experts": int(tables.spread.numel()),
                "dtype": str(dtype).replace("torch.", ""),
                "dispatch": dispatch,
                "path": path,
                "bitwise_equal_torch": all(torch.equal(a, b) for a, b in zip(got, want)),
                "us_forward": _time(forward, device, repeats),
                "us_forward_backward": _time(forward_backward, device, repeats),
            }
            if path == "fused":
                row["fused_failed"] = slot_routing._FUSED_FAILED  # a failed launch: the torch path ran
            if device.type == "cuda":
                # replayed as a CUDA graph (no grad): the GPU-bound cost, no host time per kernel
                with torch.no_grad():
                    graph, _, _ = _graph_of(lambda _: forward(), probs)
                row["us_graph_forward"] = _time(graph.replay, device, repeats)
                row["kernels_forward"], row["us_gpu_forward"] = _profile(
                    lambda _: forward(), None, repeats=20
                )
                row["kernels_forward_backward"], row["us_gpu_forward_backward"] = _profile(
                    lambda _: forward_backward(), None, repeats=20
                )
            else:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    forward()
                row["aten_ops_forward"] = sum(
                    e.name.startswith("aten::")
                    and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
                    for e in prof.events()
                )
            rows.append(row)
    return rows


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view({4: torch.int32, 2: torch.int16}[x.element_size()])


def _print_route(rows: list[dict], device: torch.device) -> None:
    ops = "kernels" if device.type == "cuda" else "aten ops"
    print(
        f"{'T':>6}{'E':>4}{'P':>4}{'top':>4}{'K':>4}{'dtype':>10}{'dispatch':>10}{'path':>7}{'equal':>7}"
        f"{'us fwd':>9}{'us fwd+bwd':>12}{'us graph':>10}{ops:>9}{'us GPU':>8}{'bwd ' + ops:>13}{'us GPU':>8}"
    )
    for r in rows:
        print(
            f"{r['tokens']:>6}{r['experts']:>4}{r['slots']:>4}{r['topk']:>4}{r['spread_experts']:>4}{r['dtype']:>10}"
            f"{r['dispatch']:>10}{r['path']:>7}{str(r['bitwise_equal_torch']):>7}"
            f"{r['us_forward']:>9.0f}{r['us_forward_backward']:>12.0f}{r.get('us_graph_forward', float('nan')):>10.1f}"
            f"{r.get('kernels_forward', r.get('aten_ops_forward', 0)):>9}{r.get('us_gpu_forward', float('nan')):>8.1f}"
            f"{r.get('kernels_forward_backward', 0):>13}{r.get('us_gpu_forward_backward', float('nan')):>8.1f}"
        )
    print(
        f"route_to_slots on {device}: K = spread (replicated) experts; path torch = route_to_slots_torch, fused ="
        " route_to_slots (the Triton kernels on CUDA); equal = bitwise the torch path (outputs, gradient of"
        f" probs); us = host wall per call back to back (us graph: the forward replayed as one CUDA graph); {ops}"
        " and us GPU per forward and per forward + backward (profiler; the split itself not included)"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=None)
    parser.add_argument("--compile", action="store_true", help="also time the split through torch.compile")
    parser.add_argument(
        "--skip-triton", action="store_true", help="no fused kernel columns (CUDA without triton)"
    )
    parser.add_argument("--route-only", action="store_true", help="time route_to_slots alone (no split)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    route_fused = device.type == "cuda" and not args.skip_triton
    if route_fused:
        from megatron_eplb import slot_routing_triton

        route_fused = slot_routing_triton.available()
        if not route_fused:
            print("triton does not import here: route_to_slots timed on its torch path only")
    route_rows = [
        row
        for setting in ROUTE_SETTINGS
        for dtype in (torch.float32, torch.bfloat16)
        for row in route_bench(*setting, device, args.repeats, dtype, route_fused)
    ]
    _print_route(route_rows, device)
    route_bad = [r for r in route_rows if not r["bitwise_equal_torch"] or r.get("fused_failed")]
    if route_bad:
        print(
            f"FAILED: {len(route_bad)} fused route_to_slots rows differ from the torch path or fell back to it"
        )
    if args.route_only:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"device": str(device), "route": route_rows}, indent=1))
        return 1 if route_bad else 0
    fused, status, check = _fused_status(device, args.skip_triton)
    status = 1 if route_bad else status
    if fused:
        t0 = time.perf_counter()
        try:
            rows_checked, bad = check_fused(device)
        except Exception as exc:  # noqa: BLE001 - reported, exit status 1
            rows_checked, bad, fused = 0, [f"the fused kernel failed: {exc!r}"], False
            status = 1
        check = {"rows": rows_checked, "mismatches": bad, "seconds": time.perf_counter() - t0}
        print(
            f"fused kernel vs torch split: {rows_checked} rows, {len(bad)} differ ({check['seconds']:.0f} s)"
        )
        for line in bad[:20]:
            print("  MISMATCH", line)
        status = 1 if bad else status
    rows = [
        bench(e, n, r, device, args.iterations, args.repeats, args.compile, fused) for e, n, r in SETTINGS
    ]
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
        f"{'E':>5}{'EP':>5}{'R':>5}{'C':>3}{'fused equal':>13}{'us direct':>11}{'us graph':>10}{'us GPU':>8}"
        f"{'kernels':>9}{'us call':>9}{'us call graph':>15}"
    )
    for r in rows:
        if "us_triton" not in r:
            print(
                f"{r['experts']:>5}{r['ep']:>5}{r['redundant']:>5}{'':>3}{r.get('triton_error', 'n/a'):>13}"
            )
            status = 1 if "triton_error" in r else status
            continue
        print(
            f"{r['experts']:>5}{r['ep']:>5}{r['redundant']:>5}{r['copies']:>3}"
            f"{str(r['triton_equal'] and r['triton_graph_equal']) + ' /' + str(r['triton_rows']):>13}"
            f"{r['us_triton']:>11.1f}{r['us_triton_graph']:>10.1f}{r['us_triton_gpu']:>8.1f}{r['kernels_triton']:>9}"
            f"{r['us_split_call']:>9.1f}{r['us_split_call_graph']:>15.1f}"
        )
        if not (r["triton_equal"] and r["triton_graph_equal"]):
            status = 1
            for line in r["triton_mismatches"][:10]:
                print("  MISMATCH", line)
    print(
        f"device {device}; K = replicated experts of the timed layer; worst/mean = bound's busiest rank / split's;"
        " fused: us direct = launched back to back, us graph = one graph replay, us GPU = kernel time (profiler),"
        " us call = BalancedSplit's call (direct / FUSED_IN_GRAPH)"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        result = {"device": str(device), "fused_check": check, "rows": rows, "route": route_rows}
        Path(args.out).write_text(json.dumps(result, indent=1))
    if status:
        print("FAILED: the fused kernel disagrees with the torch split or did not run (see above)")
    return status


def _fused_status(device: torch.device, skip: bool) -> tuple[bool, int, dict]:
    """``(time the fused kernel, exit status so far, check record)``: CUDA with triton, unless skipped."""
    if device.type != "cuda":
        return False, 0, {"skipped": "not CUDA: n/a"}
    if skip:
        return False, 0, {"skipped": "--skip-triton"}
    from megatron_eplb import replica_split_triton

    if not replica_split_triton.available():
        print(
            "FAILED: triton does not import here; the fused kernel was not checked (--skip-triton to skip it)"
        )
        return False, 1, {"skipped": "triton does not import"}
    return True, 0, {}


if __name__ == "__main__":
    sys.exit(main())
