"""Slot moves through the ``TransferExecutor`` vs raw ``batch_isend_irecv`` at the same message size.

Run (NCCL + CUDA when available, else gloo + CPU with small sizes)::

    torchrun --nproc_per_node 2 benchmarks/p2p_bench.py [--out FILE]

Every rank holds ``--layers`` MoE layers of ``--slots`` expert slots; a slot is what a training rank moves:
two bf16 weight matrices ``[--rows, --cols]`` plus, per matrix, the fp32 master and the two fp32 Adam moments
(8 tensors, 14 bytes per parameter: 224 MiB at the default 4096 x 2048).  Each pass sends every slot of every
layer to the next rank (a ring: each rank sends to the next and receives from the previous at once), the
following pass sends them back, so the model ends as it started (checked bitwise).

Side by side, in one run (``--variants`` picks a subset):

* ``raw_layer`` — the reference: per layer, one contiguous buffer per peer of exactly the bytes a layer's
  slots make, one ``batch_isend_irecv`` per layer, no host wait between layers;
  ``raw_piece`` the same bytes cut into ``DEFAULT_CHUNK_BYTES`` pieces (one call per piece), ``raw_total``
  one message of every layer's bytes.
* ``legacy_*`` — the executor as it was before chunked messages (one message per peer per layer, posted after
  the whole layer is staged; vote on the caller's stream; ``run()`` one layer after the other):
  ``legacy_layer`` = ``start_layer`` + ``finish_layer`` per layer (the manager, ``eplb_layers_per_step=1``),
  ``legacy_run`` = ``run()`` (what ``multi_gpu_bench``'s slot-move probe timed).
* ``default_*`` — the executor with its current defaults, driven the same ways (``_layer``, ``_run``) and
  ``default_all`` (every layer started, then every layer finished: ``eplb_layers_per_step = layers``).
* one knob changed from the defaults, driven by ``run()``: chunk sizes, ``chunk_off``, ``no_pipeline``,
  ``shared_vote`` (vote on the caller's stream), ``vote_in_transfer_group[_layer]`` (the vote over the
  transfer group itself: on NCCL it queues behind the posted sends), ``vote_off``, ``copy_streams_1``,
  ``no_side_stream``, and ``*_timeout`` (``finish_layer(timeout=60)`` as the manager calls it: under NCCL a
  wait with a timeout blocks the host until the receives are done).

As in the manager, the executor moves over a dedicated transfer group and votes over another group (the
manager's load group); the raw reference uses the transfer group.

Times: ``torch.cuda.synchronize`` (CUDA) and a barrier before each pass, wall time to the end of the pass after
a synchronize, the slowest rank of each pass; ``--warmup`` passes dropped, the median of ``--reps``.
Reported per variant: GB/s per rank (bytes each rank sends per pass / median pass time), the ratio to
``raw_layer`` (same message size per peer and layer), the peak staging bytes.  Rank 0 prints a markdown table
and writes JSON to ``--out`` (default ``benchmarks/results/p2p_bench_ws<N>_<cuda|cpu>.json``).
NCCL's environment (e.g. ``NCCL_NVLS_ENABLE``) is left as the launcher set it and recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eplb.placement import ExpertPlacement  # noqa: E402
from megatron_eplb.transfer import DEFAULT_CHUNK_BYTES, TransferExecutor, plan_transfer, slot_nbytes  # noqa: E402

CUDA = torch.cuda.is_available()
MiB = 1 << 20

# name -> (executor kwargs, driver, finish timeout). Drivers: "layer" (start + finish per layer), "run"
# (executor.run), "all" (start every layer, then finish every layer).
LEGACY = {"chunk_bytes": None, "pipeline": False, "isolated_vote": False}
EXECUTOR_VARIANTS: dict[str, tuple[dict, str, float | None]] = {
    "legacy_layer": (LEGACY, "layer", None),
    "legacy_run": (LEGACY, "run", None),
    "default_layer": ({}, "layer", None),
    "default_run": ({}, "run", None),
    "default_all": ({}, "all", None),
    "chunk_512M": ({"chunk_bytes": 512 * MiB}, "run", None),
    "chunk_1G": ({"chunk_bytes": 1024 * MiB}, "run", None),
    "chunk_off": ({"chunk_bytes": None}, "run", None),
    "no_pipeline": ({"pipeline": False}, "run", None),
    "shared_vote": ({"isolated_vote": False}, "run", None),
    "vote_in_transfer_group": ({"vote_group": "transfer"}, "run", None),
    "vote_in_transfer_group_layer": ({"vote_group": "transfer"}, "layer", None),
    "vote_off": ({"vote": False}, "run", None),
    "copy_streams_1": ({"copy_streams": 1}, "run", None),
    "no_side_stream": ({"use_side_stream": False}, "run", None),
    "default_layer_timeout": ({}, "layer", 60.0),
    "default_run_timeout": ({}, "run", 60.0),
}
RAW_VARIANTS = ("raw_layer", "raw_piece", "raw_total")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=None, help="MoE layers (default 4, CPU 3)")
    p.add_argument(
        "--slots", type=int, default=None, help="slots per rank per layer, all moved (default 8, CPU 4)"
    )
    p.add_argument("--rows", type=int, default=None, help="weight matrix rows (default 4096, CPU 64)")
    p.add_argument("--cols", type=int, default=None, help="weight matrix columns (default 2048, CPU 32)")
    p.add_argument("--reps", type=int, default=None, help="timed passes per variant (default 6, CPU 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes per variant")
    p.add_argument("--variants", default=None, help="comma list (default: all); raw_layer is always run")
    p.add_argument("--small", action="store_true", help="CPU sizes (implied without CUDA)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    small = args.small or not CUDA
    for key, big, little in [("layers", 4, 3), ("slots", 8, 4), ("rows", 4096, 64), ("cols", 2048, 32),
                             ("reps", 6, 3)]:  # fmt: skip
        if getattr(args, key) is None:
            setattr(args, key, little if small else big)
    names = list(RAW_VARIANTS) + list(EXECUTOR_VARIANTS)
    wanted = names if args.variants is None else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        p.error(f"unknown variants {unknown}; known: {names}")
    args.variant_list = ["raw_layer"] + [v for v in names if v in wanted and v != "raw_layer"]
    return args


# ---------------------------------------------------------------------------------------------- set-up
def init() -> torch.device:
    if CUDA:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _fill(t: torch.Tensor, seed: int) -> torch.Tensor:
    """Deterministic, cheap, distinct per seed (no RNG: a 224 MiB slot fills in microseconds on a GPU)."""
    n = t.numel()
    vals = (torch.arange(n, device=t.device, dtype=torch.int64) * 2654435761 + seed * 40503) % 65521
    t.copy_((vals.to(torch.float32) / 65521.0 - 0.5).view(t.shape).to(t.dtype))
    return t


def make_slot(rows: int, cols: int, device: torch.device, seed: int) -> list[torch.Tensor]:
    """bf16 w1, w2; fp32 master w1, w2; Adam exp_avg w1, w2; exp_avg_sq w1, w2 (the DeepSpeed bf16 layout)."""
    out = [torch.empty(rows, cols, dtype=torch.bfloat16, device=device) for _ in range(2)]
    out += [torch.empty(rows, cols, dtype=torch.float32, device=device) for _ in range(6)]
    return [_fill(t, seed * 8 + j) for j, t in enumerate(out)]


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


# --------------------------------------------------------------------------------------------- timing
def time_passes(fn, args: argparse.Namespace, device: torch.device) -> list[float]:
    """Seconds of ``fn(i)`` for pass ``i`` (slowest rank), warmup passes dropped."""
    times = []
    for i in range(args.warmup + args.reps):
        dist.barrier()
        _sync()
        t0 = time.perf_counter()
        fn(i)
        _sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return _max_over_ranks(times, device)


def raw_variant(
    name: str, args: argparse.Namespace, device: torch.device, layer_bytes: int, piece_bytes: int, group
) -> dict:
    """One contiguous buffer per peer: per layer (``raw_layer``), in pieces (``raw_piece``) or all layers at
    once (``raw_total``); each rank sends to the next and receives from the previous rank."""
    me, world = dist.get_rank(), dist.get_world_size()
    nxt, prv = (me + 1) % world, (me - 1) % world
    total = layer_bytes * args.layers
    send = torch.ones(total, dtype=torch.uint8, device=device)
    recv = torch.zeros(total, dtype=torch.uint8, device=device)
    if name == "raw_layer":
        msg = layer_bytes
    elif name == "raw_piece":
        msg = piece_bytes
    else:
        msg = total
    bounds = []  # (start, end) of each message, layer after layer
    for start in range(0, total, layer_bytes):
        end = min(start + layer_bytes, total)
        bounds += [(a, min(a + msg, end)) for a in range(start, end, msg)]

    def one(_: int) -> None:
        works = []
        for a, b in bounds:
            ops = [
                dist.P2POp(dist.isend, send[a:b], nxt, group),
                dist.P2POp(dist.irecv, recv[a:b], prv, group),
            ]
            works += dist.batch_isend_irecv(ops)
        for w in works:
            w.wait()

    times = time_passes(one, args, device)
    ok = bool(recv.min().item() == 1)
    return {"message_bytes": msg, "messages_per_pass": len(bounds), "times_s": times, "correct": ok}


def executor_variant(
    name: str, args: argparse.Namespace, device: torch.device, store, plans, expect_after_one, groups
) -> dict:
    kwargs, driver, timeout = EXECUTOR_VARIANTS[name]
    transfer_group, vote_group = groups
    options = dict(kwargs)
    options["vote_group"] = transfer_group if kwargs.get("vote_group") == "transfer" else vote_group
    before = [t.clone() for t in store[0][0]]

    def tensors(layer: int, k: int) -> list[torch.Tensor]:
        return store[layer][k]

    executors = [TransferExecutor(p, tensors, transfer_group, **options) for p in plans]
    layers = list(range(args.layers))

    def one(i: int) -> None:
        ex = executors[i % 2]
        if driver == "run":
            ex.run(timeout=timeout)
        elif driver == "layer":
            for layer in layers:
                ex.finish_layer(ex.start_layer(layer), timeout)
        else:
            handles = [ex.start_layer(layer) for layer in layers]
            for h in handles:
                ex.finish_layer(h, timeout)

    one(0)  # the first pass is checked: slot 0 of layer 0 holds the previous rank's slot 0
    _sync()
    moved_ok = all(torch.equal(a, b) for a, b in zip(store[0][0], expect_after_one))
    one(1)
    times = time_passes(one, args, device)
    if (args.warmup + args.reps) % 2:
        one(1)  # back home
    _sync()
    restored = all(torch.equal(a, b) for a, b in zip(store[0][0], before))
    peak = max(ex.peak_staging_bytes for ex in executors)
    executors.clear()  # their staging buffers go back to the allocator before the next variant
    if CUDA:
        torch.cuda.empty_cache()
    return {
        "kwargs": dict(kwargs),
        "driver": driver,
        "finish_timeout_s": timeout,
        "times_s": times,
        "peak_staging_bytes": peak,
        "correct": bool(moved_ok and restored),
    }


# ------------------------------------------------------------------------------------------------ main
def run(args: argparse.Namespace) -> dict:
    device = init()
    me, world = dist.get_rank(), dist.get_world_size()
    if world < 2:
        raise SystemExit("p2p_bench needs at least 2 processes (torchrun --nproc_per_node 2 ...)")
    s, layers = args.slots, args.layers
    store = [[make_slot(args.rows, args.cols, device, (me * layers + layer) * s + k) for k in range(s)]
             for layer in range(layers)]  # fmt: skip
    prev = (me - 1) % world
    expect_after_one = make_slot(args.rows, args.cols, device, (prev * layers + 0) * s + 0)
    base = np.tile(np.arange(world * s), (layers, 1))
    old = ExpertPlacement(base, world, world * s)
    moved = ExpertPlacement(np.roll(base, s, axis=1), world, world * s)
    plans = [plan_transfer(old, moved), plan_transfer(moved, old)]
    slot_bytes = slot_nbytes(store[0][0])
    layer_bytes = s * slot_bytes  # per peer per layer: every slot goes to the next rank
    # The executor's pieces: whole slots (64-byte aligned tensors), at least one.
    staged = sum(-(-t.numel() * t.element_size() // 64) * 64 for t in store[0][0])
    piece_bytes = min(s, max(1, DEFAULT_CHUNK_BYTES // staged)) * slot_bytes
    # As the manager: a dedicated transfer group, the vote over another group (its load group).
    groups = (dist.new_group(list(range(world))), dist.new_group(list(range(world))))
    for g in groups:  # first use of each group by every rank (NCCL)
        dist.all_reduce(torch.zeros(1, device=device), group=g)
    pass_bytes = layers * layer_bytes  # sent by each rank per pass
    dist.barrier()
    _sync()

    results: dict[str, dict] = {}
    for name in args.variant_list:
        t0 = time.perf_counter()
        if name in RAW_VARIANTS:
            r = raw_variant(name, args, device, layer_bytes, piece_bytes, groups[0])
        else:
            r = executor_variant(name, args, device, store, plans, expect_after_one, groups)
        med = float(np.median(r["times_s"]))
        r.update(median_s=med, bytes_per_s_per_rank=pass_bytes / med, wall_s=time.perf_counter() - t0)
        results[name] = r
        if me == 0:
            print(f"{name}: {pass_bytes / med / 1e9:.1f} GB/s per rank, ok={r['correct']}", flush=True)
    ref = results["raw_layer"]["bytes_per_s_per_rank"]
    for r in results.values():
        r["ratio_to_raw_layer"] = r["bytes_per_s_per_rank"] / ref
    return {
        "world_size": world,
        "backend": dist.get_backend(),
        "device": torch.cuda.get_device_name(device) if CUDA else platform.processor() or "cpu",
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if CUDA else None,
        "python": platform.python_version(),
        "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
        "setup": {
            "layers": layers,
            "slots_per_rank": s,
            "rows": args.rows,
            "cols": args.cols,
            "slot_tensors": len(store[0][0]),
            "slot_bytes": slot_bytes,
            "message_bytes_per_peer_per_layer": layer_bytes,
            "bytes_per_rank_per_pass": pass_bytes,
            "default_chunk_bytes": DEFAULT_CHUNK_BYTES,
            "piece_bytes": piece_bytes,
            "reps": args.reps,
            "warmup": args.warmup,
        },  # fmt: skip
        "variants": results,
    }


def table(result: dict) -> str:
    st = result["setup"]
    lines = [
        f"slot moves, {result['world_size']} ranks ({result['backend']}, {result['device']}): {st['layers']} layers "
        f"x {st['slots_per_rank']} slots of {st['slot_bytes'] / MiB:.1f} MiB to the next rank, "
        f"{st['message_bytes_per_peer_per_layer'] / MiB:.0f} MiB per peer per layer",
        "",
        "| variant | settings | GB/s per rank | vs raw_layer | median ms/pass | peak staging MiB | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["variants"].items():
        if "driver" in r:
            knobs = ", ".join(f"{k}={v}" for k, v in r["kwargs"].items()) or "defaults"
            settings = f"{r['driver']}; {knobs}" + (
                f"; timeout={r['finish_timeout_s']:g}" if r["finish_timeout_s"] else ""
            )
            staging = f"{r['peak_staging_bytes'] / MiB:.0f}"
        else:
            settings = f"{r['messages_per_pass']} msgs of {r['message_bytes'] / MiB:.1f} MiB"
            staging = "–"
        lines.append(
            f"| {name} | {settings} | {r['bytes_per_s_per_rank'] / 1e9:.1f} | {r['ratio_to_raw_layer']:.2f} | "
            f"{1e3 * r['median_s']:.2f} | {staging} | {'yes' if r['correct'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    result = run(args)
    result["wall_s"] = time.perf_counter() - t0
    ok = all(r["correct"] for r in result["variants"].values())
    if dist.get_rank() == 0:
        print(table(result))
        out = Path(
            args.out
            or f"benchmarks/results/p2p_bench_ws{result['world_size']}_{'cuda' if CUDA else 'cpu'}.json"
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out} ({result['wall_s']:.1f} s)")
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
