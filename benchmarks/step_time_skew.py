"""Where does balance turn into time?  MoE layer forward+backward time against the busiest rank's tokens.

Usage (one process per GPU; NCCL + CUDA, bf16)::

    torchrun --nproc_per_node 2 benchmarks/step_time_skew.py        # EP = 2: skew levels, off vs EPLB
    torchrun --nproc_per_node 1 benchmarks/step_time_skew.py        # EP = 1: layer time vs local tokens
    (``python -m torch.distributed.run`` where no ``torchrun`` script is on PATH; ``python
    benchmarks/step_time_skew.py`` alone is one rank too)

Without CUDA it runs on CPU with gloo (``--small`` sizes are then the default); a smoke test of the script,
its numbers mean nothing.  Writes ``--out`` (default ``benchmarks/results/step_time_skew_ws<N>_<cuda|cpu>.json``)
and prints a markdown table (rank 0).

What it measures, per expert implementation (``--kinds``):

* ``sequential``: Megatron-core ``SequentialMLP`` (one GEMM pair per local expert);
* ``grouped``: the legacy ``GroupedMLP`` (two grouped GEMMs for all local experts).  Where its
  ``grouped_gemm`` package is not importable, ``megatron_eplb.patches.megatron.grouped_gemm.install()`` points
  Megatron at megatron-eplb's drop-in (``ops.gmm`` on ``torch._grouped_mm``; the JSON's ``grouped_gemm`` says
  which one ran and its backend on this device).

One Megatron-core ``MoELayer`` (alltoall dispatcher, EP = world size, TP = PP = 1, bf16, hidden 4096, expert
FFN 2048, 64 experts, top-8, 8192 tokens per rank by default).

* EP > 1 (skew mode): the load is skewed through the router, a fixed additive bias on the router logits of
  the experts of EP rank 0 (a wrapper around ``router.gating``); for each target ``--ratios`` value
  (busiest-rank tokens / mean rank tokens) the bias is found by bisection on the router's real routing of
  the real input.  Per expert kind and skew level: the median over iterations of the slowest rank's
  forward+backward time, the tokens each rank's experts actually computed (the ``tokens_per_expert`` the
  dispatcher hands to the experts module), balancedness = mean / max.  For each kind also the same routing
  under EPLB's placement (``megatron_eplb.patches.megatron.apply`` with a placement from
  ``megatron_eplb.policy.rebalance`` planned on the level's measured expert load, ``--redundant`` slots per
  rank): off vs EPLB time at the same skew.  Each EPLB row also checks the patched layer against the
  unpatched layer of its kind (same weights, same routing; ``equivalence``): relative difference of the
  output, the input gradient, the router gradient and every slot's expert gradient (replica gradients summed)
  against its logical expert's, within ``EQUIVALENCE_RTOL`` (bf16).
* EP = 1 (tokens mode): no rank is busier than another, so the layer time is measured against the local token
  count (``--tokens`` x each of ``--token-scales``): the same slope.

Per kind a least-squares line ``ms = intercept + slope * busiest-rank tokens / 1000`` is fitted to the
default-placement rows; each EPLB row is set beside the default row of its level and beside what that line
predicts for EPLB's busiest-rank tokens.  "Tokens" of a rank are the (token, expert) pairs its experts compute
(their sum over ranks is ``tokens x topk x EP``).  Routing (router weights, input, bias) is identical for every
kind and placement.  Timing: the ranks are aligned (all-reduce + synchronize) before every iteration; one
iteration = forward of the layer + backward of a fixed output gradient into the input and every parameter;
CUDA events on GPU (wall clock on CPU); ``host_ms`` is the host time until ``backward()`` returned (it includes
the dispatcher's host syncs); on CUDA one more iteration under ``torch.profiler`` gives each rank's summed kernel
time (NCCL's apart): wall time far above the kernel time means host-bound, so balance cannot buy time.
Expected wall time on H200s: about 1-2 minutes (2 GPUs), under a minute (1 GPU), plus start-up.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import apply_preset, grouped_gemm_source  # noqa: E402

CUDA = torch.cuda.is_available()
KINDS = ("sequential", "grouped")
# bf16, patched vs unpatched: only the split of an expert's tokens over its copies (other GEMM shapes, replica
# gradients summed in fp32) changes the last bits.
EQUIVALENCE_RTOL = 2e-2
FULL = dict(hidden=4096, ffn=2048, experts=64, topk=8, tokens=8192, warmup=5, repeats=30)
SMALL = dict(hidden=64, ffn=64, experts=8, topk=2, tokens=128, warmup=1, repeats=3)


# ============================================================================ setup
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/step_time_skew_ws<N>_<dev>.json)"
    )
    p.add_argument("--small", action="store_true", help="tiny sizes (the default without CUDA)")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: sequential, grouped")
    for key in ("hidden", "ffn", "experts", "topk", "tokens", "warmup", "repeats"):
        p.add_argument(f"--{key}", type=int, default=None, help=f"default {FULL[key]} ({SMALL[key]} small)")
    p.add_argument(
        "--ratios",
        default="1.0,1.25,1.5,1.75,2.0",
        help="EP > 1: target busiest-rank / mean rank tokens (clipped to EP size: all pairs on rank 0)",
    )
    p.add_argument("--token-scales", default="0.5,1,1.5,2,3", help="EP = 1: local tokens = --tokens x each")
    p.add_argument("--redundant", type=int, default=1, help="EPLB redundant slots per rank")
    p.add_argument("--no-eplb", action="store_true", help="skip the EPLB rows")
    p.add_argument(
        "--profile-iters",
        type=int,
        default=1,
        help="CUDA: iterations per row under torch.profiler for the kernel time (0: none)",
    )
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    apply_preset(args, SMALL, FULL)
    args.warmup = max(1, args.warmup)  # the first warm-up iteration counts the tokens (with host syncs)
    args.kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in args.kinds if k not in KINDS]
    if bad:
        p.error(f"unknown kinds {bad}; valid: {', '.join(KINDS)}")
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    args.token_scales = [float(s) for s in args.token_scales.split(",") if s]
    return args


def init_distributed(seed: int) -> tuple[int, int, torch.device]:
    """Process group (NCCL on CUDA, gloo on CPU) from torchrun's environment (a single rank without it),
    Megatron's parallel state with EP = world size.  Returns ``(rank, world_size, device)``."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe import moe_utils
    from megatron_eplb.patches import megatron as eplb_mcore

    # Never NVLink multicast (shared hosts); set for NCCL before the communicators exist.
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    if not CUDA:
        eplb_mcore.enable_cpu()
    if not hasattr(moe_utils, "te_general_gemm"):
        # megatron-core 0.16 without Transformer Engine: the router reads this name (a NameError on GPU too).
        moe_utils.te_general_gemm = None
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if CUDA:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if CUDA else "gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    model_parallel_cuda_manual_seed(seed)
    return rank, world, device


def _nccl_version() -> str | None:
    if not CUDA:
        return None
    try:
        v = torch.cuda.nccl.version()
    except Exception as exc:  # noqa: BLE001 - informational only
        return f"unknown ({type(exc).__name__})"
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _align(device: torch.device) -> None:
    """All ranks idle and at the same point (a collective between two device synchronisations)."""
    _sync()
    t = torch.zeros(1, device=device)
    dist.all_reduce(t)
    _sync()


def _gather_floats(values: list[float], device: torch.device) -> np.ndarray:
    """``[world, n]`` of every rank's ``values`` (NCCL: through a CUDA tensor)."""
    local = torch.tensor(values, dtype=torch.float64, device=device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.stack(parts).cpu().numpy()


# ============================================================================ the layer
class Layer:
    """One Megatron-core MoE layer of one expert kind, with the router bias that skews its load and a
    counter of the tokens its experts compute."""

    def __init__(self, kind: str, args: argparse.Namespace, device: torch.device, skew: torch.Tensor) -> None:
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        from megatron.core.transformer.spec_utils import build_module
        from megatron.core.transformer.transformer_config import TransformerConfig

        grouped = kind == "grouped"
        self.kind = kind
        self.config = TransformerConfig(
            num_layers=1,
            hidden_size=args.hidden,
            num_attention_heads=32 if args.hidden >= 1024 else 4,
            num_moe_experts=args.experts,
            moe_router_topk=args.topk,
            moe_ffn_hidden_size=args.ffn,
            ffn_hidden_size=args.ffn,
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=grouped,
            expert_model_parallel_size=dist.get_world_size(),
            add_bias_linear=False,
            moe_aux_loss_coeff=0.0,
            moe_router_dtype="fp32",  # routing (and the skew bias) in fp32, as MoE training usually runs
            hidden_dropout=0.0,
            attention_dropout=0.0,
            bf16=True,  # GroupedMLP asserts bf16; both kinds run in bf16 (on CPU too)
            params_dtype=torch.bfloat16,
            use_cpu_initialization=not CUDA,
        )
        spec = get_moe_module_spec(use_te=False, num_experts=args.experts, moe_grouped_gemm=grouped)
        torch.manual_seed(args.seed)
        model_parallel_cuda_manual_seed(args.seed)  # the same expert weights every time a kind is built
        if isinstance(spec, functools.partial):  # megatron-core 0.18+
            module = spec(config=self.config, layer_number=1)
        else:
            module = build_module(spec, config=self.config, layer_number=1)
        self.module = module.to(device)
        # The router: the same weights on every rank and for every kind (identical routing everywhere).
        gen = torch.Generator().manual_seed(args.seed)
        weight = torch.randn(args.experts, args.hidden, generator=gen) * 0.02
        with torch.no_grad():
            self.module.router.weight.copy_(weight.to(self.module.router.weight.device))
        router = self.module.router
        gating = router.gating

        def skewed_gating(inp, _gating=gating, _skew=skew):
            logits = _gating(inp)  # fp32 (moe_router_dtype)
            return logits + _skew.to(logits.dtype)

        router.gating = skewed_gating
        self.counting = False
        self.counts: list[torch.Tensor] = []
        self.handle = None
        self.placement = None

    def patch(self, placement) -> None:
        """EPLB: make the layer placement-aware (collective over the EP group)."""
        from megatron_eplb.patches import megatron as eplb_mcore

        self.handle = eplb_mcore.apply(self.module, placement)  # recording on, as in training
        self.placement = placement

    def watch(self) -> None:
        """Count the tokens each local expert (slot) computes while ``counting`` (call after :meth:`patch`:
        it replaces the experts module)."""
        experts = self.module.experts
        forward = experts.forward

        def counted(*a, _forward=forward, **k):
            if self.counting:
                tpe = a[1] if len(a) > 1 else k["tokens_per_expert"]
                _sync()
                self.counts.append(torch.as_tensor(tpe).detach().to("cpu", torch.int64).clone())
            return _forward(*a, **k)

        experts.forward = counted

    def free(self) -> None:
        self.module = None
        self.handle = None


def expert_load(layer: Layer, x: torch.Tensor) -> np.ndarray:
    """int64 ``[E]``: (token, expert) pairs the router sends to each logical expert, summed over ranks."""
    with torch.no_grad():
        _, routing_map = layer.module.router(x)
        counts = routing_map.reshape(-1, routing_map.shape[-1]).sum(0).to(torch.int64)
    dist.all_reduce(counts)
    return counts.cpu().numpy()


def calibrate(
    layer: Layer, x: torch.Tensor, skew: torch.Tensor, ratios: list[float], world: int
) -> list[dict]:
    """For each target ratio r (busiest-rank / mean rank pairs, default placement): the bias on the logits
    of EP rank 0's experts that sends a fraction r / world of all pairs there (bisection)."""
    experts = skew.numel()
    hot = experts // world  # experts 0 .. hot-1 live on EP rank 0

    def fraction(bias: float) -> tuple[float, np.ndarray]:
        skew.zero_()
        skew[:hot] = bias
        load = expert_load(layer, x)
        return float(load[:hot].sum() / max(load.sum(), 1)), load

    levels = []
    for target in ratios:
        goal = min(target, float(world)) / world
        lo, hi = 0.0, 1.0
        f_lo, load = fraction(0.0)
        if goal <= f_lo:
            levels.append(dict(target_ratio=target, bias=0.0, load=load))
            continue
        while fraction(hi)[0] < goal and hi < 1e4:
            lo, hi = hi, hi * 2
        if goal >= 1.0:
            bias = hi
        else:
            for _ in range(24):
                mid = 0.5 * (lo + hi)
                if fraction(mid)[0] < goal:
                    lo = mid
                else:
                    hi = mid
            bias = hi
        load = fraction(bias)[1]
        levels.append(dict(target_ratio=target, bias=bias, load=load))
    skew.zero_()
    return levels


EQUIVALENCE_KEYS = ("output", "input_grad", "router_grad", "expert_grad")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _slot_grads(storage, k: int) -> torch.Tensor:
    return torch.cat([sp.of(sp.param.grad).reshape(-1) for sp in storage.slot_params(k)])


def equivalence(ref: Layer, pat: Layer, x: torch.Tensor, grad: torch.Tensor) -> dict:
    """The EPLB layer ``pat`` against the unpatched layer ``ref`` of the same kind (same weights, same
    routing) on ``x``: the largest relative difference (max |pat - ref| / max |ref|) over ranks of the output,
    the input gradient, the router gradient, and every local slot's expert gradient against its logical
    expert's (replica gradients summed first, as before an optimizer step)."""
    from megatron_eplb.patches.megatron.experts import storage_for

    outs, input_grads = [], []
    for layer in (ref, pat):
        layer.module.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        y = layer.module(xi)[0]
        y.backward(grad)
        outs.append(y.detach())
        input_grads.append(xi.grad)
    pat.handle.sum_replica_grads()
    storage = storage_for(ref.module.experts)  # Megatron's layout: expert r * E / EP + k on rank r
    local = torch.stack([_slot_grads(storage, k) for k in range(storage.num_slots)])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    logical = torch.cat(parts)  # [E, n]
    handle, slots = pat.handle, storage_for(pat.module.experts)
    expert = max(
        _rel(_slot_grads(slots, k), logical[int(handle.placement.phy2log[0, slot])])
        for k, slot in enumerate(handle.local_slots())
        if handle.placement.phy2log[0, slot] >= 0
    )
    mine = [
        _rel(outs[1], outs[0]),
        _rel(input_grads[1], input_grads[0]),
        _rel(pat.module.router.weight.grad, ref.module.router.weight.grad),
        expert,
    ]
    worst = _gather_floats(mine, x.device).max(axis=0)
    for layer in (ref, pat):
        layer.module.zero_grad(set_to_none=True)
    return {key: float(v) for key, v in zip(EQUIVALENCE_KEYS, worst)}


def time_layer(layer: Layer, x: torch.Tensor, grad: torch.Tensor, args, device) -> dict:
    """Forward+backward of ``layer`` on ``x``: per-rank token counts (first warm-up iteration) and the
    timings of ``args.repeats`` iterations, reduced over ranks (slowest rank per iteration)."""
    module = layer.module
    dev_ms: list[float] = []
    host_ms: list[float] = []
    pairs = []
    gc.collect()
    gc.disable()  # its pauses would land on random iterations
    for it in range(args.warmup + args.repeats):
        module.zero_grad(set_to_none=True)
        x.grad = None
        layer.counting = it == 0
        layer.counts.clear()
        _align(device)
        t0 = time.perf_counter()
        if CUDA:
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
            start.record()
        y = module(x)[0]
        y.backward(grad)
        host = (time.perf_counter() - t0) * 1e3
        if CUDA:
            stop.record()
        if it == 0:
            counts = torch.stack(layer.counts).sum(0) if layer.counts else torch.zeros(0, dtype=torch.int64)
            layer.counting = False
        if it >= args.warmup:
            host_ms.append(host)
            if CUDA:
                pairs.append((start, stop))
            else:
                dev_ms.append(host)
        del y
    _sync()
    gc.enable()
    if CUDA:
        dev_ms = [a.elapsed_time(b) for a, b in pairs]
    ms = _gather_floats(dev_ms, device)  # [world, repeats]
    host = _gather_floats(host_ms, device)
    kernels, profile_error = _kernel_time(module, x, grad, args.profile_iters, device)
    kernels = _gather_floats(kernels, device)  # [world, 2]: compute, communication kernel ms per iteration
    rank_tokens = _gather_floats([float(counts.sum())], device)[:, 0]
    slowest = ms.max(axis=0)
    mean_tokens = float(rank_tokens.mean())
    busiest = float(rank_tokens.max())
    return {
        "rank_tokens": [int(t) for t in rank_tokens],
        "busiest_rank_tokens": int(busiest),
        "mean_rank_tokens": mean_tokens,
        "balancedness": mean_tokens / busiest if busiest else 1.0,
        "local_expert_tokens_rank0": [int(c) for c in counts] if dist.get_rank() == 0 else None,
        "n": int(slowest.size),
        "median_ms": float(np.median(slowest)),
        "p10_ms": float(np.percentile(slowest, 10)),
        "p90_ms": float(np.percentile(slowest, 90)),
        "per_rank_median_ms": [float(v) for v in np.median(ms, axis=1)],
        "host_median_ms": float(np.median(host.max(axis=0))),
        "per_rank_host_median_ms": [float(v) for v in np.median(host, axis=1)],
        "per_rank_kernel_ms": _finite(kernels[:, 0]),
        "per_rank_nccl_kernel_ms": _finite(kernels[:, 1]),
        **({"profile_error": profile_error} if profile_error else {}),
    }


def _finite(values) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]


def _kernel_time(module, x, grad, iters: int, device) -> tuple[list[float], str | None]:
    """Per forward+backward on this rank, the summed duration of the device kernels (memcpy/memset included)
    other than NCCL's, and of NCCL's (``torch.profiler``, ``iters`` iterations): the device work that the
    tokens set, against the wall time.  NaN without CUDA or ``iters`` = 0; the error text if the profiler
    fails (the timings above stand)."""
    if not CUDA or iters <= 0:
        return [float("nan"), float("nan")], None
    from torch.profiler import ProfilerActivity, profile

    compute = comm = 0.0
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                module.zero_grad(set_to_none=True)
                x.grad = None
                _align(device)
                module(x)[0].backward(grad)
            _sync()
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                us = float(e.time_range.elapsed_us())
                if "nccl" in e.name.lower():
                    comm += us
                else:
                    compute += us
    except Exception as exc:  # noqa: BLE001 - a profiler failure must not cost the run
        return [float("nan"), float("nan")], f"{type(exc).__name__}: {exc}"[:300]
    return [compute / iters / 1e3, comm / iters / 1e3], None


def _input(tokens: int, args, device, rank: int, salt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(args.seed + 1000 * rank + salt)
    x = torch.randn(tokens, 1, args.hidden, generator=gen, device=device).to(torch.bfloat16)
    grad = torch.randn(tokens, 1, args.hidden, generator=gen, device=device).to(torch.bfloat16)
    return x.requires_grad_(True), grad


def _free(device) -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    _align(device)


# ============================================================================ the two modes
def run_skew(args, rank: int, world: int, device, result: dict) -> list[dict]:
    """EP > 1: each kind at each skew level, under the default placement and under EPLB's."""
    from megatron_eplb.policy import rebalance
    from megatron_eplb.stats import rank_loads

    skew = torch.zeros(args.experts, dtype=torch.float32, device=device)
    x, grad = _input(args.tokens, args, device, rank)
    layers = {kind: Layer(kind, args, device, skew) for kind in args.kinds}
    for layer in layers.values():
        layer.watch()
    levels = calibrate(next(iter(layers.values())), x, skew, args.ratios, world)
    result["levels"] = [
        dict(target_ratio=lv["target_ratio"], bias=lv["bias"], expert_load=lv["load"].tolist())
        for lv in levels
    ]
    rows = []
    num_slots = args.experts + args.redundant * world
    for i, level in enumerate(levels):
        skew.zero_()
        skew[: args.experts // world] = level["bias"]
        common = dict(level=i, target_ratio=level["target_ratio"], bias=level["bias"], tokens=args.tokens)
        for kind, layer in layers.items():
            row = dict(kind=kind, placement="default", **common, **time_layer(layer, x, grad, args, device))
            rows.append(row)
            _report(rank, row)
        for kind in [] if args.no_eplb else list(layers):
            load = level["load"].astype(np.float64)[None, :]
            placement = rebalance(load, num_slots, world, policy="greedy")
            layer = Layer(kind, args, device, skew)
            layer.patch(placement)
            layer.watch()
            predicted = rank_loads(placement, load)[0]
            row = dict(
                kind=kind,
                placement=f"eplb (greedy, {args.redundant} redundant/rank)",
                **common,
                predicted_balancedness=float(predicted.mean() / predicted.max()),
                phy2log=placement.phy2log[0].tolist(),
                **time_layer(layer, x, grad, args, device),
                equivalence=equivalence(layers[kind], layer, x, grad),
            )
            rows.append(row)
            _report(rank, row)
            layer.free()
            del layer
            _free(device)
    return rows


def run_tokens(args, rank: int, world: int, device, result: dict) -> list[dict]:
    """EP = 1: each kind at several local token counts (no skew: a single rank is its own busiest rank)."""
    skew = torch.zeros(args.experts, dtype=torch.float32, device=device)
    layers = {kind: Layer(kind, args, device, skew) for kind in args.kinds}
    for layer in layers.values():
        layer.watch()
    rows = []
    for i, scale in enumerate(args.token_scales):
        tokens = max(1, int(round(args.tokens * scale)))
        x, grad = _input(tokens, args, device, rank, salt=i)
        for kind, layer in layers.items():
            row = dict(kind=kind, placement="default", level=i, token_scale=scale, tokens=tokens)
            row.update(time_layer(layer, x, grad, args, device))
            rows.append(row)
            _report(rank, row)
        del x, grad
        _free(device)
    return rows


def _report(rank: int, row: dict) -> None:
    if rank == 0:
        print(
            f"  {row['kind']:10s} {'off' if row['placement'] == 'default' else 'eplb':4s} level {row['level']}: busiest {row['busiest_rank_tokens']}"
            f" balancedness {row['balancedness']:.3f} -> {row['median_ms']:.3f} ms (host {row['host_median_ms']:.3f})"
            + (f"; vs unpatched {_worst_equivalence(row):.1e}" if "equivalence" in row else ""),
            flush=True,
        )


# ============================================================================ summary
def fit(rows: list[dict]) -> dict | None:
    """Least squares ``median_ms = intercept + slope * busiest_rank_tokens / 1000`` (None under 2 distinct x)."""
    x = np.array([r["busiest_rank_tokens"] / 1000.0 for r in rows])
    y = np.array([r["median_ms"] for r in rows])
    if len(np.unique(x)) < 2:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    pred = intercept + slope * x
    ss = float(((y - y.mean()) ** 2).sum())
    return {
        "slope_ms_per_1000_tokens": float(slope),
        "intercept_ms": float(intercept),
        "r2": 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else None,
        "points": len(rows),
        "x_range_tokens": [int(1000 * x.min()), int(1000 * x.max())],
    }


def summarize(rows: list[dict]) -> dict:
    """Per kind: the line fitted to the default-placement rows; EPLB vs default time at each level, with the
    time the default line predicts for EPLB's busiest-rank tokens (what the balance alone would buy)."""
    fits: dict[str, dict | None] = {}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        sel = [r for r in rows if r["kind"] == kind and r["placement"] == "default"]
        f = fit(sel)
        if f is not None:
            # At the mean rank load: the share of the layer time that scales with the busiest rank's tokens.
            mean_tokens = float(np.mean([r["mean_rank_tokens"] for r in sel])) / 1000.0
            at_mean = f["intercept_ms"] + f["slope_ms_per_1000_tokens"] * mean_tokens
            f["ms_at_mean_load"] = at_mean
            f["token_share_at_mean_load"] = (
                f["slope_ms_per_1000_tokens"] * mean_tokens / at_mean if at_mean > 0 else None
            )
        fits[kind] = f
    eplb_vs_off = []
    for r in rows:
        if r["placement"] == "default":
            continue
        off = [
            o for o in rows if (o["kind"], o["placement"], o["level"]) == (r["kind"], "default", r["level"])
        ]
        if not off:
            continue
        o, f = off[0], fits.get(r["kind"])
        predicted = (
            f["intercept_ms"] + f["slope_ms_per_1000_tokens"] * r["busiest_rank_tokens"] / 1000.0
            if f
            else None
        )
        eplb_vs_off.append(
            dict(
                kind=r["kind"],
                level=r["level"],
                target_ratio=r["target_ratio"],
                balancedness_off=o["balancedness"],
                balancedness_eplb=r["balancedness"],
                busiest_off=o["busiest_rank_tokens"],
                busiest_eplb=r["busiest_rank_tokens"],
                ms_off=o["median_ms"],
                ms_eplb=r["median_ms"],
                time_ratio=r["median_ms"] / o["median_ms"],
                ms_eplb_predicted_by_default_fit=predicted,
            )
        )
    return {"fits": fits, "eplb_vs_off": eplb_vs_off}


def _worst_equivalence(row: dict) -> float:
    return max(row["equivalence"][k] for k in EQUIVALENCE_KEYS)


def _kernel_cell(row: dict) -> str:
    ks = [k for k in row.get("per_rank_kernel_ms", []) if k is not None]
    return f"{max(ks):.3f}" if ks else "-"


def table(result: dict) -> str:
    rows = result["rows"]
    skew = result["mode"] == "skew"
    head = "| kind | placement | " + ("target ratio | " if skew else "tokens | ")
    head += "busiest-rank tokens | mean rank tokens | balancedness | fwd+bwd ms (median, slowest rank) | p10-p90 ms | host ms | kernel ms (max rank) | vs unpatched |"
    lines = [
        f"{result['device']} x{result['world_size']}, torch {result['torch']}, megatron-core {result['megatron_core']}, "
        f"grouped_gemm: {result['grouped_gemm']}; hidden {result['setup']['hidden']}, ffn {result['setup']['ffn']}, "
        f"{result['setup']['experts']} experts, top-{result['setup']['topk']}, {result['setup']['tokens']} tokens/rank, "
        f"{result['seconds']} s",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in rows:
        lead = f"{r['target_ratio']:.2f}" if skew else str(r["tokens"])
        lines.append(
            f"| {r['kind']} | {r['placement']} | {lead} | {r['busiest_rank_tokens']} | {r['mean_rank_tokens']:.0f} | "
            f"{r['balancedness']:.3f} | {r['median_ms']:.3f} | {r['p10_ms']:.3f}-{r['p90_ms']:.3f} | {r['host_median_ms']:.3f} | {_kernel_cell(r)} | {f'{_worst_equivalence(r):.1e}' if 'equivalence' in r else '-'} |"
        )
    lines.append("")
    for kind, f in result["summary"]["fits"].items():
        if f is None:
            lines.append(f"fit {kind}: fewer than 2 distinct busiest-rank token counts")
            continue
        r2 = "n/a" if f["r2"] is None else f"{f['r2']:.3f}"
        share = f["token_share_at_mean_load"]
        lines.append(
            f"fit {kind} (default placement): {f['slope_ms_per_1000_tokens']:.4f} ms per 1000 busiest-rank tokens"
            f" + {f['intercept_ms']:.3f} ms (r2 {r2}; at the mean rank load {f['ms_at_mean_load']:.3f} ms, "
            f"{'n/a' if share is None else f'{share:.0%}'} of it scaling with tokens)"
        )
    for e in result["summary"]["eplb_vs_off"]:
        pred = e["ms_eplb_predicted_by_default_fit"]
        lines.append(
            f"{e['kind']} level {e['level']} (target {e['target_ratio']:.2f}): balancedness {e['balancedness_off']:.3f}"
            f" -> {e['balancedness_eplb']:.3f}, {e['ms_off']:.3f} -> {e['ms_eplb']:.3f} ms ({e['time_ratio']:.3f}x;"
            f" the default-placement line predicts {'n/a' if pred is None else f'{pred:.3f}'} ms at EPLB's busiest tokens)"
        )
    checks = [r for r in rows if "equivalence" in r]
    if checks:
        worst = max(max(r["equivalence"][k] for k in EQUIVALENCE_KEYS) for r in checks)
        lines.append(
            f"equivalence, EPLB vs unpatched layer of the same kind (bf16; output, input/router/expert gradients): "
            f"worst relative difference {worst:.2e} (tolerance {EQUIVALENCE_RTOL:g}) -> "
            f"{'passed' if result['equivalence_passed'] else 'FAILED'}"
        )
    return "\n".join(lines)


# ============================================================================ main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.time()
    rank, world, device = init_distributed(args.seed)
    from megatron_eplb.patches import megatron as eplb_mcore

    source = grouped_gemm_source(device)  # before the GroupedMLP layers are built
    if "grouped" in args.kinds and source.startswith("not needed"):  # megatron-core >= 0.17: no GroupedMLP
        args.kinds = [k for k in args.kinds if k != "grouped"]

    result: dict = {
        "script": "benchmarks/step_time_skew.py",
        "device": torch.cuda.get_device_name(device) if CUDA else "cpu",
        "world_size": world,
        "ep_size": world,
        "mode": "skew" if world > 1 else "tokens",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": _nccl_version(),
        "python": platform.python_version(),
        "megatron_core": ".".join(map(str, eplb_mcore.mcore_version())),
        "grouped_gemm": source,
        "small": args.small,
        "setup": dict(
            hidden=args.hidden,
            ffn=args.ffn,
            experts=args.experts,
            topk=args.topk,
            tokens=args.tokens,
            dtype="bf16",
            dispatcher="alltoall",
            warmup=args.warmup,
            repeats=args.repeats,
            redundant_per_rank=args.redundant,
            ratios=args.ratios,
            token_scales=args.token_scales,
            kinds=args.kinds,
        ),
        "definitions": {
            "rank tokens": "(token, expert) pairs a rank's experts compute: sum of the tokens_per_expert the "
            "dispatcher hands to the experts module",
            "balancedness": "mean rank tokens / busiest rank tokens",
            "median_ms": "median over iterations of the slowest rank's forward+backward time (CUDA events; "
            "wall clock on CPU)",
            "host_median_ms": "median over iterations of the slowest rank's host time until backward() returned "
            "(includes the dispatcher's host syncs, so it is an upper bound of the launch cost)",
            "per_rank_kernel_ms": "CUDA: summed duration of the non-NCCL device kernels (and memcpy/memset) of one "
            "forward+backward on each rank (torch.profiler): the device work; wall time far above it = host-bound",
            "per_rank_nccl_kernel_ms": "CUDA: summed duration of the NCCL kernels (includes waiting for the peer)",
            "fit": "median_ms = intercept_ms + slope_ms_per_1000_tokens * busiest_rank_tokens / 1000",
            "equivalence": "EPLB rows: max over ranks of max |patched - unpatched| / max |unpatched| of the output, "
            "the input and router gradients, and each slot's expert gradient vs its logical expert's (bf16; "
            f"passes at <= {EQUIVALENCE_RTOL:g})",
        },
    }
    if "grouped" not in args.kinds:
        result["grouped_skipped"] = f"grouped_gemm: {source}"
    if rank == 0:
        print(
            f"step_time_skew: EP={world}, {result['mode']} mode, kinds {args.kinds}, grouped_gemm {source}",
            flush=True,
        )
    runner = run_skew if world > 1 else run_tokens
    rows = runner(args, rank, world, device, result)
    result["rows"] = rows
    result["summary"] = summarize(rows)
    checks = [r["equivalence"] for r in rows if "equivalence" in r]
    result["equivalence_passed"] = all(
        max(c[k] for k in EQUIVALENCE_KEYS) <= EQUIVALENCE_RTOL for c in checks
    )
    result["seconds"] = round(time.time() - started, 1)
    if rank == 0:
        name = f"step_time_skew_ws{world}_{'cuda' if CUDA else 'cpu'}.json"
        out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(table(result), flush=True)
        print(f"wrote {out}", flush=True)
    _align(device)
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
