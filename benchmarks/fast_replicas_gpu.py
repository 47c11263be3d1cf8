"""Per-step replicas (issue #20) on the GPU: one MoE layer whose hot experts change every step, off vs
persistent-only EPLB vs the fast path.

Usage (one process per GPU; NCCL + CUDA, bf16)::

    torchrun --nproc_per_node 2 benchmarks/fast_replicas_gpu.py     # EP = 2
    torchrun --nproc_per_node 1 benchmarks/fast_replicas_gpu.py     # EP = 1: nothing to balance (a smoke run)
    python benchmarks/fast_replicas_gpu.py --planner only           # the per-step plan alone (no Megatron)
    (``python -m torch.distributed.run`` where no ``torchrun`` script is on PATH)

Without CUDA it runs on CPU with gloo and ``--small`` sizes: a smoke test of the script, its times mean nothing.
Writes ``--out`` (default ``benchmarks/results/fast_replicas_gpu_ws<N>_<cuda|cpu>.json``), prints a table.

One Megatron-core ``MoELayer`` (``benchmarks/step_time_skew.py``'s: alltoall dispatcher, EP = world size, bf16,
hidden 4096, expert FFN 2048, 64 experts, top-8, 8192 tokens per rank; ``--kinds grouped`` = the legacy
``GroupedMLP`` on grouped GEMM, the default, or ``sequential``).  The routing is skewed differently at every
step: ``--hot`` experts drawn at random per step (the same on every rank) get ``--bias`` added to their router
logits, so the hot experts follow the batch and no placement planned from past steps can follow them.  Each
variant runs the same ``--steps`` skew patterns (after ``--warmup`` steps):

* ``off``: the unpatched layer (Megatron's placement);
* ``persistent``: EPLB with ``EP x --budget`` redundant slots, planned (greedy) on the sum of all the steps'
  loads (the best a window could do for this workload) with the per-batch ``balanced`` split;
* ``fast``: the default placement with ``--budget`` spare slots per rank refilled every step
  (``eplb_fast_replicas``): the same slot count;
* ``fast_planned``: ``fast`` on a greedy placement planned on the sum (no persistent redundant slot);
* ``fast_own_group``: ``fast`` with the copies' all-to-all on a communicator of its own
  (``FastReplicas.use_separate_group``), so that on NCCL it runs beside the token dispatch, not before it.

Per variant: the median and worst of the slowest rank's forward+backward time (CUDA events), the worst step
over the median, the per-step realized balancedness (tokens each rank's experts computed, counted in a second
pass over the same patterns), the exposed time of the copies' fetch (the compute stream's wait for the
all-to-all started at routing, plus the gradients' way back in backward: CUDA events around both), the peak
memory, the fast path's buffer bytes (``FastReplicas.memory_report``), and the equivalence of
each EPLB variant with the unpatched layer (bf16: output, input / router / expert gradients).

The per-step plan itself (CUDA, rank 0, before the layer; ``--planner only``: nothing else, one process, no
Megatron, ``benchmarks/results/fast_replicas_planner_cuda.json``; ``--planner off``: skipped): first
:func:`check_fused_plan` compares the fused Triton kernel (:mod:`megatron_eplb.fast_replicas_triton`) bitwise
with ``plan_fast_replicas`` in every output on random placements (persistent replicas, empty slots) and
adversarial loads (zeros, one hot expert, ties, all equal, counts near ``2**40``), 3 placements per shape; then
per shape of :data:`PLANNER_SHAPES` (and this run's layer when EP > 1), microseconds per call of
``FastPlanner`` on the graph path (the torch plan replayed as a CUDA graph), ``FastPlanner`` on the fused kernel
(replayed in a one-kernel graph: the default; and launched directly), the bare kernel launched back to back and
its GPU time (profiler), and whether the fused plans equal the torch planner's on 20 skewed steps and the
adversarial loads.  Shapes too large for the kernel's one block (``fits``) get the graph column only.  Written
under ``"planner"`` in the JSON, its table printed after the layer's.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import apply_preset  # noqa: E402
from step_time_skew import (  # noqa: E402
    EQUIVALENCE_KEYS,
    EQUIVALENCE_RTOL,
    Layer,
    _align,
    _gather_floats,
    _input,
    _nccl_version,
    _sync,
    equivalence,
    grouped_gemm_source,
    init_distributed,
)

CUDA = torch.cuda.is_available()
FULL = dict(hidden=4096, ffn=2048, experts=64, topk=8, tokens=8192, warmup=5, steps=40)
SMALL = dict(hidden=64, ffn=64, experts=8, topk=2, tokens=128, warmup=1, steps=4)
VARIANTS = ("off", "persistent", "fast", "fast_planned", "fast_own_group")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--small", action="store_true", help="tiny sizes (the default without CUDA)")
    p.add_argument("--kinds", default="grouped", help="comma-separated: grouped, sequential")
    for key in FULL:
        p.add_argument(f"--{key}", type=int, default=None, help=f"default {FULL[key]} ({SMALL[key]} small)")
    p.add_argument("--hot", type=int, default=None, help="hot experts per step (default experts / 16, >= 1)")
    p.add_argument("--bias", type=float, default=1.5, help="logit bias of the hot experts")
    p.add_argument("--budget", type=int, default=1, help="spare slots per rank (fast) = redundant per rank")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--planner",
        choices=("on", "off", "only"),
        default="on",
        help="the per-step plan's timing (CUDA, rank 0): graph path vs fused kernel; 'only': no layer",
    )
    p.add_argument("--planner-repeats", type=int, default=200, help="calls timed per planner column")
    args = p.parse_args(argv)
    apply_preset(args, SMALL, FULL)
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.variants = [v for v in args.variants.split(",") if v]
    args.hot = args.hot or max(1, args.experts // 16)
    return args


def patterns(args) -> torch.Tensor:
    """float32 ``[steps, E]``: each step's logit bias (``--hot`` random experts get ``--bias``)."""
    gen = torch.Generator().manual_seed(args.seed + 7)
    out = torch.zeros(args.steps, args.experts)
    for t in range(args.steps):
        out[t, torch.randperm(args.experts, generator=gen)[: args.hot]] = args.bias
    return out


class FetchTimer:
    """CUDA events on the compute stream around the wait for the copies' fetch (forward: started at routing,
    asynchronously, so this is the part not hidden) and around the gradients' way back (backward, synchronous)."""

    def __init__(self) -> None:
        from megatron_eplb.patches.megatron import fast_replicas

        self.cls = fast_replicas._LayerFetch
        self.original = (self.cls.finish, self.cls.send_back)
        self.pairs: list[tuple] = []
        timer = self

        def timed(fn):
            def wrapper(self_, *a, **k):
                if not CUDA:
                    return fn(self_, *a, **k)
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(self_, *a, **k)
                stop.record()
                timer.pairs.append((start, stop))
                return out

            return wrapper

        self.cls.finish = timed(self.original[0])
        self.cls.send_back = timed(self.original[1])

    def take_ms(self) -> float:
        _sync()
        ms = sum(a.elapsed_time(b) for a, b in self.pairs)
        self.pairs.clear()
        return ms

    def remove(self) -> None:
        self.cls.finish, self.cls.send_back = self.original


def step_loads(layer: Layer, x: torch.Tensor, skew: torch.Tensor, pats: torch.Tensor) -> np.ndarray:
    """int64 ``[steps, E]`` global loads of every pattern (the router's routing)."""
    from step_time_skew import expert_load

    out = []
    for t in range(pats.shape[0]):
        skew.copy_(pats[t].to(skew.device))
        out.append(expert_load(layer, x))
    return np.stack(out)


def run_variant(name, kind, args, device, skew, pats, x, grad, loads, ref) -> dict:
    from megatron_eplb.patches import megatron as eplb_mcore

    from megatron_eplb.placement import ExpertPlacement
    from megatron_eplb.policy import rebalance

    world = dist.get_world_size()
    _align(device)
    if CUDA:
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    layer = ref if name == "off" else Layer(kind, args, device, skew)
    total = loads.sum(0).astype(np.float64)[None]
    fast, placement = 0, None
    if name == "persistent":
        placement = rebalance(total, args.experts + world * args.budget, world, policy="greedy")
    elif name == "fast":
        placement, fast = ExpertPlacement.default(1, args.experts, world, 0), args.budget
    elif name == "fast_planned":
        placement, fast = rebalance(total, args.experts, world, policy="greedy"), args.budget
    elif name == "fast_own_group":
        placement, fast = ExpertPlacement.default(1, args.experts, world, 0), args.budget
    if name != "off":
        layer.handle = eplb_mcore.apply(layer.module, placement, fast_replicas=fast)
        layer.placement = placement
        if name == "fast_own_group":  # the copies on a communicator of their own, beside the token dispatch
            layer.handle.fast.use_separate_group()
    timer = FetchTimer() if fast else None
    module = layer.module
    ms, fetch_ms = [], []
    gc.collect()
    gc.disable()
    for it in range(args.warmup + args.steps):
        skew.copy_(pats[it % args.steps].to(skew.device))
        module.zero_grad(set_to_none=True)
        x.grad = None
        _align(device)
        t0 = time.perf_counter()
        if CUDA:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        y = module(x)[0]
        y.backward(grad)
        if CUDA:
            stop.record()
            _sync()
            elapsed = start.elapsed_time(stop)
        else:
            elapsed = (time.perf_counter() - t0) * 1e3
        f = timer.take_ms() if timer is not None else 0.0
        if it >= args.warmup:
            ms.append(elapsed)
            fetch_ms.append(f)
        del y
    gc.enable()
    peak = (torch.cuda.max_memory_allocated(device) - base_mem) if CUDA else 0
    slowest = _gather_floats(ms, device).max(axis=0)
    fetch = _gather_floats(fetch_ms, device).max(axis=0)
    # Realized per-step balancedness: the tokens each rank's experts compute, per pattern (a second pass).
    counts: list[torch.Tensor] = []
    experts = module.experts
    inner = experts.forward

    def counted(*a, **k):
        counts.append(torch.as_tensor(a[1]).detach().to("cpu", torch.int64).sum())
        return inner(*a, **k)

    experts.forward = counted
    per_step = []
    with torch.no_grad():
        for t in range(args.steps):
            skew.copy_(pats[t].to(skew.device))
            counts.clear()
            module(x)
            ranks = _gather_floats([float(counts[0])], device)[:, 0]
            per_step.append(float(ranks.mean() / ranks.max()) if ranks.max() > 0 else 1.0)
    experts.forward = inner
    row = {
        "variant": name,
        "kind": kind,
        "median_ms": float(np.median(slowest)),
        "worst_ms": float(slowest.max()),
        "worst_over_median": float(slowest.max() / np.median(slowest)),
        "fetch_median_ms": float(np.median(fetch)),
        "balancedness_mean": float(np.mean(per_step)),
        "balancedness_worst": float(np.min(per_step)),
        "peak_memory_bytes": int(peak),
        "slots_per_rank": str(args.experts // world)
        if layer.handle is None
        else f"{layer.handle.slots_per_rank}" + (f"+{fast} spare" if fast else ""),
    }
    if fast:
        row["memory_report"] = layer.handle.fast.memory_report()
        row["copies_fetched_per_layer_forward_rank0"] = layer.handle.fast.fetched / max(
            layer.handle.fast.forwards, 1
        )
    if timer is not None:
        timer.remove()
    if name != "off":
        skew.copy_(pats[0].to(skew.device))
        row["equivalence"] = equivalence(ref, layer, x, grad)
        layer.free()
    return row


# ------------------------------------------------------------------ the per-step plan: fused kernel vs graph
# check_fused_plan's placements: (experts, ranks, slots per rank, spare slots per rank, empty slots); redundant
# slots = ranks * slots - experts - empty (persistent replicas, some on one rank twice by chance)
CHECK_SHAPES = [
    (8, 2, 4, 1, 0),
    (8, 2, 5, 2, 1),
    (12, 3, 5, 1, 1),
    (16, 4, 4, 2, 0),
    (16, 4, 6, 1, 2),
    (24, 6, 5, 2, 3),
    (32, 8, 4, 1, 0),
    (32, 8, 6, 2, 4),
    (48, 5, 11, 2, 2),
    (64, 8, 8, 1, 0),
    (64, 8, 10, 2, 4),
]
# planner_rows' shapes: (experts, ranks, spare slots per rank, persistent redundant slots)
PLANNER_SHAPES = [
    (16, 2, 1, 0),
    (64, 8, 1, 0),
    (64, 8, 2, 0),
    (64, 8, 1, 8),
    (64, 16, 1, 0),
    (256, 8, 1, 0),
    (256, 64, 1, 0),
]


def random_row(rng, experts: int, ranks: int, slots: int, empty: int = 0) -> np.ndarray:
    """int64 ``[ranks * slots]`` persistent placement: every expert once, the other slots random experts
    (redundant copies) or ``empty`` empty slots (``-1``), shuffled."""
    extra = ranks * slots - experts - empty
    if extra < 0:
        raise ValueError(f"{ranks} x {slots} slots cannot hold {experts} experts and {empty} empty ones")
    row = np.concatenate([np.arange(experts), rng.integers(0, experts, extra), np.full(empty, -1)])
    return rng.permutation(row).astype(np.int64)


def check_loads(rng, experts: int) -> list[np.ndarray]:
    """int64 ``[E]`` loads: zeros, one hot expert (small and near ``2**40``), one token, two equal hot
    experts, all equal, ties (0..2), skewed counts, counts near ``2**40`` and large skewed ones."""
    e = experts
    hot = np.zeros(e, dtype=np.int64)
    hot[rng.integers(e)] = 1000
    huge = rng.integers(0, 50, e)
    huge[rng.integers(e)] = 1 << 40
    one = np.zeros(e, dtype=np.int64)
    one[rng.integers(e)] = 1
    two = rng.integers(0, 3, e)
    two[rng.choice(e, 2, replace=False)] = 777
    gamma = rng.gamma(0.3, size=e)
    return [
        np.zeros(e, dtype=np.int64),
        hot,
        huge,
        one,
        two,
        np.full(e, 7, dtype=np.int64),
        rng.integers(0, 3, e),
        rng.multinomial(4096 * 8, gamma / gamma.sum()),
        (1 << 40) - rng.integers(0, 1000, e),
        rng.integers(0, 1 << 40, e) * (rng.random(e) < 0.3),
    ]


def fused_plan_mismatches(tables, loads, iterations: int, what: str) -> tuple[int, list[str]]:
    """``(plans compared, descriptions of those that differ)``: the fused kernel against
    ``plan_fast_replicas(load[None], tables)`` in every output, on each of ``loads``."""
    from megatron_eplb.fast_replicas import plan_fast_replicas
    from megatron_eplb.fast_replicas_triton import plan_fast_replicas_fused

    bad = []
    for i, load in enumerate(loads):
        w = torch.as_tensor(np.asarray(load), dtype=torch.int64, device=tables.copy_rank.device)
        got = plan_fast_replicas_fused(w, tables, iterations)
        want = plan_fast_replicas(w[None], tables, iterations)
        differ = [
            k for k, a, b in zip(want._fields, got, want) if a.shape != b[0].shape or not torch.equal(a, b[0])
        ]
        if differ:
            bad.append(f"{what}, load {i} ({np.asarray(load).tolist()}): {', '.join(differ)} differ")
    return len(loads), bad


def check_fused_plan(
    device: torch.device, seeds: int = 1, iterations: int = 8, shapes=None, cross_node: bool = False
) -> tuple[int, list[str]]:
    """The fused plan against the torch planner on ``shapes`` (default :data:`CHECK_SHAPES`): ``seeds``
    placements each, the :func:`check_loads` on each; shapes the kernel does not take
    (:func:`~megatron_eplb.fast_replicas_triton.fits`) are skipped.  With ``cross_node`` an even ``N`` is also
    checked as 2 nodes under the cross-node rule (``m = 16``).  Returns ``(plans compared, mismatches)``."""
    from megatron_eplb.fast_replicas import fast_tables
    from megatron_eplb.fast_replicas_triton import fits

    rows, bad = 0, []
    for experts, ranks, slots, fast, empty in CHECK_SHAPES if shapes is None else shapes:
        for seed in range(seeds):
            rng = np.random.default_rng([experts, ranks, slots, fast, seed])
            row = random_row(rng, experts, ranks, slots, empty)
            nodes = ((1, 0), (2, 16)) if cross_node and ranks % 2 == 0 else ((1, 0),)
            loads = check_loads(rng, experts)
            for num_nodes, m in nodes:
                tables = fast_tables(
                    row, ranks, experts, fast, device, num_nodes=num_nodes, cross_node_min_gain=m
                )
                if not fits(experts, tables.copy_rank.shape[1], ranks, fast, tables.replicated.numel()):
                    continue
                what = f"E={experts} N={ranks} S={slots} F={fast} nodes={num_nodes} m={m} row={row.tolist()}"
                n, b = fused_plan_mismatches(tables, loads, iterations, what)
                rows, bad = rows + n, bad + b
    return rows, bad


def planner_rows(device: torch.device, shapes, repeats: int = 200, iterations: int = 8) -> list[dict]:
    """Per shape ``(experts, ranks, spare slots, persistent redundant slots)`` (CUDA): ``FastPlanner``'s call on
    the graph path and on the fused kernel's (replayed in a graph, and launched directly), the bare kernel
    launched back to back and its GPU time (profiler), each in microseconds per call, and whether the fused plans
    equal the torch planner's bitwise on skewed loads and :func:`check_loads`."""
    from megatron_eplb import fast_replicas_triton

    fused = fast_replicas_triton.available()
    return [_planner_row(*shape, device, repeats, iterations, fused) for shape in shapes]


def _planner_row(experts, ranks, fast, redundant, device, repeats, iterations, fused) -> dict:
    from replica_split_bench import _profile, _time

    from megatron_eplb.fast_replicas import FastPlanner, fast_tables
    from megatron_eplb.fast_replicas_triton import fits, launch_config, plan_fast_replicas_fused
    from megatron_eplb.placement import ExpertPlacement

    rng = np.random.default_rng(experts * 100 + ranks + fast + redundant)
    row = ExpertPlacement.default(1, experts, ranks, redundant).phy2log[0]
    tables = fast_tables(row, ranks, experts, fast, device)
    copies = tables.copy_rank.shape[1]
    gamma = rng.gamma(0.3, size=(20, experts))
    skewed = [rng.multinomial(8192 * 8, g / g.sum()) for g in gamma]
    w = torch.as_tensor(skewed[0], device=device)
    rec = {"experts": experts, "ranks": ranks, "fast": fast, "redundant": redundant, "copies": copies}
    rec["union_copies"] = tables.max_copies
    rec["fits"] = fits(experts, copies, ranks, fast, tables.replicated.numel())
    graph = FastPlanner(tables, iterations, fused=False)
    rec["path_graph"] = graph.path
    rec["us_graph_call"] = _time(lambda: graph(w), device, repeats)
    if not rec["fits"]:
        return rec
    if not fused:
        rec["fused_error"], rec["fused_equal"] = "triton does not import", False
        return rec
    rec["launch_config"] = launch_config(experts, copies, ranks, fast, tables.replicated.numel())

    def kernel(x):
        return plan_fast_replicas_fused(x, tables, iterations)

    try:
        n, bad = fused_plan_mismatches(tables, skewed + check_loads(rng, experts), iterations, "")
        rec["fused_rows"], rec["fused_mismatches"], rec["fused_equal"] = n, bad[:5], not bad
        many = max(5 * repeats, 500)  # tens of microseconds a call: more calls for a steady mean
        rec["us_fused_direct"] = _time(lambda: kernel(w), device, many)
        rec["kernels_fused"], rec["us_fused_gpu"] = _profile(kernel, w, repeats=50)
        for in_graph in (True, False):
            FastPlanner.FUSED_IN_GRAPH = in_graph
            call = FastPlanner(fast_tables(row, ranks, experts, fast, device), iterations)
            key = "us_fused_call_graph" if in_graph else "us_fused_call"
            got = [call(torch.as_tensor(x, device=device)) for x in skewed[:5]]
            want = [graph(torch.as_tensor(x, device=device)) for x in skewed[:5]]
            rec[key.replace("us_", "equal_")] = all(
                torch.equal(a, b) for p, q in zip(got, want) for a, b in zip(p, q)
            )
            rec[key] = _time(lambda call=call: call(w), device, many)
            rec[key.replace("us_", "path_")] = call.path
    except Exception as exc:  # noqa: BLE001 - reported in the row: the kernel failed here
        rec["fused_error"], rec["fused_equal"] = repr(exc), False
    finally:
        FastPlanner.FUSED_IN_GRAPH = True
    rec["fused_equal"] = rec["fused_equal"] and all(
        rec.get(k, True) for k in ("equal_fused_call_graph", "equal_fused_call")
    )
    return rec


def planner_table(rows: list[dict]) -> list[str]:
    """Markdown lines of :func:`planner_rows`."""

    def us(r, k):
        return f"{r[k]:.1f}" if k in r else "–"

    lines = [
        "| E | EP | F | C | D | fits | fused equal (plans) | graph call us | fused call (graph) us "
        "| fused call (direct) us | kernel direct us | kernel GPU us |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        equal = "–" if not r["fits"] else f"{r.get('fused_equal')} ({r.get('fused_rows', 0)})"
        if "fused_error" in r:
            equal = f"error: {r['fused_error'][:60]}"
        lines.append(
            f"| {r['experts']} | {r['ranks']} | {r['fast']} | {r['copies']} | {r['union_copies']} | {r['fits']} "
            f"| {equal} | {us(r, 'us_graph_call')} | {us(r, 'us_fused_call_graph')} | {us(r, 'us_fused_call')} "
            f"| {us(r, 'us_fused_direct')} | {us(r, 'us_fused_gpu')} |"
        )
    return lines


def run_planner(args, device: torch.device, world: int) -> dict:
    """The per-step plan on this GPU: :func:`check_fused_plan` (3 placements per shape), then
    :func:`planner_rows` on :data:`PLANNER_SHAPES` and this run's layer shape; prints its table."""
    from megatron_eplb import fast_replicas_triton

    started = time.time()
    out: dict = {"triton": fast_replicas_triton.available()}
    bad: list[str] = []
    if out["triton"]:
        try:
            plans, bad = check_fused_plan(device, seeds=3, cross_node=True)
        except Exception as exc:  # noqa: BLE001 - reported: the kernel failed here
            plans, bad = 0, [f"the fused kernel failed: {exc!r}"]
        out["check"] = {"plans": plans, "mismatch_count": len(bad), "mismatches": bad[:20]}
        print(f"fused plan vs torch planner: {plans} plans, {len(bad)} differ", flush=True)
    shapes = list(PLANNER_SHAPES)
    if world > 1 and (args.experts, world, args.budget, 0) not in shapes:  # this run's layer (world 0: none)
        shapes.append((args.experts, world, args.budget, 0))
    out["rows"] = planner_rows(device, shapes, args.planner_repeats)
    out["passed"] = (
        out["triton"] and not bad and all(r.get("fused_equal", False) for r in out["rows"] if r["fits"])
    )
    out["table"] = planner_table(out["rows"])
    out["seconds"] = round(time.time() - started, 1)
    print("\n".join(out["table"]), flush=True)
    print(f"fused plan: {'passed' if out['passed'] else 'FAILED'} ({out['seconds']:.0f} s)", flush=True)
    return out


def planner_main(args) -> dict:
    """``--planner only``: one process, no Megatron, no process group; writes
    ``benchmarks/results/fast_replicas_planner_<cuda|cpu>.json`` (or ``--out``)."""
    result: dict = {"script": "benchmarks/fast_replicas_gpu.py --planner only", "torch": torch.__version__}
    if not CUDA:
        print("--planner only needs CUDA (the fused kernel and the graph path); nothing timed", flush=True)
    else:
        import triton

        device = torch.device("cuda", torch.cuda.current_device())
        result.update(device=torch.cuda.get_device_name(device), triton=triton.__version__)
        result["planner"] = run_planner(args, device, world=0)
    name = f"fast_replicas_planner_{'cuda' if CUDA else 'cpu'}.json"
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}", flush=True)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.planner == "only":
        return planner_main(args)
    started = time.time()
    rank, world, device = init_distributed(args.seed)
    from megatron_eplb.patches import megatron as eplb_mcore

    source = grouped_gemm_source(device)
    if "grouped" in args.kinds and source.startswith("not needed"):
        args.kinds = [k for k in args.kinds if k != "grouped"] or ["sequential"]
    pats = patterns(args)
    skew = torch.zeros(args.experts, dtype=torch.float32, device=device)
    x, grad = _input(args.tokens, args, device, rank)
    planner = run_planner(args, device, world) if CUDA and rank == 0 and args.planner == "on" else None
    rows = []
    for kind in args.kinds:
        ref = Layer(kind, args, device, skew)
        loads = step_loads(ref, x, skew, pats)
        for name in args.variants:
            row = run_variant(name, kind, args, device, skew, pats, x, grad, loads, ref)
            rows.append(row)
            if rank == 0:
                print(
                    f"  {kind:10s} {name:13s} median {row['median_ms']:.2f} ms (worst {row['worst_over_median']:.2f}x), "
                    f"fetch {row['fetch_median_ms']:.2f} ms, balancedness {row['balancedness_mean']:.3f} "
                    f"(worst {row['balancedness_worst']:.3f})",
                    flush=True,
                )
        ref.free()
    checks = [r["equivalence"] for r in rows if "equivalence" in r]
    result = {
        "script": "benchmarks/fast_replicas_gpu.py",
        "device": torch.cuda.get_device_name(device) if CUDA else "cpu",
        "world_size": world,
        "torch": torch.__version__,
        "nccl": _nccl_version(),
        "python": platform.python_version(),
        "megatron_core": ".".join(map(str, eplb_mcore.mcore_version())),
        "grouped_gemm": source,
        "setup": {k: getattr(args, k) for k in (*FULL, "hot", "bias", "budget", "kinds", "small")},
        "rows": rows,
        "planner": planner,
        "equivalence_passed": all(max(c[k] for k in EQUIVALENCE_KEYS) <= EQUIVALENCE_RTOL for c in checks),
        "seconds": round(time.time() - started, 1),
    }
    if rank == 0:
        lines = [
            "| kind | variant | slots/rank | median ms | worst / median | fetch ms | balancedness mean / worst "
            "| peak MiB | equivalence |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            eq = max(r["equivalence"].values()) if "equivalence" in r else None
            lines.append(
                f"| {r['kind']} | {r['variant']} | {r['slots_per_rank']} | {r['median_ms']:.2f} | "
                f"{r['worst_over_median']:.2f} | {r['fetch_median_ms']:.2f} | {r['balancedness_mean']:.3f} / "
                f"{r['balancedness_worst']:.3f} | {r['peak_memory_bytes'] / 2**20:.0f} | "
                f"{'–' if eq is None else f'{eq:.1e}'} |"
            )
        result["table"] = lines
        name = f"fast_replicas_gpu_ws{world}_{'cuda' if CUDA else 'cpu'}.json"
        out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print("\n".join(lines + (planner["table"] if planner else [])), flush=True)
        print(
            f"equivalence (bf16, tolerance {EQUIVALENCE_RTOL:g}): {'passed' if result['equivalence_passed'] else 'FAILED'}"
        )
        print(f"wrote {out}", flush=True)
    _align(device)
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
