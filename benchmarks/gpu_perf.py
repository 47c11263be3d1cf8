"""GPU performance of megatron-eplb on one GPU (issue #7): recording, rebalance stall, transfer speed, memory.

Usage::

    python benchmarks/gpu_perf.py --out DIR [--parts bw,record,transfer,train] [--small] [--canary off]

Writes ``DIR/gpu_perf.json`` and prints a table.  Without CUDA it runs tiny sizes on CPU (gloo), a smoke test of
the script itself; its numbers mean nothing.

Parts (one process, one GPU, EP = 1):

* ``bw``: device copy bandwidth (a large device-to-device copy, bytes read + written).
* ``record``: one Megatron-core MoE layer (hidden 4096, ffn 2048, 64 experts, top-8, 8192 tokens, bf16,
  alltoall dispatcher, SequentialMLP) unpatched, patched at the default placement, and patched with its
  recording off; two separately built instances of each, forwards interleaved, paired CUDA-event wall clock
  and host CPU time;
  the kernels the patch adds (profiler); the count under CUDA graph replay (see :func:`part_record`).
* ``transfer``: :class:`TransferExecutor` moving a permutation of 16 slots of that layer's size (weights bf16
  + fp32 master + Adam ``exp_avg``/``exp_avg_sq`` fp32) through its staged path (before) and its direct path.
* ``train``: a Megatron-core GPTModel MoE (4 MoE layers, 16 experts + 4 redundant slots, top-2, bf16, fused
  torch Adam) with :class:`EPLBManager`: dynamic EPLB off (baseline), dynamic with a policy that rotates the
  slots every rebalance (forced moves, the stall), and with the default policy (planning in the worker).
  Every step ends with ``loss.item()`` (a host sync, as a training loop that logs does); step time is the
  wall time between those syncs.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import count_calls, init_single_rank, time_stats  # noqa: E402

from megatron_eplb.placement import ExpertPlacement  # noqa: E402

CUDA = torch.cuda.is_available()


# ============================================================================ helpers
def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class _Timer:
    """Start/stop pairs: CUDA events on the GPU (read after a sync), perf_counter on the CPU."""

    def __init__(self) -> None:
        self.pairs: list = []

    def start(self):
        if CUDA:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, started) -> None:
        if CUDA:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.pairs.append((started, e))
        else:
            self.pairs.append((started, time.perf_counter()))

    def ms(self) -> list[float]:
        _sync()
        if CUDA:
            return [a.elapsed_time(b) for a, b in self.pairs]
        return [(b - a) * 1e3 for a, b in self.pairs]


def _moe_config(h, ffn, experts, topk, dtype, layers=1, **kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=layers,
        hidden_size=h,
        num_attention_heads=kw.pop("heads", 32 if h >= 1024 else 4),
        num_moe_experts=experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=ffn,
        ffn_hidden_size=kw.pop("dense_ffn", ffn),
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        add_bias_linear=False,
        moe_aux_loss_coeff=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_cpu_initialization=not CUDA,
        **kw,
    )


class _OneMoE(torch.nn.Module):
    def __init__(self, config, device) -> None:
        super().__init__()
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
        from megatron.core.transformer.spec_utils import build_module

        spec = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts, moe_grouped_gemm=False)
        if isinstance(spec, functools.partial):
            layer = spec(config=config, layer_number=1)
        else:
            layer = build_module(spec, config=config, layer_number=1)
        self.layer = layer.to(device)

    def forward(self, x):
        return self.layer(x)[0]


# ============================================================================ parts
def part_bandwidth(device, small: bool) -> dict:
    n = (1 << 20) if small else (2 << 30)
    a = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    t = _Timer()
    for _ in range(20):
        s = t.start()
        b.copy_(a)
        t.stop(s)
    ms = statistics.median(t.ms())
    assert torch.equal(a[:4096], b[:4096])
    del a, b
    return {"bytes": n, "median_ms": ms, "copy_bandwidth_GBps": 2 * n / ms / 1e6}


# ---------------------------------------------------------------------------------------- record
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


def part_record(device, small: bool, copies: int = 2, rounds: int = 500) -> dict:
    """The patch's cost on one MoE layer at the default placement, forward (as in training: weights
    require grad, the autograd graph is built).

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

    dtype = torch.bfloat16 if CUDA else torch.float32
    if small:
        h, ffn, experts, topk, tokens = 64, 128, 8, 2, 256
        rounds, warm, prof_fwd = min(rounds, 8), 2, 2
    else:
        h, ffn, experts, topk, tokens = 4096, 2048, 64, 8, 8192
        warm, prof_fwd = 10, 40
    kinds = ("unpatched", "patched", "norecord")
    config = _moe_config(h, ffn, experts, topk, dtype)
    torch.manual_seed(0)
    weights = _OneMoE(config, device).state_dict()
    models: dict[str, torch.nn.Module] = {}
    handles = {}
    for i in range(copies):
        for kind in kinds:
            m = _OneMoE(config, device)
            m.load_state_dict(weights)
            if kind != "unpatched":
                handles[f"{kind}{i}"] = eplb_mcore.apply(m)
                handles[f"{kind}{i}"].recording = kind == "patched"
            models[f"{kind}{i}"] = m
    del weights
    x = torch.randn(tokens, 1, h, device=device, dtype=dtype)
    out: dict = {
        "setup": dict(hidden=h, ffn=ffn, experts=experts, topk=topk, tokens=tokens, dtype=str(dtype))
    }

    # Correctness: every instance's output is bitwise equal; the loads are the router's counts.
    with torch.no_grad():
        y_ref = models["unpatched0"](x)
        out["bitwise_equal"] = all(bool(torch.equal(m(x), y_ref)) for m in models.values())
        h0 = handles["patched0"]
        h0.reset_loads()
        models["patched0"](x)
        out["loads_sum_ok"] = int(h0.loads().sum()) == tokens * topk
        out["slot_loads_equal_loads"] = bool(torch.equal(h0.loads(), h0.slot_loads()))
        out["norecord_counts_nothing"] = int(handles["norecord0"].loads().sum()) == 0

        # Under CUDA graph replay the count (an in-place add into a buffer that is never replaced) counts
        # every replay.
        out["cuda_graph_replay_counts_ok"] = None
        if CUDA:
            routed = torch.rand(tokens, experts, device=device) < topk / experts
            h0.reset_loads()
            h0._count_routed(0, routed)  # creates the accumulator for this shape outside the capture
            h0.reset_loads()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                h0._count_routed(0, routed)
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
    _sync()

    # Device activity: the kernels each kind launches per forward (first instance of each kind).
    activities = [ProfilerActivity.CUDA] if CUDA else [ProfilerActivity.CPU]
    kernels: dict[str, dict[str, list[float]]] = {}
    for kind in kinds:
        with profile(activities=activities) as prof:
            for _ in range(prof_fwd):
                forward(f"{kind}0")
            _sync()
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
    timers = {k: _Timer() for k in names}
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
            _sync()
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


def _slot_store(num_slots: int, h: int, ffn: int, device) -> list[list[torch.Tensor]]:
    """Per slot: bf16 fc1, fc2; fp32 master of each; Adam exp_avg and exp_avg_sq (fp32) of each."""
    out = []
    for _ in range(num_slots):
        w = [torch.randn(ffn, h, device=device).bfloat16(), torch.randn(h, ffn, device=device).bfloat16()]
        fp32 = [torch.randn(ffn, h, device=device), torch.randn(h, ffn, device=device)]
        out.append(w + fp32 + [torch.randn_like(t) for t in fp32] + [torch.rand_like(t) for t in fp32])
    return out


def part_transfer(device, small: bool, copy_gbps: float) -> dict:
    from megatron_eplb.transfer import TransferExecutor, plan_transfer, slot_nbytes

    h, ffn, slots = (64, 128, 6) if small else (4096, 2048, 16)
    store = _slot_store(slots, h, ffn, device)
    old = ExpertPlacement(np.arange(slots)[None, :], 1, slots)
    new = ExpertPlacement(np.roll(np.arange(slots), 1)[None, :], 1, slots)  # one cycle through every slot
    plan = plan_transfer(old, new)
    nbytes = slot_nbytes(store[0])
    moved_bytes = plan.layer(0).num_local_copies * nbytes
    out = {
        "slots": slots,
        "slot_bytes": nbytes,
        "slot_tensors": "bf16 fc1+fc2, fp32 master x2, Adam exp_avg x2, exp_avg_sq x2",
        "moved_slots": plan.layer(0).num_local_copies,
    }
    modes = (
        ("staged_before", False, 1),
        ("direct_after", True, 1),  # direct local copies, every copy in order on the side stream
        ("direct_streams2", True, 2),  # the same copies split over 2 streams by tensor position
        ("direct_streams4", True, 4),
    )
    for _round in range(2):  # two rounds, interleaved: the spread between them shows the noise
        for mode, direct, streams in modes:
            key = mode if _round == 0 else f"{mode}_again"
            ex = TransferExecutor(
                plan, lambda layer, k: store[k], direct_local_copies=direct, copy_streams=streams
            )
            expect = [t.clone() for t in store[slots - 1]]
            ex.run()
            ok = all(torch.equal(a, b) for a, b in zip(store[0], expect))
            t = _Timer()
            for _ in range(15):
                s = t.start()
                ex.run()
                t.stop(s)
            ms = statistics.median(t.ms())
            gbps = 2 * moved_bytes / ms / 1e6  # payload read + written, as the copy bandwidth counts
            out[key] = {
                "correct": ok,
                "median_ms": ms,
                "achieved_GBps": gbps,
                "fraction_of_copy_bandwidth": gbps / copy_gbps if copy_gbps else None,
                "peak_staging_bytes": ex.peak_staging_bytes,
            }
    # The canary on this layer (sampled and full): one start/finish/verify, wall time incl. its host sync.
    for words, label in ((65536, "sampled"), (None, "full")):
        ex = TransferExecutor(plan, lambda layer, k: store[k], checksums=True, checksum_words=words)
        walls, bad = [], None
        for i in range(6):
            _sync()
            t0 = time.perf_counter()
            handle = ex.start_layer(0)
            ex.finish_layer(handle)
            bad = ex.verify_layer(handle)
            _sync()
            if i:
                walls.append((time.perf_counter() - t0) * 1e3)
        ex_plain = TransferExecutor(plan, lambda layer, k: store[k])
        plain = []
        for i in range(6):
            _sync()
            t0 = time.perf_counter()
            ex_plain.run()
            _sync()
            if i:
                plain.append((time.perf_counter() - t0) * 1e3)
        handle = ex.start_layer(0)
        ex.finish_layer(handle)
        store[5][1].view(-1)[0] += 1  # corrupt a written slot (a sampled word): the canary must see it
        caught = ex.verify_layer(handle)
        out[f"canary_{label}"] = {
            "transfer_and_verify_ms": statistics.median(walls),
            "transfer_only_ms": statistics.median(plain),
            "clean": bad == [],
            "corruption_caught": caught == [(0, 5)],
        }
    store.clear()
    return out


# ---------------------------------------------------------------------------------------- training
def permute_policy(load, num_slots, num_ranks, previous=None, **kwargs):
    """Test policy: rotate every layer's slots by one (every slot gets another expert: forced moves)."""
    return np.roll(previous.phy2log, 1, axis=1)


_EVENTS: dict[str, int] = {}


def _build_gpt(device, small: bool, redundant: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    dtype = torch.bfloat16 if CUDA else torch.float32
    if small:
        h, ffn, experts, layers, vocab, seq, mbs, heads = 64, 64, 8, 2, 128, 32, 2, 4
    else:
        h, ffn, experts, layers, vocab, seq, mbs, heads = 2048, 2048, 16, 4, 16384, 2048, 4, 16
    config = _moe_config(h, ffn, experts, 2, dtype, layers=layers, heads=heads, dense_ffn=4 * h)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    torch.manual_seed(0)
    model = GPTModel(config, spec, vocab_size=vocab, max_sequence_length=seq).to(device)
    if CUDA:  # bf16 parameters: Megatron's Float16Module casts the float activations at the boundaries
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    setup = dict(
        hidden=h, moe_ffn=ffn, experts=experts, redundant=redundant, moe_layers=layers, topk=2,
        vocab=vocab, seq=seq, micro_batch=mbs, tokens=seq * mbs, dtype=str(dtype),
    )  # fmt: skip
    return model, setup, (vocab, seq, mbs)


def part_train(device, small: bool, canary: str = "off", more_canaries: tuple[str, ...] = ()) -> dict:
    from megatron_eplb.patches import megatron as eplb_mcore

    from megatron_eplb.config import EPLBConfig
    from megatron_eplb.manager import EPLBManager
    from megatron_eplb.transfer import TransferExecutor

    redundant = 4 if not small else 2
    model, setup, (vocab, seq, mbs) = _build_gpt(device, small, redundant)
    base_cfg = dict(
        init_redundancy_expert=redundant,
        num_iterations_eplb_update=10,
        num_wait_worker_iterations=2,
        eplb_window_size=10,
        eplb_layers_per_step=1,
        eplb_transfer_canary=canary,
    )
    handle = eplb_mcore.apply(model, config=EPLBConfig.from_dict(base_cfg))
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, fused=CUDA)
    for name in ("gather_window", "_await_plan", "_start_planning"):
        count_calls(EPLBManager, name, _EVENTS)
    for name in ("start_layer", "finish_layer", "verify_layer"):
        count_calls(TransferExecutor, name, _EVENTS)
    count_calls(type(handle), "commit_layer", _EVENTS)
    peaks: list[int] = []
    original_init = TransferExecutor.__init__

    def init(self, *a, **k):
        original_init(self, *a, **k)
        peaks.append(self)

    TransferExecutor.__init__ = init
    gen = torch.Generator(device="cpu").manual_seed(0)
    position_ids = torch.arange(seq, device=device).expand(mbs, seq)
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device).tril().logical_not()

    def run(label: str, steps: int, skip: int, **cfg) -> dict:
        config = EPLBConfig.from_dict({**base_cfg, **{k: v for k, v in cfg.items() if k != "policy_fn"}})
        manager = EPLBManager(handle, config, opt, policy_fn=cfg.get("policy_fn"))
        rows = []
        for step in range(steps):
            tokens = torch.randint(0, vocab, (mbs, seq), generator=gen).to(device)
            _EVENTS.clear()
            phase_before = manager.phase.value
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = model(tokens, position_ids, mask, labels=tokens).float().mean()
            loss.backward()
            manager.before_optimizer_step()
            opt.step()
            record = manager.step()
            loss_value = loss.item()
            wall = (time.perf_counter() - t0) * 1e3
            rows.append(
                dict(step=step, ms=wall, before=phase_before, after=manager.phase.value, events=dict(_EVENTS),
                     completed=record.outcome if record is not None else None, loss=loss_value)
            )  # fmt: skip
        manager.close()
        hist = [r.as_dict() for r in manager.history]
        rows = rows[skip:]
        steady = [r["ms"] for r in rows if not r["events"] and r["before"] == r["after"] == "recording"]
        moving = [
            r["ms"]
            for r in rows
            if any(k in r["events"] for k in ("start_layer", "finish_layer", "commit_layer", "_await_plan"))
        ]
        gather = [r["ms"] for r in rows if "gather_window" in r["events"]]
        planning = [r["ms"] for r in rows if not r["events"] and r["before"] == r["after"] == "planning"]
        return {
            "label": label,
            "steps": steps,
            "skipped_warmup_steps": skip,
            "steady": time_stats(steady),
            "transfer_steps": time_stats(moving),
            "gather_steps": time_stats(gather),
            "planning_steps": time_stats(planning),
            "rebalances": len(hist),
            "outcomes": sorted({h["outcome"] for h in hist}),
            "moved_slots_total": int(sum(h["moved_slots"] for h in hist)),
            "moved_bytes_total": int(sum(h["moved_bytes"] for h in hist)),
            "seconds_last": hist[-1]["seconds"] if hist else {},
            "rows": rows,
        }

    steps, skip = (30, 12) if small else (150, 25)
    out = {"setup": setup}
    out["off"] = run("dynamic EPLB off", steps // 2 if not small else 20, skip // 2, dynamic_eplb=False)
    out["permute"] = run(
        "dynamic EPLB, rotate-slots test policy", steps, skip, dynamic_eplb=True, policy_fn=permute_policy
    )
    for other in more_canaries:  # the same forced moves with another canary setting, same model and baseline
        out[f"permute_canary_{other}"] = run(
            f"dynamic EPLB, rotate-slots test policy, canary {other}",
            steps,
            skip,
            dynamic_eplb=True,
            policy_fn=permute_policy,
            eplb_transfer_canary=other,
        )
    out["policy"] = run("dynamic EPLB, default policy", steps // 2 + 20, skip, dynamic_eplb=True)
    # Memory (per rank; EP = 1 here, so R/EP = R slots).
    slot_params = handle.slot_params(0, 0)
    weight_bytes = sum(p.numel() * p.element_size() for p in slot_params)
    state_bytes = sum(
        t.numel() * t.element_size()
        for p in slot_params
        for t in opt.state.get(p, {}).values()
        if torch.is_tensor(t)
    )
    layers = handle.num_layers
    out["memory"] = {
        "slot_weight_bytes": weight_bytes,
        "slot_optimizer_state_bytes": state_bytes,
        "redundant_slots_per_rank_per_layer": redundant,
        "redundant_weight_bytes_per_rank": redundant * layers * weight_bytes,
        "redundant_optimizer_state_bytes_per_rank": redundant * layers * state_bytes,
        "peak_staging_bytes": max((ex.peak_staging_bytes for ex in peaks), default=0),
    }
    TransferExecutor.__init__ = original_init
    steady = out["off"]["steady"].get("median_ms")
    moving = out["permute"]["transfer_steps"].get("median_ms")
    out["rebalance_stall_ratio"] = moving / steady if steady and moving else None
    out["rebalance_stall_ratio_in_run"] = (
        moving / out["permute"]["steady"]["median_ms"] if moving and out["permute"]["steady"]["n"] else None
    )
    out["canary"] = canary
    for other in more_canaries:
        run_other = out[f"permute_canary_{other}"]
        moving_other = run_other["transfer_steps"].get("median_ms")
        out[f"rebalance_stall_ratio_canary_{other}"] = (
            moving_other / steady if steady and moving_other else None
        )
        out[f"rebalance_stall_ratio_in_run_canary_{other}"] = (
            moving_other / run_other["steady"]["median_ms"]
            if moving_other and run_other["steady"]["n"]
            else None
        )
    plan = out["policy"]["planning_steps"].get("median_ms")
    out["planning_step_ratio"] = plan / steady if plan and steady else None
    return out


# ============================================================================ main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", default="bw,record,transfer,train")
    parser.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke test)")
    parser.add_argument("--record-rounds", type=int, default=500, help="paired rounds of the record part")
    parser.add_argument(
        "--canary",
        default="off",
        choices=("off", "sampled", "full"),
        help="eplb_transfer_canary for the training part",
    )
    parser.add_argument(
        "--more-canaries",
        default="",
        help="comma-separated canary settings to time too (rotate-slots runs only), e.g. full,off",
    )
    args = parser.parse_args(argv)
    small = args.small or not CUDA
    parts = args.parts.split(",")
    started = time.time()
    device = init_single_rank()
    from megatron_eplb.patches import megatron as eplb_mcore

    result: dict = {
        "script": "benchmarks/gpu_perf.py",
        "device": torch.cuda.get_device_name(0) if CUDA else "cpu",
        "torch": torch.__version__,
        "megatron_core": ".".join(map(str, eplb_mcore.mcore_version())),
        "small": small,
    }
    try:
        import grouped_gemm  # noqa: F401

        result["grouped_gemm"] = "importable"
    except Exception as exc:  # noqa: BLE001
        result["grouped_gemm"] = f"not available ({type(exc).__name__}); GroupedMLP not measured"
    copy_gbps = 0.0
    if "bw" in parts or "transfer" in parts:
        result["bandwidth"] = part_bandwidth(device, small)
        copy_gbps = result["bandwidth"]["copy_bandwidth_GBps"]
        print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    if "record" in parts:
        rec = result["record"] = part_record(device, small, rounds=args.record_rounds)
        # The measure: the layer forward with vs without the EPLB patch (recording on, default
        # placement).  The recording alone (patched vs patched with recording off) is reported beside it.
        result["recording_overhead_pct"] = rec["patch_pct"]["median_pct"]
        result["recording_overhead_ci95_pct"] = rec["patch_pct"]["ci95_pct"]
        result["recording_alone_pct"] = rec["recording_pct"]["median_pct"]
        result["recording_overhead_method"] = (
            "record: paired CUDA-event wall clock of the layer forward, patched (recording on) vs unpatched, "
            f"{rec['rounds']} rounds, two separately built instances of each kind; median"
        )
        _dump(args.out, result)
        _sync()
        if CUDA:
            torch.cuda.empty_cache()
    if "transfer" in parts:
        result["transfer"] = part_transfer(device, small, copy_gbps)
        print(json.dumps({k: v for k, v in result["transfer"].items()}), flush=True)
        _dump(args.out, result)
        if CUDA:
            torch.cuda.empty_cache()
    if "train" in parts:
        more = tuple(c for c in args.more_canaries.split(",") if c)
        result["train"] = part_train(device, small, canary=args.canary, more_canaries=more)
        result["rebalance_stall_ratio"] = result["train"]["rebalance_stall_ratio"]
    result["seconds"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_perf.json" if args.canary == "off" else f"gpu_perf_canary_{args.canary}.json"
    (out / name).write_text(json.dumps(result, indent=1))
    print(_table(result))
    dist.destroy_process_group()
    return result


def _dump(out: str, result: dict) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "gpu_perf.json").write_text(json.dumps(result, indent=1))


def _table(r: dict) -> str:
    lines = [f"{r['device']}  torch {r['torch']}  megatron-core {r['megatron_core']}  ({r['seconds']} s)"]
    if "record" in r:
        p = r["record"]
        ci = lambda d: f"{d['median_pct']:+.2f} % ({d['ci95_pct'][0]:+.2f} ... {d['ci95_pct'][1]:+.2f})"  # noqa: E731
        lines.append(
            f"MoE layer forward, unpatched: {p['forward_ms']:.3f} ms (median of {p['rounds']} rounds)"
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
            f"  bitwise equal {p['bitwise_equal']}, loads ok {p['loads_sum_ok']}, "
            f"CUDA graph replay counts ok {p['cuda_graph_replay_counts_ok']}"
        )
    if "transfer" in r:
        t = r["transfer"]
        lines.append("canary: " + json.dumps({k: v for k, v in t.items() if k.startswith("canary_")}))
        for mode in [k for k in t if k.startswith(("staged", "direct"))]:
            m = t[mode]
            lines.append(
                f"transfer {mode}: {m['median_ms']:.2f} ms, {m['achieved_GBps']:.0f} GB/s "
                f"({100 * (m['fraction_of_copy_bandwidth'] or 0):.0f}% of copy), staging {m['peak_staging_bytes'] / 2**20:.0f} MiB, ok={m['correct']}"
            )
    if "train" in r:
        t = r["train"]
        for key in [k for k in ("off", "permute", "policy") if k in t] + [
            k for k in t if k.startswith("permute_canary_")
        ]:
            run = t[key]
            parts = [
                f"{c} {run[c]['median_ms']:.1f} (n={run[c]['n']}, max {run[c]['max_ms']:.1f})"
                for c in ("steady", "transfer_steps", "gather_steps", "planning_steps")
                if run[c]["n"]
            ]
            lines.append(
                f"train {key}: " + "; ".join(parts) + f"; rebalances {run['rebalances']} {run['outcomes']}"
            )
        lines.append(
            f"rebalance_stall_ratio {t['rebalance_stall_ratio']}, in-run {t['rebalance_stall_ratio_in_run']}, "
            f"planning_step_ratio {t['planning_step_ratio']}"
        )
        lines.append(
            "canary stall ratios: "
            + json.dumps({k: v for k, v in t.items() if k.startswith("rebalance_stall_ratio")})
        )
        lines.append("memory: " + json.dumps(t["memory"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
