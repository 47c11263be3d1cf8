"""What the EPLB patch costs one Megatron-core MoE layer's forward on one GPU: the recording overhead.

Usage::

    python benchmarks/recording_overhead.py [--out DIR] [--rounds N] [--small] [--experts sequential|grouped]

Writes ``DIR/recording_overhead.json`` (``recording_overhead_grouped.json`` with ``--experts grouped``) (default ``benchmarks/results`` on CUDA) and prints a table.  Without
CUDA it runs tiny sizes on CPU (gloo), a smoke test of the script itself; its numbers mean nothing.

One process, one GPU, EP = 1: one Megatron-core MoE layer (hidden 4096, ffn 2048, 64 experts, top-8, 8192
tokens, bf16, alltoall dispatcher, SequentialMLP or GroupedMLP) unpatched, patched at the default placement, and patched with
its recording off; two separately built instances of each, forwards interleaved, paired CUDA-event wall clock
and host CPU time; the kernels the patch adds (profiler); the count under CUDA graph replay (see
:func:`part_record`).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import (  # noqa: E402
    CUDA,
    Timer,
    build_moe_layer,
    grouped_gemm_source,
    moe_config,
    run_one_gpu,
    sync,
    time_stats,
)


class _OneMoE(torch.nn.Module):
    def __init__(self, config, device) -> None:
        super().__init__()
        self.layer = build_moe_layer(config).to(device)

    def forward(self, x):
        return self.layer(x)[0]


def _kernel_events(prof) -> list[tuple[str, float]]:
    """``(name, µs)`` of the device activity a profiler session saw (kernels, memcpy, memset) in launch
    order; without CUDA, the leaf CPU ops (a smoke test: the numbers mean nothing there)."""
    out = []
    for e in prof.events():
        if CUDA:
            if e.device_type == torch.autograd.DeviceType.CUDA:
                out.append((e.name, float(e.time_range.elapsed_us())))
        elif not e.cpu_children and e.name.startswith("aten::"):
            out.append((e.name, float(e.time_range.elapsed_us())))
    return out


def _paired(ms: dict[str, np.ndarray], base: str, scale: float) -> dict:
    """Paired differences (sample minus the ``base`` sample of the same round) in % of ``scale``: median
    and a bootstrap 95 % interval of the median.  ``ms``: name -> ``[rounds]`` times."""
    rng = np.random.default_rng(0)
    out = {}
    for k, v in ms.items():
        if k == base:
            continue
        d = 100.0 * (v - ms[base]) / scale
        boot = np.median(rng.choice(d, size=(2000, d.size)), axis=1)
        out[k] = {
            "median_pct": float(np.median(d)),
            "ci95_pct": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        }
    return out


def part_record(
    device, small: bool, copies: int = 2, rounds: int = 500, grouped: bool = False, redundant: int = 0
) -> dict:
    """The patch's cost on one MoE layer at the default placement, forward (as in training: weights
    require grad, the autograd graph is built).

    With ``redundant > 0`` the patched kinds hold that many replica slots (experts ``0 .. redundant-1`` twice)
    under the default ``balanced`` dispatch: the per-batch split runs in every forward, and the replicated
    experts' tokens are computed in two GEMMs each (the whole patch with per-batch shares).

    Three kinds of the same layer (same weights, same input): ``unpatched``, ``patched`` (the code as it
    is) and ``norecord`` (patched, recording switched off), ``copies`` separately built instances of each
    (built interleaved), so the comparison is not one allocation of one model against another.  Every
    round runs one forward of every instance in a random order and times each with CUDA events and the
    host CPU time of the calling thread.
    Reported, paired by round (a kind's time in a round = the mean of its instances): the whole patch
    (patched vs unpatched), the recording alone (patched vs norecord), and the instance noise (A/A: the
    first instance of a kind against the second), median and bootstrap 95 % CI in % of the unpatched
    median.  Plus, exact and free of timing noise: the kernels the patch adds per forward (``torch.profiler``,
    multiset difference of kernel names), and the recording's count under CUDA graph replay.
    """
    from megatron_eplb.patches import megatron as eplb_mcore
    from torch.profiler import ProfilerActivity, profile

    from megatron_eplb.placement import ExpertPlacement

    dtype = torch.bfloat16 if CUDA or grouped else torch.float32  # GroupedMLP runs bf16 only
    if small:
        h, ffn, experts, topk, tokens = 64, 128, 8, 2, 256
        rounds, warm, prof_fwd = min(rounds, 8), 2, 2
    else:
        h, ffn, experts, topk, tokens = 4096, 2048, 64, 8, 8192
        warm, prof_fwd = 10, 40
    kinds = ("unpatched", "patched", "norecord")
    source = grouped_gemm_source(device) if grouped else None  # before the GroupedMLP layers are built
    config = moe_config(h, ffn, experts, topk, dtype, grouped=grouped)
    torch.manual_seed(0)
    weights = _OneMoE(config, device).state_dict()
    models: dict[str, torch.nn.Module] = {}
    handles = {}
    for i in range(copies):
        for kind in kinds:
            m = _OneMoE(config, device)
            m.load_state_dict(weights)
            if kind != "unpatched":
                placement = ExpertPlacement.default(1, experts, 1, redundant) if redundant else None
                handles[f"{kind}{i}"] = eplb_mcore.apply(m, placement, replica_dispatch="balanced")
                handles[f"{kind}{i}"].recording = kind == "patched"
            models[f"{kind}{i}"] = m
    del weights
    x = torch.randn(tokens, 1, h, device=device, dtype=dtype)
    out: dict = {
        "setup": dict(
            hidden=h,
            ffn=ffn,
            experts=experts,
            topk=topk,
            tokens=tokens,
            dtype=str(dtype),
            experts_class="GroupedMLP" if grouped else "SequentialMLP",
            redundant_slots=redundant,
            replica_dispatch="balanced",
            split_align=handles["patched0"].split_align,
            grouped_gemm=source,
        )
    }

    # Correctness: every instance's output equals the unpatched one (bitwise without replicas; with them the
    # split experts' rows go through other GEMM groups, so bf16 rounds differently); the loads are the router's.
    with torch.no_grad():
        y_ref = models["unpatched0"](x)
        ys = [m(x) for m in models.values()]
        out["bitwise_equal"] = all(bool(torch.equal(y, y_ref)) for y in ys)
        scale = y_ref.float().abs().max().clamp(min=1e-30)
        out["max_rel_diff"] = max(float((y.float() - y_ref.float()).abs().max() / scale) for y in ys)
        del ys
        h0 = handles["patched0"]
        h0.reset_loads()
        models["patched0"](x)
        out["loads_sum_ok"] = int(h0.loads().sum()) == tokens * topk
        out["slot_loads_equal_loads"] = (
            bool(torch.equal(h0.loads(), h0.slot_loads())) if not redundant else None
        )
        out["norecord_counts_nothing"] = int(handles["norecord0"].loads().sum()) == 0

        # Under CUDA graph replay the count (an in-place add into a buffer that is never replaced) counts
        # every replay.
        out["cuda_graph_replay_counts_ok"] = None
        if CUDA:
            routed = torch.rand(tokens, experts, device=device) < topk / experts
            h0.reset_loads()
            h0._recorder.count_routed(0, routed)  # creates the accumulator for this shape outside the capture
            h0.reset_loads()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                h0._recorder.count_routed(0, routed)
            h0.reset_loads()
            for _ in range(5):
                graph.replay()
            out["cuda_graph_replay_counts_ok"] = bool(torch.equal(h0.loads()[0], 5 * routed.sum(0)))
            del graph
        for hd in handles.values():
            hd.reset_loads()

    names = list(models)

    def forward(name: str) -> None:
        y = models[name](x)
        del y

    for _ in range(warm):
        for name in names:
            forward(name)
    sync()

    # Device activity: the kernels each kind launches per forward (first instance of each kind).
    activities = [ProfilerActivity.CUDA] if CUDA else [ProfilerActivity.CPU]
    kernels: dict[str, dict[str, list[float]]] = {}
    for kind in kinds:
        with profile(activities=activities) as prof:
            for _ in range(prof_fwd):
                forward(f"{kind}0")
            sync()
        kernels[kind] = {}
        for kname, d in _kernel_events(prof):
            kernels[kind].setdefault(kname, []).append(d)

    def added(variant: str, against: str) -> dict:
        """Kernels ``variant`` launches more often than ``against`` per forward, with their durations."""
        rows = {}
        for kname, ds in kernels[variant].items():
            extra = (len(ds) - len(kernels[against].get(kname, []))) / prof_fwd
            if extra > 1e-9:
                rows[kname[:160]] = {"extra_per_forward": extra, "median_us": float(np.median(ds))}
        return {
            "kernels": rows,
            "added_us_per_forward": float(
                sum(r["extra_per_forward"] * r["median_us"] for r in rows.values())
            ),
            "device_us_per_forward": {
                k: float(sum(sum(ds) for ds in kernels[k].values())) / prof_fwd for k in (variant, against)
            },
        }

    out["kernels_added_by_patch"] = added("patched", "unpatched")
    out["kernels_added_by_recording"] = added("patched", "norecord")

    # Paired wall clock (CUDA events) and host CPU time of the calling thread (``thread_time``: what the
    # forward costs the host, less sensitive than wall time to other work on the machine), each round in a
    # random order; the garbage collector paused (its pauses land on random samples).
    timers = {k: Timer() for k in names}
    cpu_ms: dict[str, list[float]] = {k: [] for k in names}
    order_rng = np.random.default_rng(0)
    gc.collect()
    gc.disable()
    for it in range(warm + rounds):
        for i in order_rng.permutation(len(names)):
            name = names[i]
            s = timers[name].start()
            c0 = time.thread_time_ns()
            forward(name)
            c1 = time.thread_time_ns()
            if it >= warm:
                timers[name].stop(s)
                cpu_ms[name].append((c1 - c0) / 1e6)
        if it % 10 == 0:
            sync()
    gc.enable()

    def by_kind(ms: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per kind, per round: the mean over its instances."""
        return {kind: np.mean([ms[f"{kind}{i}"] for i in range(copies)], axis=0) for kind in kinds}

    for label, ms in (("", {k: np.asarray(t.ms()) for k, t in timers.items()}), ("cpu_", cpu_ms)):
        ms = {k: np.asarray(v) for k, v in ms.items()}
        kind_ms = by_kind(ms)
        fwd_ms = float(np.median(kind_ms["unpatched"]))
        out[f"{label}forward_ms"] = fwd_ms
        out[f"{label}ms"] = {k: time_stats(list(v)) for k, v in ms.items()}
        vs_unpatched = _paired(kind_ms, "unpatched", fwd_ms)
        out[f"{label}patch_pct"] = vs_unpatched["patched"]
        out[f"{label}patch_without_recording_pct"] = vs_unpatched["norecord"]
        out[f"{label}recording_pct"] = _paired(kind_ms, "norecord", fwd_ms)["patched"]
        out[f"{label}instance_aa_pct"] = {
            kind: _paired({"a": ms[f"{kind}0"], "b": ms[f"{kind}1"]}, "a", fwd_ms)["b"]
            for kind in kinds
            if copies > 1
        }
    out["rounds"] = rounds
    return out


def measure(device, small: bool, args) -> dict:
    rec = part_record(
        device, small, rounds=args.rounds, grouped=args.experts == "grouped", redundant=args.redundant
    )
    # The measure: the layer forward with vs without the EPLB patch (recording on, default
    # placement).  The recording alone (patched vs patched with recording off) is reported beside it.
    return {
        "record": rec,
        "recording_overhead_pct": rec["patch_pct"]["median_pct"],
        "recording_overhead_ci95_pct": rec["patch_pct"]["ci95_pct"],
        "recording_alone_pct": rec["recording_pct"]["median_pct"],
        "recording_overhead_method": (
            "record: paired CUDA-event wall clock of the layer forward, patched (recording on) vs unpatched, "
            f"{rec['rounds']} rounds, two separately built instances of each kind; median"
        ),
    }


def _table(r: dict) -> str:
    lines: list[str] = []
    p = r["record"]
    ci = lambda d: f"{d['median_pct']:+.2f} % ({d['ci95_pct'][0]:+.2f} ... {d['ci95_pct'][1]:+.2f})"  # noqa: E731
    r = p["setup"]["redundant_slots"]
    lines.append(
        f"{p['setup']['experts_class']} MoE layer forward{f' ({r} replica slots, balanced split)' if r else ''}, "
        f"unpatched: {p['forward_ms']:.3f} ms "
        f"(median of {p['rounds']} rounds)"
    )
    lines.append(f"  whole patch:            {ci(p['patch_pct'])}")
    lines.append(f"  recording alone:        {ci(p['recording_pct'])}")
    lines.append(f"  patch, recording off:   {ci(p['patch_without_recording_pct'])}")
    for kind, d in p["instance_aa_pct"].items():
        lines.append(f"  A/A {kind + ' instances:':22s}{ci(d)}")
    lines.append(f"host CPU time of the forward, unpatched: {p['cpu_forward_ms']:.3f} ms")
    lines.append(f"  whole patch:            {ci(p['cpu_patch_pct'])}")
    lines.append(f"  recording alone:        {ci(p['cpu_recording_pct'])}")
    for kind, d in p["cpu_instance_aa_pct"].items():
        lines.append(f"  A/A {kind + ' instances:':22s}{ci(d)}")
    k = p["kernels_added_by_patch"]
    lines.append(
        f"  kernels added by the patch per forward: {json.dumps(k['kernels'])} = "
        f"{k['added_us_per_forward']:.1f} us device"
    )
    lines.append(
        f"  outputs bitwise equal {p['bitwise_equal']} (max difference {p['max_rel_diff']:.1e} of the largest), "
        f"loads ok {p['loads_sum_ok']}, "
        f"CUDA graph replay counts ok {p['cuda_graph_replay_counts_ok']}"
    )
    return "\n".join(lines)


def _args(parser) -> None:
    parser.add_argument("--rounds", "--record-rounds", type=int, default=500, help="paired rounds")
    parser.add_argument(
        "--experts", choices=("sequential", "grouped"), default="sequential", help="the layer's expert class"
    )
    parser.add_argument(
        "--redundant",
        type=int,
        default=0,
        help="replica slots of the patched layer (balanced dispatch: the per-batch split in every forward)",
    )


def main(argv: list[str] | None = None) -> dict:
    def name(args) -> str:
        grouped = "_grouped" if args.experts == "grouped" else ""
        return f"recording_overhead{grouped}" + (f"_r{args.redundant}" if args.redundant else "")

    return run_one_gpu("recording_overhead.py", __doc__, _args, measure, _table, argv, result_name=name)


if __name__ == "__main__":
    main()
