"""The megatron-eplb demo (``make demo``): train with dynamic EPLB under DeepSpeed, then serve with static EPLB.

Phase 1 — ``deepspeed --num_gpus 2 examples/train.py`` (2 CPU ranks with gloo, or up to 2 GPUs with NCCL
where CUDA is available; EP = the number of ranks): a 4-layer GPT with 16
experts (top-2), one redundant slot per rank, on real text; the data switches from code to Wikipedia
half-way, so the routing shifts and the manager re-places experts (weights + Adam state move).  It records
the expert map, writes a wandb offline run + TensorBoard events under ``outputs/demo/`` and a checkpoint.
Phase 2 — ``deepspeed --num_gpus 2 examples/generate.py``: inference from that checkpoint with the
recorded map (static EPLB): TTFT p50/p99, TPOT mean, balancedness.

    .venv/bin/python examples/demo.py           # ~5-8 min on 2 cores
    .venv/bin/python examples/demo.py --quick   # same code path, fewer steps (~2-3 min)
    .venv/bin/python examples/demo.py --grouped-gemm   # experts as Megatron's legacy GroupedMLP (bf16)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = [
    "--num-layers", "4", "--hidden-size", "64", "--num-experts", "16", "--moe-router-topk", "2",
    "--seq-length", "128",
]  # fmt: skip


def ranks(cpu_ranks: int = 2) -> tuple[int, str]:
    """``(processes, what)``: one per GPU (at most 2, NCCL) where CUDA is available, else ``cpu_ranks`` CPU
    ranks (gloo)."""
    import torch

    if torch.cuda.is_available():
        n = min(2, torch.cuda.device_count())
        return n, f"{n} GPU{'s' if n > 1 else ''}, NCCL"
    return cpu_ranks, f"{cpu_ranks} CPU ranks, gloo"


def launcher() -> list[str]:
    """The ``deepspeed`` launcher beside this interpreter (else its module), on ``$MASTER_PORT`` when set."""
    exe = Path(sys.executable).with_name("deepspeed")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    if os.environ.get("MASTER_PORT"):
        cmd += ["--master_port", os.environ["MASTER_PORT"]]
    return cmd


def run(cmd: list[str], what: str, log_path: Path, cuda: bool) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    print(f"\n==> {what}\n    {' '.join(cmd)}\n    (full log: {log_path})", flush=True)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in proc.stdout:
            log.write(line)
            if (
                any(k in line for k in ("megatron_eplb", "Error", "error:", "Traceback"))
                and "[rank1]" not in line
            ):
                print("    " + line.rstrip(), flush=True)
        code = proc.wait()
    if code != 0:
        tail = "".join(Path(log_path).read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"{what} failed (exit code {code}); last lines of {log_path}:\n{tail}")
    print(f"    done in {time.monotonic() - t0:.0f} s", flush=True)


def realized_summary(metrics: dict) -> list[str]:
    """Lines on the realized per-step balancedness (``train.py``'s metrics: the manager's every
    ``eplb_log_interval`` steps) with EPLB vs Megatron's default placement on the same steps."""
    rows = metrics.get("realized_balancedness") or []

    def mean(key: str, rows: list[dict]) -> float:
        return sum(r[key] * r["steps"] for r in rows) / sum(r["steps"] for r in rows)

    out = []
    for what, part in (
        ("all steps", rows),
        ("after the domain switch", [r for r in rows if r["first_step"] > metrics.get("switch_step", 0)]),
    ):
        if part:
            out.append(
                f"realized balancedness per step, {what} ({part[0]['first_step']}-{part[-1]['last_step']}): "
                f"{mean('eplb/balancedness_realized', part):.3f} with EPLB vs "
                f"{mean('eplb/balancedness_default_placement', part):.3f} under Megatron's default placement"
            )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="shortened run (CI): same code path, fewer steps"
    )
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--train-iters", type=int, default=None)
    parser.add_argument(
        "--grouped-gemm",
        action="store_true",
        help="experts as Megatron's legacy GroupedMLP in bf16 (--moe-grouped-gemm --bf16 for both phases; "
        "megatron-eplb's torch._grouped_mm drop-in where the grouped_gemm package is missing)",
    )
    parser.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="TP for attention and dense layers in phase 1 (experts keep TP 1; add --sequence-parallel)",
    )
    parser.add_argument(
        "--sequence-parallel", action="store_true", help="Megatron sequence parallelism (TP > 1)"
    )
    parser.add_argument(
        "--pipeline-model-parallel-size",
        type=int,
        default=1,
        help="pipeline stages in phase 1 (Megatron's 1F1B + torch Adam; EP = ranks / stages); phase 2 serves the "
        "logical checkpoint with PP 1",
    )
    parser.add_argument(
        "--cpu-ranks",
        type=int,
        default=2,
        help="CPU processes (gloo) where there is no GPU; e.g. 4 for --pipeline-model-parallel-size 2 with EP 2",
    )
    parser.add_argument(
        "--deepspeed-config",
        default="configs/ds_config.json",
        help="ds_config of phase 1, e.g. configs/ds_config_zero2.json (ZeRO 2)",
    )
    parser.add_argument(
        "--train-args",
        default="",
        help="extra examples/train.py flags (one string, shell syntax); they come last, so they win",
    )
    args = parser.parse_args(argv)
    out = REPO / args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    n, where = ranks(args.cpu_ranks)
    cuda = "GPU" in where
    pp, tp = args.pipeline_model_parallel_size, args.tensor_model_parallel_size
    # EP = the ranks of one pipeline stage; phase 2 serves with that EP (the recorded map's) and PP = TP = 1
    model = [*MODEL, "--expert-model-parallel-size", str(max(1, n // pp))]
    if args.grouped_gemm:
        model += ["--moe-grouped-gemm", "--bf16"]
    layout = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    layout += ["--sequence-parallel"] * args.sequence_parallel
    iters = args.train_iters or (60 if args.quick else 300)
    every = max(10, iters // 6)
    expert_map = out / "expert_map.json"
    train = [
        *launcher(), "--num_gpus", str(n), "examples/train.py",
        "--deepspeed_config", args.deepspeed_config,
        "--eplb-config", "configs/eplb_dynamic.yaml",
        *model, *layout,
        "--train-iters", str(iters), "--log-interval", str(max(5, iters // 20)),
        "--num-iterations-eplb-update", str(every), "--eplb-window-size", str(every),
        "--expert-map-record-path", str(expert_map),
        "--output-dir", str(out), "--save", str(out / "checkpoint"),
        "--metrics-out", str(out / "train_metrics.json"),
        *shlex.split(args.train_args),
    ]  # fmt: skip
    t0 = time.monotonic()
    run(
        train,
        f"phase 1: training {iters} steps with dynamic EPLB (DeepSpeed, {where})",
        out / "train.log",
        cuda,
    )
    metrics = json.loads((out / "train_metrics.json").read_text())
    if not expert_map.is_file():
        raise SystemExit(
            f"no expert map was recorded at {expert_map}: no rebalance completed (see {out / 'train.log'}); "
            "run longer (--train-iters) or lower --num-iterations-eplb-update"
        )
    generate = [
        *launcher(), "--num_gpus", str(n), "examples/generate.py",
        *model, "--load", str(out / "checkpoint"), "--expert-map-path", str(expert_map),
        "--requests", "4" if args.quick else "16", "--new-tokens", "16" if args.quick else "32",
        "--metrics-out", str(out / "generate_metrics.json"),
    ]  # fmt: skip
    run(
        generate,
        "phase 2: static-EPLB inference from the checkpoint with the recorded map",
        out / "generate.log",
        cuda,
    )
    gen = json.loads((out / "generate_metrics.json").read_text())
    losses = metrics["losses"]
    print("\n==> summary")
    print(
        f"    loss: first {losses[0]:.3f}, last {losses[-1]:.3f} over {len(losses)} steps ({metrics['seconds']:.0f} s)"
    )
    for line in realized_summary(metrics):
        print("    " + line)
    for r in metrics["rebalances"]:
        print(
            f"    rebalance at step {r['completed_step']}: {r['outcome']}, predicted balancedness "
            f"{r['balancedness_before']:.3f} -> {r['balancedness_after']:.3f} (on the window it planned from), "
            f"{r['moved_slots']} slots moved"
        )
    print(
        f"    inference: TTFT p50 {gen['ttft_p50_ms']:.1f} ms, p99 {gen['ttft_p99_ms']:.1f} ms, TPOT mean "
        f"{gen['tpot_mean_ms']:.1f} ms, balancedness {gen['balancedness']:.3f} "
        f"(default placement {gen['balancedness_default_placement']:.3f})"
    )
    png = out / "expert_load.png"
    print(f"    heat map: {png if png.is_file() else 'not written (no rebalance)'}")
    print(
        f"    wandb offline run: {out / 'wandb'} (sync with `wandb sync`), TensorBoard: {out / 'tensorboard'}"
    )
    print(f"    total {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
