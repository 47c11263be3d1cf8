"""Pieces the benchmark scripts share (imported as ``bench_common``: each script's folder is on ``sys.path``)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "CUDA",
    "Timer",
    "apply_preset",
    "build_moe_layer",
    "grouped_gemm_source",
    "count_calls",
    "environment",
    "init_single_rank",
    "moe_config",
    "out_dir",
    "rotate_policy",
    "run_one_gpu",
    "sync",
    "time_stats",
    "write_result",
]

CUDA = torch.cuda.is_available()
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def init_single_rank() -> torch.device:
    """One process, one device: Megatron's parallel state at TP = PP = EP = 1, NCCL on GPU, gloo on CPU."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron_eplb.patches import megatron as eplb_mcore

    cuda = torch.cuda.is_available()
    eplb_mcore.enable_cpu()  # on CUDA only the version fixes (ensure_compat), unpatched models included
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    model_parallel_cuda_manual_seed(1234)
    return torch.device("cuda", 0) if cuda else torch.device("cpu")


def apply_preset(args: argparse.Namespace, small: dict, full: dict) -> None:
    """Fill every flag left unset (None) from the ``small`` preset (``--small``, implied without CUDA) or the
    ``full`` one; sets ``args.small``."""
    args.small = args.small or not torch.cuda.is_available()
    for key, value in (small if args.small else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def count_calls(owner, name: str, events: dict[str, int]) -> None:
    """Wrap ``owner.name`` (once) so that each call adds 1 to ``events[name]``."""
    original = getattr(owner, name)
    if getattr(original, "_bench_counted", False):
        return

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        events[name] = events.get(name, 0) + 1
        return original(*args, **kwargs)

    wrapper._bench_counted = True
    setattr(owner, name, wrapper)


def time_stats(ms: list[float]) -> dict:
    """Summary of ``ms`` (times in milliseconds): n, median, p10, p90, max (``median_ms`` None when empty)."""
    if not ms:
        return {"n": 0, "median_ms": None}
    a = np.asarray(ms)
    return {
        "n": len(ms),
        "median_ms": float(np.median(a)),
        "p10_ms": float(np.percentile(a, 10)),
        "p90_ms": float(np.percentile(a, 90)),
        "max_ms": float(a.max()),
    }


def rotate_policy(load, num_slots, num_ranks, previous=None, **kwargs):
    """Test policy: every rank's slots go to the next rank (``phy2log [L, P]`` rolled by the slots per rank),
    so every slot whose expert is not already on its new rank is sent over the network: forced moves.

    Here, in an importable module rather than in a benchmark's ``__main__``, so the policy worker process
    can load it without re-running the benchmark script."""
    return np.roll(previous.phy2log, previous.phy2log.shape[1] // num_ranks, axis=1)


# ------------------------------------------------------------------------- one-GPU measurements
def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class Timer:
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
        sync()
        if CUDA:
            return [a.elapsed_time(b) for a, b in self.pairs]
        return [(b - a) * 1e3 for a, b in self.pairs]


def moe_config(h, ffn, experts, topk, dtype, layers=1, grouped=False, **kw):
    """Megatron ``TransformerConfig`` of the benchmarks' MoE: alltoall dispatcher, SequentialMLP (``GroupedMLP``
    with ``grouped``), no bias, no aux loss, no dropout; ``kw`` goes to the config (``heads`` and ``dense_ffn``
    are this helper's)."""
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
        moe_grouped_gemm=grouped,
        add_bias_linear=False,
        moe_aux_loss_coeff=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_cpu_initialization=not CUDA,
        **kw,
    )


def build_moe_layer(config, number: int = 1) -> torch.nn.Module:
    """One MoELayer from ``get_moe_module_spec`` (a ModuleSpec up to 0.17, a functools.partial from 0.18);
    ``GroupedMLP`` experts when ``config.moe_grouped_gemm`` (call :func:`grouped_gemm_source` first)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module

    spec = get_moe_module_spec(
        use_te=False, num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm
    )
    if isinstance(spec, functools.partial):
        return spec(config=config, layer_number=number)
    return build_module(spec, config=config, layer_number=number)


def grouped_gemm_source(device: torch.device) -> str:
    """Install the grouped GEMM ``GroupedMLP`` needs (the ``grouped_gemm`` package where importable, else
    megatron-eplb's drop-in) and say which, with the drop-in's backend for the benchmarks' bf16 GEMMs
    (``torch._grouped_mm`` or the per-group loop) on ``device``."""
    from megatron_eplb.patches.megatron import grouped_gemm

    source = grouped_gemm.install()
    if source == "megatron_eplb":
        a = torch.zeros(16, 64, dtype=torch.bfloat16, device=device)
        b = torch.zeros(2, 64, 64, dtype=torch.bfloat16, device=device)
        source = f"megatron_eplb drop-in ({grouped_gemm.backend(a, b)})"
    return source


# ------------------------------------------------------------------------------- results
def out_dir(value: str | None) -> Path:
    """``--out``: the folder given, else ``benchmarks/results`` on CUDA and ``outputs/benchmarks`` on CPU (a
    CPU smoke run must not replace the committed GPU results)."""
    if value:
        return Path(value)
    return RESULTS if CUDA else REPO / "outputs" / "benchmarks"


def environment(script: str, small: bool) -> dict:
    """The provenance fields of a one-GPU result: script, device, torch, megatron-core, sizes, grouped_gemm."""
    from megatron_eplb.patches import megatron as eplb_mcore

    env: dict = {
        "script": f"benchmarks/{script}",
        "device": torch.cuda.get_device_name(0) if CUDA else "cpu",
        "torch": torch.__version__,
        "megatron_core": ".".join(map(str, eplb_mcore.mcore_version())),
        "small": small,
    }
    try:
        import grouped_gemm  # noqa: F401

        env["grouped_gemm"] = "importable"
    except Exception as exc:  # noqa: BLE001
        env["grouped_gemm"] = f"not available ({type(exc).__name__}); GroupedMLP not measured"
    return env


def write_result(out: Path, script: str, result: dict) -> Path:
    """Write ``out/<script stem>.json`` (one file per script: the latest run replaces the previous one)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{Path(script).stem}.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def run_one_gpu(
    script: str, doc: str, add_args, measure, table, argv: list[str] | None = None, result_name=None
) -> dict:
    """The ``main`` of a one-GPU measurement: options ``--out`` and ``--small`` plus ``add_args(parser)``'s;
    one rank (:func:`init_single_rank`); ``measure(device, small, args) -> dict`` after the provenance fields
    (:func:`environment`); writes ``<script>.json`` (:func:`write_result`; ``result_name(args)`` names it
    instead where given) and prints ``table(result)``."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument(
        "--out",
        default=None,
        help="folder for the JSON (default: benchmarks/results on CUDA, outputs/benchmarks on CPU)",
    )
    parser.add_argument(
        "--small", action="store_true", help="tiny sizes (CPU smoke test; chosen without CUDA)"
    )
    add_args(parser)
    args = parser.parse_args(argv)
    small = args.small or not CUDA
    started = time.time()
    device = init_single_rank()
    result = environment(script, small)
    result.update(measure(device, small, args))
    result["seconds"] = round(time.time() - started, 1)
    path = write_result(out_dir(args.out), result_name(args) if result_name else script, result)
    print(
        f"{result['device']}  torch {result['torch']}  megatron-core {result['megatron_core']}  ({result['seconds']} s)"
    )
    print(table(result))
    print(f"wrote {path}", flush=True)
    dist.destroy_process_group()
    return result
