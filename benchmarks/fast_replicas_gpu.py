"""Per-step replicas (issue #20) on the GPU: one MoE layer whose hot experts change every step, off vs
persistent-only EPLB vs the fast path.

Usage (one process per GPU; NCCL + CUDA, bf16)::

    torchrun --nproc_per_node 2 benchmarks/fast_replicas_gpu.py     # EP = 2
    torchrun --nproc_per_node 1 benchmarks/fast_replicas_gpu.py     # EP = 1: nothing to balance (a smoke run)
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


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    rank, world, device = init_distributed(args.seed)
    from megatron_eplb.patches import megatron as eplb_mcore

    source = grouped_gemm_source(device)
    if "grouped" in args.kinds and source.startswith("not needed"):
        args.kinds = [k for k in args.kinds if k != "grouped"] or ["sequential"]
    pats = patterns(args)
    skew = torch.zeros(args.experts, dtype=torch.float32, device=device)
    x, grad = _input(args.tokens, args, device, rank)
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
        print("\n".join(lines), flush=True)
        print(
            f"equivalence (bf16, tolerance {EQUIVALENCE_RTOL:g}): {'passed' if result['equivalence_passed'] else 'FAILED'}"
        )
        print(f"wrote {out}", flush=True)
    _align(device)
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
