"""Multi-GPU EPLB benchmark (issue #8): DeepSpeed + Megatron-core GPT MoE, EP over NCCL, with and without EPLB.

One command, through the ``deepspeed`` launcher as a user would run it::

    benchmarks/run_multi_gpu.sh 2            # = deepspeed --num_gpus 2 benchmarks/multi_gpu_bench.py
    benchmarks/run_multi_gpu.sh 1            # one GPU: EP = 1 (no ring probe, no rotate run)
    benchmarks/run_multi_gpu.sh 4 --steps 200

On CPU (gloo; sizes scale down, ``--small`` is implied without CUDA; its numbers only check the script)::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/deepspeed --num_gpus 2 benchmarks/multi_gpu_bench.py --small

What one launch measures, every rank in step (EP = world size unless ``--ep`` says otherwise):

* **training runs on the same data and seed** (``examples/train.py``'s model and data, imported; the
  DeepSpeed config is built here from the preset's recipe: AdamW, ``lr`` with a linear warmup over
  ``lr_warmup`` steps and a cosine decay to ``lr_min_ratio`` x ``lr`` (DeepSpeed's ``WarmupCosineLR``),
  gradient clipping ``grad_clip``): ``off`` (DeepSpeed + Megatron MoE, no EPLB), ``eplb`` (dynamic EPLB,
  default policy, redundant slots, even split of a replicated expert's tokens over its copies),
  ``eplb_balanced`` (the same with per-batch replica shares: ``eplb_replica_dispatch: balanced``),
  ``eplb_fast`` (per-step replicas: no persistent redundant slot, ``--redundancy-per-rank`` spare slots per
  rank refilled every step with copies of its hottest experts, ``eplb_fast_replicas``), ``rotate`` (dynamic EPLB with a test policy that sends every rank's slots
  to the next rank at every rebalance: forced moves, the worst case for the stall; needs EP >= 2) and, on
  CUDA, ``off_again`` (the baseline once more: the run-to-run noise band of non-deterministic kernels);
  ``off_reordered`` (the baseline with each micro-batch's sequences in reverse order: the same math, every
  sum over tokens in another order — the noise floor of a reordering, which is what replicas do to an
  expert's weight gradient: each copy sums its share of the tokens and the copies' sums are added).
  bf16 on GPU, fp32 on CPU.  The text switches domain (code -> Wikipedia) half-way, which shifts the routing;
* **loss** of every run against ``off``, step by step.  With ``off_again`` and/or ``off_reordered``: the
  noise band, per step the larger of ``|off - off_again|`` and ``|off - off_reordered|``; ``eplb`` /
  ``rotate`` pass when their mean and max relative difference from ``off`` are within ``--band-factor`` x
  the band's (or within ``--loss-rtol``, whichever is
  larger), and the baseline itself trains smoothly and reproduces within ``--band-max``.  Without it (CPU,
  fp32): every step within ``--loss-rtol`` (strict);
* **step time**: median over the steps after ``--warmup`` (CUDA events from the start of the forward to
  the end of ``engine.step()`` on GPU, wall time between host syncs on CPU; the slowest rank of each step),
  and the **worst rebalance step** (max over the gather / plan_await / transfer steps) vs the steady median;
* **balancedness** (mean rank load / max rank load, per layer, per step) measured from what was computed:
  per-slot token counts with EPLB, the router's per-expert counts without;
* **stall**: steps that post, finish or commit a layer's transfer (or await the plan) vs steady steps, in
  the same run and vs ``off`` (target <= 1.05x, for the medians and for the worst step);
* **P2P bandwidth** (EP >= 2): a ring ``batch_isend_irecv`` probe over the EP group (NCCL on GPU, gloo on
  CPU) at several message sizes, against (a) the bytes/s of the manager's slot moves during training (moved
  bytes / transfer seconds of every :class:`~megatron_eplb.manager.RebalanceRecord`; the seconds are the host
  time spent posting and finishing, not the part hidden behind the forward), and (b) the
  :class:`~megatron_eplb.transfer.TransferExecutor` moving every slot of the trained ``eplb`` model
  (weights + fp32 master + Adam moments) to the next rank and back, synchronously, timed alone.

Rank 0 writes ``OUT/multi_gpu_ws<WORLD>_<cuda|cpu>.json`` (device names, versions, world size, the recipe and
the ds_config, every per-step row, what was skipped and why) and prints a table in the format of
``docs/multi_gpu.md``.  Exit code 1 when a loss comparison fails or is inconclusive.
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
from bench_common import apply_preset, count_calls, rotate_policy, time_stats  # noqa: E402
from data import ByteBatches, load_domain  # noqa: E402

from megatron_eplb.comm import collective_device  # noqa: E402
from megatron_eplb.placement import ExpertPlacement  # noqa: E402

log = logging.getLogger("megatron_eplb.multi_gpu_bench")

CUDA = torch.cuda.is_available()

# Model, schedule and training recipe presets; every field can be overridden by the flag of the same name.
# The recipe (lr, lr_warmup, lr_min_ratio, grad_clip; AdamW betas (0.9, 0.95), eps 1e-8, no weight decay) is
# the usual one for a ~1B-parameter decoder (hidden 2048): peak lr 3e-4, linear warmup, cosine decay, clipping
# at 1.0.  With configs/ds_config.json's lr 3e-3 and no warmup the bf16 GPU runs diverged (5.9 -> 12.2 -> 7.0
# -> 13.0 ...), off_again included, so the loss comparisons measured nothing.  The small CPU model takes a
# larger lr (narrow models tolerate it; it only has to move the loss in 40 steps).
FULL = dict(
    num_layers=4, hidden_size=2048, ffn_hidden_size=2048, num_attention_heads=16, num_experts=32, topk=4,
    seq_length=2048, micro_batch_size=4, redundancy_per_rank=1, steps=120, warmup=10, rebalance_every=25,
    wait_worker=5, lr=3e-4, lr_warmup=20, lr_min_ratio=0.1, grad_clip=1.0,
)  # fmt: skip
SMALL = dict(
    num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_experts=16, topk=2,
    seq_length=64, micro_batch_size=4, redundancy_per_rank=1, steps=40, warmup=4, rebalance_every=10,
    wait_worker=2, lr=1e-3, lr_warmup=5, lr_min_ratio=0.1, grad_clip=1.0,
)  # fmt: skip
ADAM = dict(betas=[0.9, 0.95], eps=1e-8, weight_decay=0.0)

RUNS = ("off", "off_again", "off_reordered", "eplb", "eplb_balanced", "eplb_fast", "rotate")
EPLB_RUNS = ("eplb", "eplb_balanced", "eplb_fast", "rotate")  # runs with dynamic EPLB
REFERENCES = ("off_again", "off_reordered")  # runs without EPLB whose distance from off is the noise band
TRANSFER_EVENTS = ("start_layer", "finish_layer")
REBALANCE_KINDS = ("gather", "plan_await", "transfer")
STALL_TARGET = 1.05
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
    p.add_argument("--runs", default=None, help=f"comma list of {','.join(RUNS)} (default: all; "
                   "off_again only on CUDA); off is always run first")  # fmt: skip
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: world size)")
    p.add_argument(
        "--deepspeed_config", "--deepspeed-config", default=str(REPO / "configs" / "ds_config.json")
    )
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, else fp32")
    p.add_argument("--loss-rtol", type=float, default=None,
                   help="without a reference run: max relative loss difference per step vs off; with one: the floor "
                        "of the allowed difference (default: 1e-2 bf16, 1e-4 fp32)")  # fmt: skip
    p.add_argument("--band-factor", type=float, default=2.0,
                   help="eplb/rotate may be this many times as far from off as the band is")  # fmt: skip
    p.add_argument("--band-max", type=float, default=0.05,
                   help="a reference run further than this (max rel.) from off: the comparison is inconclusive")  # fmt: skip
    p.add_argument("--max-rise", type=float, default=0.15,
                   help="the baseline trains smoothly when its loss (mean of 5 steps) never rises more than this "
                        "fraction over its lowest so far in a domain (after the lr warmup)")  # fmt: skip
    p.add_argument("--domains", default="code,wikipedia")
    p.add_argument("--switch-at", type=float, default=0.5, help="fraction of --steps")
    p.add_argument("--probe-reps", type=int, default=None, help="repetitions per P2P size (default 20 / 5)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--profile-steps", type=int, default=0,
                   help="profile this many steady steps of every run (torch.profiler, after --warmup + 2): rank 0 "
                        "writes OUT/profile_<run>.txt, the top ops by self host time and by device time")  # fmt: skip
    for key, value in FULL.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None)
    args = p.parse_args(argv)
    apply_preset(args, SMALL, FULL)
    args.dtype = args.dtype or ("bf16" if CUDA else "fp32")
    if args.loss_rtol is None:
        args.loss_rtol = 1e-2 if args.dtype == "bf16" else 1e-4
    if args.probe_reps is None:
        args.probe_reps = 20 if CUDA else 5
    runs = (args.runs or ",".join(r for r in RUNS if CUDA or r != "off_again")).split(",")
    unknown = set(runs) - set(RUNS)
    if unknown:
        p.error(f"--runs: unknown run(s) {sorted(unknown)}; choose from {', '.join(RUNS)}")
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


def ds_config(args: argparse.Namespace, targs: argparse.Namespace) -> dict:
    """The DeepSpeed config of every run: ``--deepspeed_config`` (ZeRO stage, micro batch, bf16 through
    ``examples/train.py``) with this benchmark's training recipe written over it, so that the recipe is the
    preset's whatever the file says: AdamW (``ADAM``, peak ``lr``), ``WarmupCosineLR`` (linear warmup over
    ``lr_warmup`` steps from 0, cosine decay to ``lr_min_ratio`` x ``lr`` at ``steps``), ``gradient_clipping``
    ``grad_clip`` (DeepSpeed's own clipping is replaced by megatron-eplb's logical clipping, same norm).  The
    file's ``"eplb"`` section is dropped: the EPLB runs get :func:`eplb_config` only."""
    cfg = train.ds_config_for(targs)
    cfg.pop("eplb", None)
    cfg["optimizer"] = {"type": "AdamW", "params": {**cfg.get("optimizer", {}).get("params", {}), **ADAM}}
    cfg["optimizer"]["params"]["lr"] = args.lr
    cfg["gradient_clipping"] = args.grad_clip
    cfg["scheduler"] = {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": args.steps,
            "warmup_num_steps": max(1, args.lr_warmup),  # DeepSpeed needs >= 1
            "warmup_min_ratio": 0.0,
            "cos_min_ratio": args.lr_min_ratio,
            "warmup_type": "linear",
        },
    }
    return cfg


# ============================================================================ helpers
def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _max_over_ranks(values: list[float]) -> list[float]:
    """Element-wise max over every rank (the slowest rank sets the pace of a step)."""
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


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
    return train.init_parallel(args.ep, args.seed)  # sets the device; version fixes on any device


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
def eplb_config(args: argparse.Namespace, ep: int, dispatch: str = "even", fast: bool = False) -> dict:
    extra = dict(eplb_fast_replicas=True, eplb_fast_replica_budget=args.redundancy_per_rank) if fast else {}
    return dict(
        **extra,
        eplb_replica_dispatch=dispatch,
        dynamic_eplb=True,
        init_redundancy_expert=0 if fast else args.redundancy_per_rank * ep,
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
    device = collective_device()
    targs = train.parse_args(train_argv(args, ep))
    model = train.build_model(targs, ep)
    if CUDA:
        model = model.to(
            device
        )  # before initialize: the EPLB handle keeps its buffers on the experts' device
    dynamic = name in EPLB_RUNS
    router = None if dynamic else _RouterCounts(model, device)
    engine, _, _, _, manager = eplb_ds.initialize(
        model=model,
        config=ds_config(args, targs),
        eplb=eplb_config(args, ep, "even" if name in ("eplb", "rotate") else "balanced", name == "eplb_fast")
        if dynamic
        else False,
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
    prof_at = args.warmup + 2 if args.profile_steps > 0 else -1
    prof = None
    _sync()
    dist.barrier()
    t_run = time.monotonic()
    for it in range(args.steps):
        if it == prof_at:
            prof = _profiler()
            prof.__enter__()
        elif prof is not None and it == prof_at + args.profile_steps:
            prof.__exit__(None, None, None)
            _write_profile(prof, name, args)
            prof = None
        domain = 0 if it < switch else 1
        tokens, labels = (t.to(device, non_blocking=True) for t in batches[domain].next())
        if name == "off_reordered":  # the same micro-batch, its sequences in reverse order
            tokens, labels = tokens.flip(0), labels.flip(0)
        lr = float(engine.get_lr()[0])  # the lr this step's update uses
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
            counts = handle.slot_loads().clone()  # this step's per-slot counts (reset by engine.step)
            if handle.fast is not None:  # spare slots (eplb_fast): their tokens on the rank's first slot
                counts[:, 0] += handle.fast.spare_loads.sum(dim=1).to(counts.device)
            loads.append(counts)
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
            dict(step=it, domain=domains[domain], loss=value, lr=lr, wall_ms=wall, events=dict(_EVENTS),
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


def _profiler():
    """A ``torch.profiler`` over host ops (and CUDA kernels on GPU)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if CUDA:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=acts, record_shapes=False)


def _write_profile(prof, name: str, args: argparse.Namespace) -> None:
    """Rank 0: ``OUT/profile_<name>.txt``, the top 40 ops by self host time and by device time."""
    if dist.get_rank() != 0:
        return
    avg = prof.key_averages()
    text = [f"# {name}: {args.profile_steps} steps after step {args.warmup + 2}"]
    text.append(avg.table(sort_by="self_cpu_time_total", row_limit=40))
    if CUDA:
        text.append(avg.table(sort_by="self_device_time_total", row_limit=40))
    out = Path(args.out) / f"profile_{name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(text))
    log.info("profile of run %s: %s", name, out)


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
    device = collective_device()
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


# ============================================================================ loss
def compare_losses(base: list[float], other: list[float], rtol: float) -> dict:
    """Strict check (fp32, no noise band): every step's relative difference from ``base`` within ``rtol``."""
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(other, base)]
    over = [i for i, r in enumerate(rel) if r > rtol]
    return {
        "mode": "rtol",
        "max_rel": max(rel),
        "mean_rel": float(np.mean(rel)),
        "rtol": rtol,
        "first_step_over": over[0] if over else None,
        "steps": len(rel),
        "pass": not over,
    }


def band_compare(
    base: list[float],
    references: list[list[float]],
    other: list[float],
    factor: float,
    floor: float,
    smooth: int = 1,
) -> dict:
    """``other`` vs ``base`` against the noise band of the baseline run again (``references``: the rerun, the
    run on reordered batches).

    With ``smooth > 1`` every curve is first replaced by its moving average over ``smooth`` steps (bf16: the
    difference between two runs is chaotic, one step's loss can differ by 27 % between two runs of the same
    code while their curves agree within 2 %; the curve is what training equivalence means there).  Per step
    ``t``: ``band[t] = max_r |r[t] - base[t]| / |base[t]|`` (the run-to-run noise of non-deterministic
    kernels, the noise of summing in another order), ``rel[t] = |other[t] - base[t]| / |base[t]|``.  ``other``
    passes when it is no further from ``base`` than the references are, within ``factor``:
    ``mean(rel) <= max(factor * mean(band), floor)``, and, per step only (``smooth == 1``: fp32, where the
    band is small and steady), ``max(rel) <= max(factor * max(band), floor)`` (``floor``: for a band that
    happens to be ~0); smoothed, the max is one extreme sample of the noise and is reported, not judged.
    ``within_band_frac``: steps with ``rel[t] <= factor * band[t]`` (informational: the per-step band crosses
    zero wherever the two baselines cross; if ``other`` were a third sample of the same noise, about 70 %
    of its steps would be within 2x the band).
    """
    n = min(len(x) for x in (base, other, *references))
    k = max(1, min(smooth, n))
    curve = lambda x: np.convolve(np.asarray(x[:n], dtype=np.float64), np.ones(k) / k, mode="valid")  # noqa: E731
    b, o = curve(base), curve(other)
    refs = np.asarray([curve(r) for r in references])  # [R, n - k + 1]
    scale = np.maximum(np.abs(b), 1e-12)
    band, rel = (np.abs(refs - b) / scale).max(axis=0), np.abs(o - b) / scale
    allowed_max = max(factor * float(band.max()), floor) if k == 1 else None
    allowed_mean = max(factor * float(band.mean()), floor)
    over = np.flatnonzero(rel > (allowed_max if k == 1 else factor * band + floor))
    return {
        "mode": "band",
        "smooth": k,
        "max_rel": float(rel.max()),
        "mean_rel": float(rel.mean()),
        "band_max_rel": float(band.max()),
        "band_mean_rel": float(band.mean()),
        "max_vs_band": _ratio(float(rel.max()), float(band.max())),
        "mean_vs_band": _ratio(float(rel.mean()), float(band.mean())),
        "within_band_frac": float(np.mean(rel <= factor * band + 1e-7)),
        "band_factor": factor,
        "floor": floor,
        "allowed_max_rel": allowed_max,
        "allowed_mean_rel": allowed_mean,
        "first_step_over": int(over[0]) if over.size else None,
        "steps": n,
        "pass": bool(rel.mean() <= allowed_mean and (k > 1 or rel.max() <= allowed_max)),
    }


SMOOTH_WINDOW = 5


def loss_health(losses: list[float], switch: int, lr_warmup: int, max_rise: float) -> dict:
    """Does a run train smoothly?  Per domain (steps ``[0, switch)`` and ``[switch, T)``): the mean of its
    first and last 5 losses, and ``max_rise``: the largest relative rise of the loss, averaged over the last
    ``SMOOTH_WINDOW`` steps (one batch's loss is noisy), over the lowest such average so far in that domain,
    counted once the lr warmup is over (first domain) or once a window lies inside the domain (second).
    ``smooth``: every domain's loss falls (last < first) and no rise exceeds ``max_rise`` (a spike or a
    divergence: 5.9 -> 12.2 -> 7.0 -> 13.0 rises by > 100 %)."""
    x = np.asarray(losses, dtype=np.float64)
    out: dict = {"domains": [], "max_rise_allowed": max_rise, "window": SMOOTH_WINDOW}
    for d, (lo, hi) in enumerate(((0, min(switch, len(x))), (min(switch, len(x)), len(x)))):
        seg = x[lo:hi]
        if seg.size < 2:
            continue
        k = max(1, min(SMOOTH_WINDOW, seg.size // 2))
        avg = np.convolve(seg, np.ones(k) / k, mode="valid")  # avg[i]: mean of seg[i : i + k]
        start = max(0, min(lr_warmup - k + 1, avg.size - 1)) if d == 0 else 0
        rise = avg[start:] / np.minimum.accumulate(avg[start:]) - 1.0
        worst = int(np.argmax(rise))
        out["domains"].append(
            {"steps": [lo, hi], "first": float(seg[:k].mean()), "last": float(seg[-k:].mean()),
             "max_rise": float(rise[worst]), "max_rise_step": lo + start + worst + k - 1}
        )  # fmt: skip
    out["smooth"] = bool(out["domains"]) and all(
        d["last"] < d["first"] and d["max_rise"] <= max_rise for d in out["domains"]
    )
    out["finite"] = bool(np.isfinite(x).all())
    return out


def loss_summary(runs: dict, args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """Per run: its comparison with ``off`` and its health; and the verdict ``{mode, pass, why}``.

    With a reference run (``off_again``, ``off_reordered``; mode ``band``): each reference passes when it stays
    within ``--band-max`` of ``off``, ``eplb``/``rotate`` are held to :func:`band_compare` against the
    references, and the verdict also needs the baselines to train smoothly (else the comparison measures
    nothing: ``inconclusive``).  Without one (mode ``rtol``): :func:`compare_losses` at ``--loss-rtol``."""
    off = runs["off"]["losses"]
    switch = runs["off"]["switch_step"]
    health = {n: loss_health(r["losses"], switch, args.lr_warmup, args.max_rise) for n, r in runs.items()}
    cmp: dict = {}
    why: list[str] = []
    refs = [r for r in REFERENCES if r in runs]
    if refs:
        mode = "band"
        smooth = SMOOTH_WINDOW if getattr(args, "dtype", "fp32") == "bf16" else 1
        for name in refs:
            # A reference against off alone (its own band is zero): reproduces within --band-max?
            ref = band_compare(off, [off], runs[name]["losses"], 1.0, args.band_max, smooth)
            ref["mode"] = "band_reference"
            cmp[name] = ref
            if not ref["pass"]:
                stat = f"max {ref['max_rel']:.3g}" if smooth == 1 else f"mean {ref['mean_rel']:.3g}"
                why.append(f"inconclusive: {name} is {stat} from off (> --band-max {args.band_max})")
        references = [runs[r]["losses"] for r in refs]
        for name in runs:
            if name != "off" and name not in refs:
                cmp[name] = band_compare(
                    off, references, runs[name]["losses"], args.band_factor, args.loss_rtol, smooth
                )
        for name in ("off", *refs):
            if not (health[name]["smooth"] and health[name]["finite"]):
                why.insert(0, f"inconclusive: {name} does not train smoothly (loss spikes or does not fall)")
    else:
        mode = "rtol"
        for name in runs:
            if name != "off":
                cmp[name] = compare_losses(off, runs[name]["losses"], args.loss_rtol)
    for name, c in cmp.items():
        if name not in REFERENCES and not c["pass"]:
            if c["mode"] == "band" and c["mean_rel"] > c["allowed_mean_rel"]:
                why.append(
                    f"{name}: further from off than allowed (mean {c['mean_rel']:.3g} > {c['allowed_mean_rel']:.3g})"
                )
            else:
                why.append(f"{name}: further from off than allowed (first at step {c['first_step_over']})")
    verdict = {"mode": mode, "pass": not why, "why": why}
    return cmp, health, verdict


# ============================================================================ main
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
    skipped: dict[str, str] = {}
    if ep < 2:
        why = f"EP={ep}: one rank holds every slot"
        if "rotate" in args.runs:
            args.runs = [r for r in args.runs if r != "rotate"]
            skipped["rotate"] = why + ", so sending each rank's slots to the next rank moves nothing"
        skipped["p2p_probe"] = why + ": no peer in the EP group to send to"
        if "eplb" in args.runs:
            skipped["slot_move_probe"] = why + ": no peer in the EP group to move slots to"
    result["skipped"] = skipped
    result["setup"] = {
        k: getattr(args, k)
        for k in (*FULL, "domains", "switch_at", "zero_stage", "dtype", "loss_rtol", "band_factor",
                  "band_max", "max_rise", "runs")
    }  # fmt: skip
    result["setup"]["tokens_per_rank_per_step"] = args.seq_length * args.micro_batch_size
    result["setup"]["recipe"] = {
        "optimizer": "AdamW", **ADAM, "lr": args.lr, "scheduler": "WarmupCosineLR (linear warmup from 0)",
        "lr_warmup_steps": args.lr_warmup, "lr_min_ratio": args.lr_min_ratio,
        "gradient_clipping": args.grad_clip,
    }  # fmt: skip
    result["setup"]["ds_config"] = ds_config(args, train.parse_args(train_argv(args, ep)))
    result["setup"]["eplb"] = eplb_config(args, ep)
    if rank == 0:
        log.info("setup %s", json.dumps(result["setup"]))
        for what, why in skipped.items():
            log.info("skipped %s: %s", what, why)
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


def _worst(rows: list[dict]) -> dict | None:
    """The slowest of ``rows``: its step, kind and ms."""
    if not rows:
        return None
    w = max(rows, key=lambda x: x["ms"])
    return {"step": w["step"], "kind": w["kind"], "ms": w["ms"]}


def summarize(result: dict, args: argparse.Namespace) -> dict:
    runs = result["runs"]
    off = runs["off"]
    s: dict = {"step_median_ms": {}, "worst_step": {}, "balancedness": {}, "stall": {}, "p2p": {}}
    s["loss"], s["loss_health"], s["loss_check"] = loss_summary(runs, args)
    for name, r in runs.items():
        s["step_median_ms"][name] = r["step_ms"]["median_ms"]
        worst = _worst(r["rows"][r["warmup_steps"] :])
        if worst is not None:  # every kind, every run: off's is the step-time jitter without EPLB
            worst["vs_median"] = _ratio(worst["ms"], r["step_ms"]["median_ms"])
        s["worst_step"][name] = worst
        s["balancedness"][name] = {
            k: r["balancedness"][k] for k in ("mean_per_step", "summed", "second_domain", "last_quarter")
        }
    base = off["step_ms"]["median_ms"]
    # Every run's median step over off's; the references' ratios are the run-to-run spread of the step time.
    s["step_vs_off"] = {name: _ratio(r["step_ms"]["median_ms"], base) for name, r in runs.items()}
    spread = [abs(s["step_vs_off"][n] - 1) for n in REFERENCES if s["step_vs_off"].get(n) is not None]
    s["step_time_spread"] = max(spread) if spread else None
    for name in EPLB_RUNS:
        if name not in runs:
            continue
        r = runs[name]
        kinds = r["by_kind"]
        med = {k: v.get("median_ms") for k, v in kinds.items()}
        timed = r["rows"][r["warmup_steps"] :]
        rebalance_rows = [x for x in timed if x["kind"] in REBALANCE_KINDS]
        rebalance = _median([x["ms"] for x in rebalance_rows])
        worst = _worst(rebalance_rows)
        if worst is not None:
            worst["vs_steady"] = _ratio(worst["ms"], med.get("steady"))
            worst["vs_off"] = _ratio(worst["ms"], base)
            worst["ok"] = worst["vs_steady"] is not None and worst["vs_steady"] <= STALL_TARGET
        s["stall"][name] = {
            "step_vs_off": _ratio(r["step_ms"]["median_ms"], base),
            "steady_vs_off": _ratio(med.get("steady"), base),
            "transfer_steps": kinds.get("transfer", {}).get("n", 0),
            "transfer_vs_steady": _ratio(med.get("transfer"), med.get("steady")),
            "transfer_vs_off": _ratio(med.get("transfer"), base),
            "plan_await_vs_steady": _ratio(med.get("plan_await"), med.get("steady")),
            "gather_vs_steady": _ratio(med.get("gather"), med.get("steady")),
            "planning_vs_steady": _ratio(med.get("planning"), med.get("steady")),
            "rebalance_steps": len(rebalance_rows),
            "rebalance_steps_vs_steady": _ratio(rebalance, med.get("steady")),
            "rebalance_steps_vs_off": _ratio(rebalance, base),
            "worst_rebalance_step": worst,
            "target": STALL_TARGET,
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
    s["loss_pass"] = s["loss_check"]["pass"]
    return s


def _gbs(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1e9:.2f} GB/s" if x >= 1e8 else f"{x / 1e6:.1f} MB/s"


def _f(x, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _x(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _loss_cell(c: dict | None) -> str:
    if c is None:
        return "–"
    verdict = "pass" if c["pass"] else "FAIL"
    if c["mode"] == "band_reference":
        stat = "max" if c["smooth"] == 1 else f"mean of {c['smooth']}-step averages"
        return f"{c['mean_rel']:.2e} / {c['max_rel']:.2e} (a reference; {stat} ≤ {c['floor']:g}: {verdict})"
    if c["mode"] == "band":
        how = "" if c["smooth"] == 1 else f"; {c['smooth']}-step averages, judged on the mean"
        return (
            f"{c['mean_rel']:.2e} / {c['max_rel']:.2e} ({_x(c['mean_vs_band'])} / "
            f"{_x(c['max_vs_band'])} the band; {c['within_band_frac']:.0%} of steps ≤ "
            f"{c['band_factor']:g}x band{how}; {verdict})"
        )
    return f"{c['mean_rel']:.2e} / {c['max_rel']:.2e} (≤ {c['rtol']:g} every step: {verdict})"


def _health_cell(h: dict) -> str:
    parts = [f"{d['first']:.2f} → {d['last']:.2f} (rise {d['max_rise']:.2f})" for d in h["domains"]]
    return "; ".join(parts) + ("" if h["smooth"] else " NOT SMOOTH")


def _worst_cell(w: dict | None, key: str) -> str:
    if w is None:
        return "–"
    cell = f"{w['kind']} @ {w['step']}: {w['ms']:.1f} ms, {_x(w[key])}"
    if "ok" in w:
        cell += "" if w["ok"] else " (over)"
    return cell


def _row(what: str, cells) -> str:
    return f"| {what} | " + " | ".join(cells) + " |"


def _stall_cells(s: dict, n: str) -> dict:
    """This run's table cells about the rebalance steps (``–`` for a run without EPLB)."""
    st = s["stall"].get(n)
    if st is None:
        return dict.fromkeys(("worst", "transfer", "rebalance", "steady"), "–")
    return {
        "worst": _worst_cell(st["worst_rebalance_step"], "vs_steady"),
        "transfer": f"{st['transfer_steps']}, {_x(st['transfer_vs_steady'])}, {_x(st['transfer_vs_off'])}",
        "rebalance": f"{st['rebalance_steps']}, {_x(st['rebalance_steps_vs_steady'])}, "
        f"{_x(st['rebalance_steps_vs_off'])}",
        "steady": f"{_x(st['steady_vs_off'])}",
    }


def table(result: dict) -> str:
    env, s, runs = result["env"], result["summary"], result["runs"]
    names = list(runs)
    stall = {n: _stall_cells(s, n) for n in names}
    moves = {n: runs[n].get("slot_moves_in_training") for n in names}
    bal = s["balancedness"]
    refs = [r for r in REFERENCES if r in runs]
    band = f" (vs the band of {' / '.join(refs)})" if s["loss_check"]["mode"] == "band" else ""
    rows = [
        ("median step (ms)", [_f(s["step_median_ms"][n], ".2f") for n in names]),
        (
            "median step vs off (run-to-run spread: the references' distance from 1)",
            [_x(s["step_vs_off"][n]) for n in names],
        ),
        (
            f"worst rebalance step (gather, plan_await, transfer): kind @ step, ms, vs steady median "
            f"(target ≤ {STALL_TARGET})",
            [stall[n]["worst"] for n in names],
        ),
        (
            "worst step of any kind: kind @ step, ms, vs the run's median",
            [_worst_cell(s["worst_step"][n], "vs_median") for n in names],
        ),
        (
            "balancedness, mean per step (on the summed loads)",
            [f"{_f(bal[n]['mean_per_step'])} ({_f(bal[n]['summed'])})" for n in names],
        ),
        ("balancedness, after the domain switch", [_f(bal[n]["second_domain"]) for n in names]),
        (
            "loss per domain: first 5 → last 5 (max rise over the running min)",
            [_health_cell(s["loss_health"][n]) for n in names],
        ),
        (
            "loss vs off: mean / max rel. diff" + band,
            ["–" if n == "off" else _loss_cell(s["loss"].get(n)) for n in names],
        ),
        (
            "rebalances (committed) / slots moved",
            [
                "–" if m is None else f"{m['rebalances']} ({m['committed']}) / {m['moved_slots']}"
                for m in moves.values()
            ],
        ),
        (
            f"transfer steps: n, median vs steady, vs off (target ≤ {STALL_TARGET})",
            [stall[n]["transfer"] for n in names],
        ),
        ("all rebalance steps: n, median vs steady, vs off", [stall[n]["rebalance"] for n in names]),
        ("steady steps vs off", [stall[n]["steady"] for n in names]),
        (
            "slot moves in training (record bytes / transfer s)",
            ["–" if m is None else _gbs(m["bytes_per_s"]) for m in moves.values()],
        ),
    ]
    lines = [
        f"multi-GPU EPLB benchmark: {env['world_size']} x {env['device_names'][0].split(': ', 1)[-1]}, "
        f"EP={env['ep_size']}, {env['backend']}, {env['dtype']}, torch {env['torch']}, deepspeed "
        f"{env['deepspeed']}, megatron-core {env['megatron_core']}",
        "",
        _row("what", names),
        "|---|" + "---|" * len(names),
        *(_row(what, cells) for what, cells in rows),
        "",
    ]
    rec = result["setup"]["recipe"]
    lines.append(
        f"recipe: AdamW lr {rec['lr']:g}, linear warmup {rec['lr_warmup_steps']} steps, cosine to "
        f"{rec['lr_min_ratio']:g} x lr at step {result['setup']['steps']}, "
        f"gradient clipping {rec['gradient_clipping']:g}"
    )
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
    for what, why in result.get("skipped", {}).items():
        lines.append(f"skipped {what}: {why}")
    check = s["loss_check"]
    lines.append(
        f"loss comparison ({check['mode']}): {'PASS' if check['pass'] else 'FAIL'}"
        + ("" if check["pass"] else ": " + "; ".join(check["why"]))
    )
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
