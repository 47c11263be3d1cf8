"""Multi-GPU EPLB benchmark (issue #8): DeepSpeed + Megatron-core GPT MoE, EP over NCCL, with and without EPLB.

One command, through the ``deepspeed`` launcher as a user would run it::

    benchmarks/run_multi_gpu.sh 2            # = deepspeed --num_gpus 2 benchmarks/multi_gpu_bench.py
    benchmarks/run_multi_gpu.sh 4 --steps 300

On CPU (gloo; sizes scale down, ``--small`` is implied without CUDA; its numbers only check the script)::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/deepspeed --num_gpus 2 benchmarks/multi_gpu_bench.py --small

What one launch measures, every rank in step (EP = world size unless ``--ep`` says otherwise):

* **training runs on the same data and seed** (``examples/train.py``'s model, data and DeepSpeed wiring,
  imported): ``off`` (DeepSpeed + Megatron MoE, no EPLB), ``eplb`` (dynamic EPLB, default policy, redundant
  slots), ``rotate`` (dynamic EPLB with a test policy that sends every rank's slots to the next rank at every
  rebalance: forced moves, the worst case for the stall) and, on CUDA, ``off_again`` (the baseline once more: the run-to-run
  noise floor of non-deterministic kernels).  bf16 on GPU, fp32 on CPU.  The text switches domain
  (code -> Wikipedia) half-way, which shifts the routing;
* **loss** of every run against ``off``, step by step (max relative difference vs ``--loss-rtol``);
* **step time**: median over the steps after ``--warmup`` (CUDA events from the start of the forward to
  the end of ``engine.step()`` on GPU, wall time between host syncs on CPU; the slowest rank of each step);
* **balancedness** (mean rank load / max rank load, per layer, per step) measured from what was computed:
  per-slot token counts with EPLB, the router's per-expert counts (= per slot) without;
* **stall**: steps that post, finish or commit a layer's transfer (or await the plan) vs steady steps, in
  the same run and vs ``off`` (target <= 1.05x);
* **P2P bandwidth**: a ring ``batch_isend_irecv`` probe over the EP group (NCCL on GPU, gloo on CPU) at
  several message sizes, against (a) the bytes/s of the manager's slot moves during training (moved bytes /
  transfer seconds of every :class:`~megatron_eplb.manager.RebalanceRecord`; the seconds are the host time
  spent posting and finishing, not the part hidden behind the forward), and (b) the
  :class:`~megatron_eplb.transfer.TransferExecutor` moving every slot of the trained ``eplb`` model
  (weights + fp32 master + Adam moments) to the next rank and back, synchronously, timed alone.

Rank 0 writes ``OUT/multi_gpu_ws<WORLD>_<cuda|cpu>.json`` (device names, versions, world size, every
per-step row) and prints a table in the format of ``docs/multi_gpu.md``.  Exit code 1 when a loss
comparison fails.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO))

import data  # noqa: E402  (examples/data.py: byte-level text domains)
import train  # noqa: E402  (examples/train.py: model, DeepSpeed config, parallel init)
from bench_common import count_calls, time_stats  # noqa: E402
from data import ByteBatches, load_domain  # noqa: E402

from megatron_eplb.placement import ExpertPlacement  # noqa: E402

log = logging.getLogger("megatron_eplb.multi_gpu_bench")

CUDA = torch.cuda.is_available()

# Model and schedule presets; every field can be overridden by the flag of the same name.
FULL = dict(
    num_layers=4, hidden_size=2048, ffn_hidden_size=2048, num_attention_heads=16, num_experts=32, topk=4,
    seq_length=2048, micro_batch_size=4, redundancy_per_rank=1, steps=240, warmup=10, rebalance_every=40,
    wait_worker=5,
)  # fmt: skip
SMALL = dict(
    num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_experts=16, topk=2,
    seq_length=64, micro_batch_size=4, redundancy_per_rank=1, steps=40, warmup=4, rebalance_every=10,
    wait_worker=2,
)  # fmt: skip

TRANSFER_EVENTS = ("start_layer", "finish_layer")
PLAN_EVENTS = ("_start_planning", "_await_plan")
_EVENTS: dict[str, int] = {}


# ============================================================================ arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    p.add_argument(
        "--out",
        default=str(REPO / ("benchmarks/results" if CUDA else "outputs/multi_gpu")),
        help="directory for the JSON (default: benchmarks/results on CUDA, outputs/multi_gpu on CPU)",
    )
    p.add_argument("--small", action="store_true", help="CPU sizes (implied without CUDA)")
    p.add_argument("--runs", default=None, help="comma list of off,off_again,eplb,rotate (default: all; "
                   "off_again only on CUDA); off is always run first")  # fmt: skip
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: world size)")
    p.add_argument(
        "--deepspeed_config", "--deepspeed-config", default=str(REPO / "configs" / "ds_config.json")
    )
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, else fp32")
    p.add_argument("--loss-rtol", type=float, default=None,
                   help="max relative loss difference per step vs off (default: 2e-2 bf16, 1e-4 fp32)")  # fmt: skip
    p.add_argument("--domains", default="code,wikipedia")
    p.add_argument("--switch-at", type=float, default=0.5, help="fraction of --steps")
    p.add_argument("--probe-reps", type=int, default=None, help="repetitions per P2P size (default 20 / 5)")
    p.add_argument("--seed", type=int, default=1234)
    for key, value in FULL.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None)
    args = p.parse_args(argv)
    args.small = args.small or not CUDA
    preset = SMALL if args.small else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = args.dtype or ("bf16" if CUDA else "fp32")
    if args.loss_rtol is None:
        args.loss_rtol = 2e-2 if args.dtype == "bf16" else 1e-4
    if args.probe_reps is None:
        args.probe_reps = 20 if CUDA else 5
    runs = (args.runs or ("off,off_again,eplb,rotate" if CUDA else "off,eplb,rotate")).split(",")
    unknown = set(runs) - {"off", "off_again", "eplb", "rotate"}
    if unknown:
        p.error(f"--runs: unknown run(s) {sorted(unknown)}; choose from off, off_again, eplb, rotate")
    args.runs = ["off"] + [r for r in runs if r != "off"]
    return args


def train_argv(args: argparse.Namespace, ep: int) -> list[str]:
    """``examples/train.py`` flags for this benchmark's model."""
    argv = [
        "--num-layers", args.num_layers, "--hidden-size", args.hidden_size,
        "--ffn-hidden-size", args.ffn_hidden_size, "--num-attention-heads", args.num_attention_heads,
        "--num-experts", args.num_experts, "--moe-router-topk", args.topk,
        "--expert-model-parallel-size", ep, "--seq-length", args.seq_length,
        "--micro-batch-size", args.micro_batch_size, "--seed", args.seed,
        "--deepspeed_config", args.deepspeed_config, "--zero-stage", args.zero_stage,
        "--domains", args.domains, "--train-iters", args.steps, "--no-wandb",
    ]  # fmt: skip
    if args.dtype == "bf16":
        argv.append("--bf16")
    return [str(a) for a in argv]


# ============================================================================ helpers
def rotate_policy(load, num_slots, num_ranks, previous=None, **kwargs):
    """Test policy: every rank's slots go to the next rank (``phy2log [L, P]`` rolled by the slots per rank),
    so every slot whose expert is not already on its new rank is sent over the network: forced moves."""
    return np.roll(previous.phy2log, previous.phy2log.shape[1] // num_ranks, axis=1)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _max_over_ranks(values: list[float]) -> list[float]:
    """Element-wise max over every rank (the slowest rank sets the pace of a step)."""
    t = torch.tensor(values, dtype=torch.float64, device=_coll_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def _coll_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def balancedness_summary(rank_load: np.ndarray, warmup: int, switch: int) -> dict:
    """Balancedness from measured loads.

    Args:
        rank_load: ``[T, L, N]`` tokens computed by each rank, per step and MoE layer.
        warmup: steps left out of the aggregates; switch: first step (0-based) of the second domain.
    Returns:
        ``mean_per_step`` (mean over steps and layers of mean/max), ``summed`` (the ratio of the loads summed
        over the steps, mean over layers), the same per step for the first and the second domain and the
        last quarter, and ``per_step`` (``[T]``, mean over layers).
    """
    from megatron_eplb.stats import balancedness

    steps = rank_load.shape[0]
    per = np.stack([balancedness(rank_load[t]) for t in range(steps)])  # [T, L]
    last = max(warmup, steps - steps // 4)

    def mean(lo, hi):
        return float(per[lo:hi].mean()) if hi > lo else None

    return {
        "mean_per_step": mean(warmup, steps),
        "summed": float(balancedness(rank_load[warmup:].sum(0)).mean()),
        "first_domain": mean(warmup, min(switch, steps)),
        "second_domain": mean(max(switch, warmup), steps),
        "last_quarter": mean(last, steps),
        "per_step": per.mean(1).tolist(),
    }


# ============================================================================ parallel setup
def init(args: argparse.Namespace) -> int:
    """Device, process group (NCCL on GPU, gloo on CPU), Megatron's parallel state; returns the EP size."""
    if CUDA:
        torch.cuda.set_device(args.local_rank)
        from megatron.core.transformer.moe import moe_utils

        if not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None  # megatron-core 0.16 without Transformer Engine
    return train.init_parallel(args.ep, args.seed)  # enable_cpu() is a no-op on CUDA


def environment(args: argparse.Namespace, ep: int) -> dict:
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    names: list = [None] * dist.get_world_size()
    mine = torch.cuda.get_device_name(torch.cuda.current_device()) if CUDA else platform.processor() or "cpu"
    dist.all_gather_object(names, f"{socket.gethostname()}: {mine}")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    import deepspeed

    return {
        "device": "cuda" if CUDA else "cpu",
        "device_names": names,
        "world_size": dist.get_world_size(),
        "ep_size": ep,
        "backend": str(dist.get_backend()),
        "launcher": "deepspeed" if "LOCAL_RANK" in os.environ else "other",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if CUDA else None,
        "deepspeed": deepspeed.__version__,
        "megatron_core": version("megatron-core") or version("megatron_core"),
        "python": platform.python_version(),
        "git_commit": commit or None,
        "text_dir": str(data.SHARED_TEXT),
        "text_found": data.SHARED_TEXT.is_dir(),
        "small": args.small,
        "dtype": args.dtype,
        "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "DS_ACCELERATOR", "OMP_NUM_THREADS")},
    }


# ============================================================================ one training run
def eplb_config(args: argparse.Namespace, ep: int) -> dict:
    return dict(
        dynamic_eplb=True,
        init_redundancy_expert=args.redundancy_per_rank * ep,
        num_iterations_eplb_update=args.rebalance_every,
        num_wait_worker_iterations=args.wait_worker,
        eplb_window_size=args.rebalance_every,
        eplb_layers_per_step=1,
        eplb_worker_timeout=60.0,
        eplb_log_interval=10**6,
    )


class _RouterCounts:
    """Tokens routed to each logical expert of each MoE layer, per step, from the router's output
    (``probs, routing_map [tokens, E]``): the per-slot load of a model without EPLB (slot = expert)."""

    def __init__(self, model: torch.nn.Module, device) -> None:
        from megatron_eplb.patches.megatron import find_moe_layers

        layers = [layer for _, layer in find_moe_layers(model)]
        self.counts = torch.zeros(
            len(layers), layers[0].config.num_moe_experts, dtype=torch.int64, device=device
        )
        self.hooks = [
            layer.router.register_forward_hook(functools.partial(self._hook, i))
            for i, layer in enumerate(layers)
        ]

    def _hook(self, index, module, inputs, output):
        self.counts[index] += output[1].sum(dim=0, dtype=torch.int64)

    def take(self) -> torch.Tensor:
        out = self.counts.clone()
        self.counts.zero_()
        return out

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def train_run(name: str, args: argparse.Namespace, ep: int, after=None) -> dict:
    """Train ``args.steps`` steps; returns the run's per-step rows and summaries (identical on every rank).

    ``after(engine, manager)`` runs before the engine is freed (the slot-move probe)."""
    from megatron_eplb.patches import deepspeed as eplb_ds

    rank, world = dist.get_rank(), dist.get_world_size()
    device = _coll_device()
    targs = train.parse_args(train_argv(args, ep))
    model = train.build_model(targs, ep)
    if CUDA:
        model = model.to(
            device
        )  # before initialize: the EPLB handle keeps its buffers on the experts' device
    dynamic = name in ("eplb", "rotate")
    router = None if dynamic else _RouterCounts(model, device)
    engine, _, _, _, manager = eplb_ds.initialize(
        model=model,
        config=train.ds_config_for(targs),
        eplb=eplb_config(args, ep) if dynamic else False,
        policy_fn=rotate_policy if name == "rotate" else None,
    )
    handle = engine.eplb_handle
    domains = args.domains.split(",")
    batches = [
        ByteBatches(load_domain(d), args.micro_batch_size, args.seq_length, seed=args.seed, rank=rank)
        for d in domains
    ]
    switch = int(args.steps * args.switch_at) if len(domains) > 1 else args.steps
    mask = train.causal_mask(args.seq_length).to(device)
    pos = torch.arange(args.seq_length, device=device)[None].expand(args.micro_batch_size, -1)
    rows, loads, events = [], [], []
    _sync()
    dist.barrier()
    t_run = time.monotonic()
    for it in range(args.steps):
        domain = 0 if it < switch else 1
        tokens, labels = (t.to(device, non_blocking=True) for t in batches[domain].next())
        _EVENTS.clear()
        phase_before = manager.phase.value if manager is not None else "off"
        t0 = time.perf_counter()
        start = end = None
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        loss = engine(tokens, pos, mask, labels=labels).float().mean()
        engine.backward(loss)
        if handle is not None:
            loads.append(handle.slot_loads().clone())  # this step's per-slot counts (reset by engine.step)
        engine.step()
        if CUDA:
            end.record()
        value = loss.detach().clone()
        dist.all_reduce(value)
        value = float(value) / world  # host sync: the step is over
        wall = (time.perf_counter() - t0) * 1e3
        if router is not None:
            loads.append(router.take())
        record = engine.eplb_last_record
        events.append((start, end))
        rows.append(
            dict(step=it, domain=domains[domain], loss=value, wall_ms=wall, events=dict(_EVENTS),
                 phase_before=phase_before, phase_after=manager.phase.value if manager is not None else "off",
                 completed=record.outcome if record is not None else None)
        )  # fmt: skip
    seconds = time.monotonic() - t_run
    _sync()
    # Step times: CUDA events on GPU, wall between host syncs on CPU; the slowest rank of each step.
    wall = _max_over_ranks([r["wall_ms"] for r in rows])
    event_ms = _max_over_ranks([s.elapsed_time(e) for s, e in events]) if CUDA else None
    for i, r in enumerate(rows):
        r["wall_ms"] = wall[i]
        r["ms"] = event_ms[i] if event_ms is not None else wall[i]
        r["kind"] = _kind(r)
    # Measured balancedness: per-slot counts [T, L, S] of this rank (EPLB), or router counts [T, L, E].
    counts = torch.stack(loads)
    if handle is not None:
        s = handle.slots_per_rank
        full = torch.zeros(
            args.steps, handle.num_layers, handle.placement.num_slots, dtype=torch.int64, device=counts.device
        )
        full[:, :, handle.ep_rank * s : (handle.ep_rank + 1) * s] = counts
    else:
        full, s = counts, counts.shape[-1] // ep
    dist.all_reduce(full)
    rank_load = full.reshape(args.steps, full.shape[1], ep, s).sum(-1).cpu().numpy()
    bal = balancedness_summary(rank_load.astype(np.float64), args.warmup, switch)
    for r, b in zip(rows, bal["per_step"]):
        r["balancedness"] = b
    out = _summarize(name, rows, args.warmup)
    out.update(seconds=seconds, switch_step=switch, balancedness=bal)
    if manager is not None:
        out["rebalances"] = [rec.as_dict() for rec in manager.history]
        out["slot_moves_in_training"] = _record_throughput(manager.history)
        out["redundant_slots"] = int(handle.placement.num_slots - handle.num_experts)
        out["slots_per_rank"] = int(handle.slots_per_rank)
    if after is not None:
        out.update(after(engine, manager))
    if router is not None:
        router.remove()
    if manager is not None:
        manager.close()
    del engine, manager, model, handle
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    if rank == 0:
        log.info(
            "run %-9s %d steps in %.1f s: median step %.2f ms, balancedness %.3f, %d rebalances",
            name, args.steps, seconds, out["step_ms"]["median_ms"], bal["mean_per_step"],
            len(out.get("rebalances", [])),
        )  # fmt: skip
    return out


def _kind(row: dict) -> str:
    ev = row["events"]
    if "_await_plan" in ev:  # the plan arrives (the first layer's transfer may start in the same step)
        return "plan_await"
    if any(k in ev for k in TRANSFER_EVENTS):
        return "transfer"
    if "_start_planning" in ev:
        return "gather"
    if row["phase_before"] == row["phase_after"] == "planning":
        return "planning"
    return "steady"


def _summarize(name: str, rows: list[dict], warmup: int) -> dict:
    timed = rows[warmup:]
    by_kind: dict[str, list[float]] = {}
    for r in timed:
        by_kind.setdefault(r["kind"], []).append(r["ms"])
    return {
        "name": name,
        "steps": len(rows),
        "warmup_steps": warmup,
        "losses": [r["loss"] for r in rows],
        "step_ms": time_stats([r["ms"] for r in timed]),
        "step_wall_ms": time_stats([r["wall_ms"] for r in timed]),
        "by_kind": {k: time_stats(v) for k, v in sorted(by_kind.items())},
        "rows": rows,
    }


def _record_throughput(history) -> dict:
    """Bytes/s of the slot moves, from the rebalance records: moved bytes (every rank's sends: weights +
    optimizer state) over the host seconds spent posting and finishing the transfers."""
    moved = sum(r.moved_bytes for r in history)
    secs = sum(r.seconds.get("transfer", 0.0) for r in history)
    per = [
        {"step": r.completed_step, "outcome": r.outcome, "moved_slots": r.moved_slots, "moved_bytes": r.moved_bytes,
         "transfer_s": r.seconds.get("transfer"),
         "bytes_per_s": r.moved_bytes / r.seconds["transfer"] if r.seconds.get("transfer") else None,
         "balancedness_before": r.balancedness_before, "balancedness_after": r.balancedness_after,
         "measured_before": r.measured_balancedness_before, "measured_after": r.measured_balancedness_after}
        for r in history
    ]  # fmt: skip
    return {
        "rebalances": len(history),
        "committed": sum(r.outcome == "committed" for r in history),
        "moved_slots": int(sum(r.moved_slots for r in history)),
        "moved_bytes": int(moved),
        "transfer_s": secs,
        "bytes_per_s": moved / secs if secs > 0 and moved else None,
        "per_rebalance": per,
    }


# ============================================================================ P2P
def p2p_probe(ranks: list[int], group, sizes: list[int], reps: int) -> list[dict]:
    """Ring ``batch_isend_irecv`` over ``ranks`` (each rank sends ``size`` bytes to the next and receives as
    many from the previous, at once).  Per size: median seconds (slowest rank of each repetition), bytes/s
    sent per rank and in all (ranks x size / s).  Collective over ``group``."""
    me = dist.get_rank()
    n = len(ranks)
    i = ranks.index(me)
    nxt, prv = ranks[(i + 1) % n], ranks[(i - 1) % n]
    device = _coll_device()
    out = []
    for size in sizes:
        send = torch.ones(size, dtype=torch.uint8, device=device)
        recv = torch.zeros(size, dtype=torch.uint8, device=device)
        times = []
        for rep in range(reps + 2):
            dist.barrier(group=group)
            _sync()
            t0 = time.perf_counter()
            ops = [dist.P2POp(dist.isend, send, nxt, group), dist.P2POp(dist.irecv, recv, prv, group)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            _sync()
            if rep >= 2:
                times.append(time.perf_counter() - t0)
        t = _max_over_ranks(times)
        med = float(np.median(t))
        out.append(
            {"bytes": size, "ranks": n, "median_s": med, "bytes_per_s_per_rank": size / med,
             "bytes_per_s_total": n * size / med, "received_ok": bool(recv.min().item() == 1)}
        )  # fmt: skip
        del send, recv
    return out


def slot_move_probe(args: argparse.Namespace, engine, manager) -> dict:
    """Move every slot of the trained model (weights + DeepSpeed's fp32 master + Adam moments) to the next
    EP rank with the :class:`TransferExecutor`, then back (the model ends as it was).  Synchronous, timed
    alone: seconds of ``run()`` per pass (slowest rank), bytes = the plan's sends x slot bytes."""
    from megatron_eplb.patches import deepspeed as eplb_ds

    from megatron_eplb.transfer import TransferExecutor, plan_transfer, slot_nbytes

    handle = manager.handle
    if handle.ep_size < 2:
        return {}
    state = eplb_ds.DeepSpeedSlotState(engine)

    def tensors(layer: int, k: int) -> list[torch.Tensor]:
        params = list(handle.slot_params(layer, k))
        return [p.data for p in params] + state.tensors(params)

    old = handle.placement
    s = handle.slots_per_rank
    moved = ExpertPlacement(
        np.roll(old.phy2log, s, axis=1), old.num_ranks, old.num_experts, allow_same_rank_copies=True
    )
    plans = [plan_transfer(old, moved), plan_transfer(moved, old)]
    executors = [TransferExecutor(p, tensors, group=handle.ep_group) for p in plans]
    slot_bytes = slot_nbytes(tensors(0, 0))
    before = [t.detach().clone() for t in tensors(0, 0)]
    times = []
    for _ in range(max(2, args.probe_reps // 4)):
        for ex in executors:
            dist.barrier()
            _sync()
            t0 = time.perf_counter()
            ex.run()
            _sync()
            times.append(time.perf_counter() - t0)
    restored = all(torch.equal(a, b) for a, b in zip(before, tensors(0, 0)))
    times = _max_over_ranks(times)
    sends = [int(sum(p.layer(i).num_sends for i in range(p.num_layers))) for p in plans]
    me = handle.ep_rank
    mine = max(int(sum(len(p.layer(i).sends_from(me)) for i in range(p.num_layers))) for p in plans)
    mine = int(_max_over_ranks([float(mine)])[0])
    med = float(np.median(times))
    total = float(np.mean(sends)) * slot_bytes
    return {
        "slot_move_probe": {
            "slot_bytes": slot_bytes,
            "slot_tensors": len(tensors(0, 0)),
            "layers": handle.num_layers,
            "sends_per_pass": sends,
            "max_slots_sent_per_rank_per_pass": mine,
            "message_bytes_per_peer_per_layer": s * slot_bytes,
            "median_s_per_pass": med,
            "bytes_per_s_total": total / med,
            "bytes_per_s_per_rank": mine * slot_bytes / med,
            "restored_bitwise": restored,
        }
    }


# ============================================================================ main
def compare_losses(base: list[float], other: list[float], rtol: float) -> dict:
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(other, base)]
    over = [i for i, r in enumerate(rel) if r > rtol]
    return {
        "max_rel": max(rel),
        "mean_rel": float(np.mean(rel)),
        "rtol": rtol,
        "first_step_over": over[0] if over else None,
        "steps": len(rel),
        "pass": not over,
    }


def run(args: argparse.Namespace) -> dict:
    from megatron_eplb.manager import EPLBManager
    from megatron_eplb.transfer import TransferExecutor

    for name in TRANSFER_EVENTS:
        count_calls(TransferExecutor, name, _EVENTS)
    for name in PLAN_EVENTS:
        count_calls(EPLBManager, name, _EVENTS)
    t0 = time.monotonic()
    ep = init(args)
    rank = dist.get_rank()
    result: dict = {"issue": 8, "benchmark": "benchmarks/multi_gpu_bench.py", "env": environment(args, ep)}
    result["seconds_init"] = time.monotonic() - t0
    result["setup"] = {
        k: getattr(args, k)
        for k in (*FULL, "domains", "switch_at", "zero_stage", "dtype", "loss_rtol", "runs")
    }
    result["setup"]["tokens_per_rank_per_step"] = args.seq_length * args.micro_batch_size
    result["setup"]["eplb"] = eplb_config(args, ep)
    if rank == 0:
        log.info("setup %s", json.dumps(result["setup"]))
    runs = {}
    for name in args.runs:
        after = (lambda e, m: slot_move_probe(args, e, m)) if name == "eplb" else None
        runs[name] = train_run(name, args, ep, after=after)
    result["runs"] = runs

    # P2P probe over this rank's EP group, at the executor's message size among others.
    from megatron.core import parallel_state as ps

    group = ps.get_expert_model_parallel_group()
    ranks = dist.get_process_group_ranks(group)
    slot_bytes = runs.get("eplb", {}).get("slot_move_probe", {}).get("message_bytes_per_peer_per_layer")
    base_sizes = [1 << 20, 16 << 20, 256 << 20] if not args.small else [64 << 10, 1 << 20]
    sizes = sorted(set(base_sizes + ([int(slot_bytes)] if slot_bytes else [])))
    result["p2p_probe"] = p2p_probe(ranks, group, sizes, args.probe_reps) if len(ranks) > 1 else []

    result["summary"] = summarize(result, args)
    return result


def summarize(result: dict, args: argparse.Namespace) -> dict:
    runs = result["runs"]
    off = runs["off"]
    s: dict = {"loss": {}, "step_median_ms": {}, "balancedness": {}, "stall": {}, "p2p": {}}
    for name, r in runs.items():
        s["step_median_ms"][name] = r["step_ms"]["median_ms"]
        s["balancedness"][name] = {
            k: r["balancedness"][k] for k in ("mean_per_step", "summed", "second_domain", "last_quarter")
        }
        if name != "off":
            s["loss"][name] = compare_losses(off["losses"], r["losses"], args.loss_rtol)
    base = off["step_ms"]["median_ms"]
    for name in ("eplb", "rotate"):
        if name not in runs:
            continue
        r = runs[name]
        kinds = r["by_kind"]
        med = {k: v.get("median_ms") for k, v in kinds.items()}
        timed = r["rows"][r["warmup_steps"] :]
        rebalance = _median([x["ms"] for x in timed if x["kind"] in ("gather", "plan_await", "transfer")])
        s["stall"][name] = {
            "step_vs_off": _ratio(r["step_ms"]["median_ms"], base),
            "steady_vs_off": _ratio(med.get("steady"), base),
            "transfer_steps": kinds.get("transfer", {}).get("n", 0),
            "transfer_vs_steady": _ratio(med.get("transfer"), med.get("steady")),
            "transfer_vs_off": _ratio(med.get("transfer"), base),
            "plan_await_vs_steady": _ratio(med.get("plan_await"), med.get("steady")),
            "gather_vs_steady": _ratio(med.get("gather"), med.get("steady")),
            "planning_vs_steady": _ratio(med.get("planning"), med.get("steady")),
            "rebalance_steps_vs_steady": _ratio(rebalance, med.get("steady")),
            "rebalance_steps_vs_off": _ratio(rebalance, base),
            "target": 1.05,
        }
        s["p2p"][f"{name}_training_bytes_per_s"] = r["slot_moves_in_training"]["bytes_per_s"]
    probe = runs.get("eplb", {}).get("slot_move_probe")
    if probe:
        s["p2p"]["slot_move_probe_bytes_per_s_per_rank"] = probe["bytes_per_s_per_rank"]
        same = [p for p in result["p2p_probe"] if p["bytes"] == probe["message_bytes_per_peer_per_layer"]]
        if same:
            s["p2p"]["probe_at_same_size_bytes_per_s_per_rank"] = same[0]["bytes_per_s_per_rank"]
            s["p2p"]["slot_moves_vs_probe"] = probe["bytes_per_s_per_rank"] / same[0]["bytes_per_s_per_rank"]
    if result["p2p_probe"]:
        s["p2p"]["probe_max_bytes_per_s_per_rank"] = max(
            p["bytes_per_s_per_rank"] for p in result["p2p_probe"]
        )
    s["loss_pass"] = all(v["pass"] for v in s["loss"].values())
    return s


def _gbs(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1e9:.2f} GB/s" if x >= 1e8 else f"{x / 1e6:.1f} MB/s"


def _f(x, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def table(result: dict) -> str:
    env, s, runs = result["env"], result["summary"], result["runs"]
    names = list(runs)
    lines = [
        f"multi-GPU EPLB benchmark: {env['world_size']} x {env['device_names'][0].split(': ', 1)[-1]}, "
        f"EP={env['ep_size']}, {env['backend']}, {env['dtype']}, torch {env['torch']}, deepspeed "
        f"{env['deepspeed']}, megatron-core {env['megatron_core']}",
        "",
        "| what | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        "| median step (ms) | " + " | ".join(_f(s["step_median_ms"][n], ".2f") for n in names) + " |",
        "| balancedness, mean per step (on the summed loads) | "
        + " | ".join(
            f"{_f(s['balancedness'][n]['mean_per_step'])} ({_f(s['balancedness'][n]['summed'])})"
            for n in names
        )
        + " |",
        "| balancedness, after the domain switch | "
        + " | ".join(_f(s["balancedness"][n]["second_domain"]) for n in names)
        + " |",
        "| loss max rel. diff vs off | "
        + " | ".join(
            "–"
            if n == "off"
            else f"{s['loss'][n]['max_rel']:.2e} ({'pass' if s['loss'][n]['pass'] else 'FAIL'})"
            for n in names
        )
        + " |",
        "| rebalances (committed) / slots moved | "
        + " | ".join(
            "–"
            if "slot_moves_in_training" not in runs[n]
            else f"{runs[n]['slot_moves_in_training']['rebalances']} "
            f"({runs[n]['slot_moves_in_training']['committed']}) / {runs[n]['slot_moves_in_training']['moved_slots']}"
            for n in names
        )
        + " |",
        "| transfer steps: n, vs steady, vs off (target ≤ 1.05) | "
        + " | ".join(
            "–"
            if n not in s["stall"]
            else f"{s['stall'][n]['transfer_steps']}, {_f(s['stall'][n]['transfer_vs_steady'], '.2f')}x, "
            f"{_f(s['stall'][n]['transfer_vs_off'], '.2f')}x"
            for n in names
        )
        + " |",
        "| all rebalance steps (gather, plan, transfer) vs steady, vs off | "
        + " | ".join(
            "–"
            if n not in s["stall"]
            else f"{_f(s['stall'][n]['rebalance_steps_vs_steady'], '.2f')}x, "
            f"{_f(s['stall'][n]['rebalance_steps_vs_off'], '.2f')}x"
            for n in names
        )
        + " |",
        "| steady steps vs off | "
        + " | ".join(
            "–" if n not in s["stall"] else f"{_f(s['stall'][n]['steady_vs_off'], '.2f')}x" for n in names
        )
        + " |",
        "| slot moves in training (record bytes / transfer s) | "
        + " | ".join(
            _gbs(runs[n]["slot_moves_in_training"]["bytes_per_s"])
            if "slot_moves_in_training" in runs[n]
            else "–"
            for n in names
        )
        + " |",
        "",
    ]
    probe = runs.get("eplb", {}).get("slot_move_probe")
    if probe:
        lines.append(
            f"slot-move probe (TransferExecutor, every slot to the next rank, {probe['slot_bytes']} B/slot): "
            f"{_gbs(probe['bytes_per_s_per_rank'])} per rank, {_gbs(probe['bytes_per_s_total'])} in all; "
            f"model restored bitwise: {probe['restored_bitwise']}"
        )
    for p in result["p2p_probe"]:
        lines.append(
            f"P2P ring probe {p['bytes']:>11d} B: {_gbs(p['bytes_per_s_per_rank'])} per rank, "
            f"{_gbs(p['bytes_per_s_total'])} in all ({p['median_s'] * 1e3:.3f} ms)"
        )
    if "slot_moves_vs_probe" in s["p2p"]:
        lines.append(
            f"slot-move probe / P2P probe at the same message size: {s['p2p']['slot_moves_vs_probe']:.2f}"
        )
    lines.append(f"loss comparison: {'PASS' if s['loss_pass'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if int(os.environ.get("RANK", 0)) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    args = parse_args(argv)
    t0 = time.monotonic()
    result = run(args)
    result["seconds_total"] = time.monotonic() - t0
    code = 0 if result["summary"]["loss_pass"] else 1
    if dist.get_rank() == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"multi_gpu_ws{result['env']['world_size']}_{result['env']['device']}.json"
        path.write_text(json.dumps(result, indent=1, default=float))
        print(table(result), flush=True)
        print(f"results: {path} ({result['seconds_total']:.0f} s)", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
