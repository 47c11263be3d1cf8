"""GPU check: every user-facing path on N GPUs (NCCL), as a user starts it, in one command.

    python benchmarks/gpu_check.py --gpus 1
    python benchmarks/gpu_check.py --gpus 2 [--bench]

Through the ``deepspeed`` launcher, one process per GPU, EP = N:

1. ``examples/train.py`` without EPLB and with dynamic EPLB (redundant slots, rebalances that move experts
   with their optimizer state), fp32 ZeRO 0 and bf16 ZeRO 1 + gradient accumulation: losses step by step
   against the run without EPLB, rebalances, realized balancedness, checkpoints;
2. ``examples/generate.py`` from the EPLB checkpoint: with the recorded map (static EPLB), with dynamic
   EPLB, and without EPLB (Megatron's layout): the greedy tokens of the three, TTFT / TPOT, balancedness;
3. ``examples/demo.py --quick`` (the ``make demo`` path);
4. with ``--bench``: ``benchmarks/run_multi_gpu.sh N`` (the multi-GPU benchmark).

``--zero2`` adds ZeRO 2 (``configs/ds_config_zero2.json``, fp32) to every expert class chosen: step 1 for
SequentialMLP the same three ways, and ``examples/train_deepspeed_moe.py`` with replicas under ZeRO 2.

``--experts grouped`` runs the expert class Megatron's legacy ``GroupedMLP`` (``examples/train.py
--moe-grouped-gemm``; megatron-eplb's ``torch._grouped_mm`` drop-in where the ``grouped_gemm`` package is
missing) through step 1 in bf16 ZeRO 1 (GroupedMLP runs in bf16 only): without EPLB, with moves only, with
replicas; ``--experts deepspeed_moe`` runs ``examples/train_deepspeed_moe.py`` (DeepSpeed's own MoE layer,
top-2, capacity 1.0, fp32) the same three ways; ``--experts sequential,grouped,deepspeed_moe`` runs all
(default: ``sequential``, every step above).

Each step runs even if an earlier one failed; its exit code, seconds and the tail of a failing log are kept.
Writes ``--out/gpu_check_ws<N>.json`` (default ``benchmarks/results``) and prints a table.  Exit code 1 when
a step failed or a check did not hold.  Logs: ``--work/<step>.log`` (default ``outputs/gpu_check_ws<N>``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
from demo import launcher  # noqa: E402  (the deepspeed launcher, on $MASTER_PORT when set)

SMALL_MODEL = [
    "--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "512", "--num-attention-heads", "8",
    "--num-experts", "16", "--moe-router-topk", "2", "--seq-length", "256", "--micro-batch-size", "8",
]  # fmt: skip
EPLB = [
    "--dynamic-eplb", "--init-redundancy-expert", "2", "--num-iterations-eplb-update", "10",
    "--eplb-window-size", "10", "--num-wait-worker-iterations", "2", "--eplb-layers-per-step", "2",
]  # fmt: skip
# Losses with replicas vs without EPLB: the replica-gradient sum rounds differently from one expert's gradient.
LOSS_RTOL = {"fp32": 1e-3, "bf16": 3e-2}
REPLICA_STEPS = 10  # steps before the first rebalance (--num-iterations-eplb-update)
KINDS = ("sequential", "grouped", "deepspeed_moe")


def run_step(name: str, cmd: list[str], work: Path, env: dict, timeout: float) -> dict:
    """Run one command, log to ``work/name.log``; return ``{name, cmd, rc, seconds, tail?}``."""
    log = work / f"{name}.log"
    print(f"==> {name}: {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    try:
        with open(log, "w") as f:
            rc = subprocess.run(
                cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    out = {"name": name, "cmd": " ".join(cmd), "rc": rc, "seconds": round(time.monotonic() - t0, 1)}
    if rc != 0:
        out["tail"] = log.read_text(errors="replace").splitlines()[-30:]
        print("\n".join("    " + line for line in out["tail"]), flush=True)
    print(f"    rc {rc}, {out['seconds']} s", flush=True)
    return out


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def loss_check(base: dict | None, other: dict | None, rtol: float) -> dict:
    """Step-by-step relative loss difference of ``other`` against ``base`` (train.py metrics)."""
    if not base or not other:
        return {"ok": False, "why": "a run wrote no metrics"}
    a, b = base["losses"], other["losses"]
    n = min(len(a), len(b))
    rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a[:n], b[:n])]
    worst = max(rel) if rel else float("nan")
    return {
        "steps": n,
        "max_rel_diff": worst,
        "mean_rel_diff": sum(rel) / max(n, 1),
        "rtol": rtol,
        "loss_first_last": [a[0], a[n - 1]] if n else None,
        "ok": n == len(a) == len(b) and worst <= rtol,
    }


def train_summary(metrics: dict | None) -> dict | None:
    if not metrics:
        return None
    moved = [r for r in metrics.get("rebalances", []) if r.get("outcome") == "committed"]
    measured = [m["eplb/balancedness_realized"] for m in metrics.get("realized_balancedness", [])]
    return {
        "steps": len(metrics["losses"]),
        "loss_first": metrics["losses"][0],
        "loss_last": metrics["losses"][-1],
        "seconds": metrics["seconds"],
        "rebalances_committed": len(moved),
        "slots_moved": sum(r.get("moved_slots", 0) for r in moved),
        "realized_balancedness_per_interval": measured,
        "zero_stage": metrics.get("zero_stage"),
    }


def deepspeed_moe_runs(
    launch: list[str],
    n: int,
    iters: int,
    work: Path,
    env: dict,
    timeout: float,
    steps: list,
    checks: dict,
    ds_config: str = "configs/ds_config.json",
    prefix: str = "dsmoe",
) -> None:
    """``examples/train_deepspeed_moe.py`` (``deepspeed.moe.layer.MoE``, top-2, capacity 1.0) without EPLB,
    with EPLB moving experts only and with replicas; moves-only losses equal the baseline's bit for bit.
    Runs and checks are named ``prefix_*``."""
    base = [
        *launch, "examples/train_deepspeed_moe.py", "--deepspeed_config", ds_config,
        "--train-iters", str(iters), "--no-wandb", "--log-interval", "10",
    ]  # fmt: skip
    eplb = [
        "--dynamic-eplb", "--num-iterations-eplb-update", "10", "--eplb-window-size", "10",
        "--num-wait-worker-iterations", "2", "--eplb-replica-dispatch", "even",
    ]  # fmt: skip
    out = {}
    for name, extra in (
        (f"{prefix}_off", ["--no-eplb"]),
        (f"{prefix}_moves", [*eplb, "--init-redundancy-expert", "0"]),
        (f"{prefix}_eplb", [*eplb, "--init-redundancy-expert", str(2 * n)]),
    ):
        metrics = work / name / "metrics.json"
        cmd = [*base, "--output-dir", str(work / name), "--metrics-out", str(metrics), *extra]
        steps.append(run_step(name, cmd, work, env, timeout))
        out[name] = _json(metrics)
    checks[f"loss_{prefix}_moves_vs_off"] = loss_check(out[f"{prefix}_off"], out[f"{prefix}_moves"], 0.0)
    early = {k: ({**v, "losses": v["losses"][:REPLICA_STEPS]} if v else v) for k, v in out.items()}
    checks[f"loss_{prefix}_replicas_vs_off_first_{REPLICA_STEPS}"] = loss_check(
        early[f"{prefix}_off"], early[f"{prefix}_eplb"], LOSS_RTOL["fp32"]
    )
    if n > 1:
        for name in (f"{prefix}_moves", f"{prefix}_eplb"):
            moved = [r for r in (out[name] or {}).get("rebalances", []) if r.get("outcome") == "committed"]
            checks[f"{name}_rebalanced"] = {
                "ok": bool(moved) and sum(r.get("moved_slots", 0) for r in moved) > 0
            }
    return {}


def environment() -> dict:
    import torch

    out = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    for name in ("megatron.core", "deepspeed"):
        try:
            out[name] = __import__(name, fromlist=["__version__"]).__version__
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            out[name] = f"not importable: {exc}"
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # noqa: BLE001
        out["nccl"] = None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--steps", type=int, default=40, help="training steps per run")
    p.add_argument("--bench", action="store_true", help="also run benchmarks/run_multi_gpu.sh N")
    p.add_argument("--bench-args", default="", help="extra multi_gpu_bench.py flags (one string)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument(
        "--work", default=None, help="logs, checkpoints, metrics (default outputs/gpu_check_ws<N>)"
    )
    p.add_argument("--timeout", type=float, default=300, help="seconds per step")
    p.add_argument(
        "--experts",
        default="sequential",
        help="comma-separated expert classes: sequential (every step), grouped (GroupedMLP: bf16 ZeRO 1 training), "
        "deepspeed_moe (examples/train_deepspeed_moe.py: deepspeed.moe.layer.MoE without and with EPLB)",
    )
    p.add_argument(
        "--zero2",
        action="store_true",
        help="also ZeRO 2 (configs/ds_config_zero2.json, fp32) for each class chosen",
    )
    args = p.parse_args(argv)
    kinds = [k for k in args.experts.split(",") if k]
    if set(kinds) - set(KINDS) or not kinds:
        p.error(f"--experts {args.experts!r}: comma-separated {', '.join(KINDS)}")

    import torch

    cuda = torch.cuda.is_available()
    n = args.gpus
    work = Path(args.work or REPO / "outputs" / f"gpu_check_ws{n}")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"  # a CPU smoke run of this script (gloo)
    launch = [*launcher(), "--num_gpus", str(n)]
    model = [*SMALL_MODEL, "--expert-model-parallel-size", str(n), "--no-wandb"]
    steps = []
    checks: dict[str, dict] = {}

    def train(name: str, extra: list[str]) -> dict | None:
        cmd = [
            *launch, "examples/train.py", *model, "--train-iters", str(args.steps),
            "--log-interval", "5", "--output-dir", str(work / name), "--save", str(work / name / "ckpt"),
            "--metrics-out", str(work / name / "metrics.json"), *extra,
        ]  # fmt: skip
        if "--no-eplb" in extra:  # logical checkpoints are EPLB's (the baseline keeps Megatron's layout)
            cmd = [c for c in cmd if c not in ("--save", str(work / name / "ckpt"))]
        steps.append(run_step(name, cmd, work, env, args.timeout))
        return _json(work / name / "metrics.json")

    fp32 = ["--deepspeed_config", "configs/ds_config.json", "--lr", "1e-3"]
    bf16 = ["--deepspeed_config", "configs/ds_config_zero1_bf16.json", "--lr", "1e-3"]
    grouped = [*bf16, "--moe-grouped-gemm"]
    moves_only = ["--init-redundancy-expert", "0"]  # later flags win: no replicas, experts still move
    configs = {}
    zero2 = ["--deepspeed_config", "configs/ds_config_zero2.json", "--lr", "1e-3"]
    if "sequential" in kinds:
        configs.update(fp32=fp32, bf16_zero1=bf16, **({"fp32_zero2": zero2} if args.zero2 else {}))
    if "grouped" in kinds:
        configs["grouped_bf16_zero1"] = grouped
    runs = {}
    for kind, flags in configs.items():
        runs[f"train_{kind}_off"] = train(f"train_{kind}_off", [*flags, "--no-eplb"])
        runs[f"train_{kind}_moves"] = train(f"train_{kind}_moves", [*flags, *EPLB, *moves_only])
        runs[f"train_{kind}_eplb"] = train(f"train_{kind}_eplb", [*flags, *EPLB])
    for kind in configs:
        base = runs[f"train_{kind}_off"]
        # Moves without replicas: the same math in the same order, so the same losses bit for bit
        # (weights, fp32 masters and Adam moments moved; GPU kernels here are run-to-run deterministic).
        checks[f"loss_{kind}_moves_vs_off"] = loss_check(base, runs[f"train_{kind}_moves"], 0.0)
        # Replicas: each copy's gradient is summed over copies, which rounds differently from one expert's
        # gradient; checked before the first rebalance (the difference then grows as training does).
        early = {k: (v[:REPLICA_STEPS] if k == "losses" else v) for k, v in (base or {}).items()}
        eplb = runs[f"train_{kind}_eplb"]
        early_eplb = {k: (v[:REPLICA_STEPS] if k == "losses" else v) for k, v in (eplb or {}).items()}
        checks[f"loss_{kind}_replicas_vs_off_first_{REPLICA_STEPS}"] = loss_check(
            early or None, early_eplb or None, LOSS_RTOL["fp32" if kind.startswith("fp32") else "bf16"]
        )
        checks[f"loss_{kind}_replicas_vs_off_whole_run"] = {
            **loss_check(base, eplb, float("inf")),
            "note": "information: rounding differences grow over training",
        }
    moving = [k for k in runs if k.endswith(("_moves", "_eplb"))] if n > 1 else []  # EP=1: nothing to move
    for name in moving:
        s = train_summary(runs[name])
        checks[f"{name}_rebalanced"] = {
            "ok": bool(s and s["rebalances_committed"] > 0 and s["slots_moved"] > 0)
        }

    if "deepspeed_moe" in kinds:
        deepspeed_moe_runs(launch, n, args.steps, work, env, args.timeout, steps, checks)
        if args.zero2:
            deepspeed_moe_runs(
                launch, n, args.steps, work, env, args.timeout, steps, checks, zero2[1], "dsmoe_zero2"
            )

    gens = {}
    if "sequential" in kinds:  # generation and the demo from the SequentialMLP runs
        ckpt = work / "train_fp32_eplb" / "ckpt"
        gen_model = [*SMALL_MODEL[:-2], "--expert-model-parallel-size", str(n)]  # no --micro-batch-size
        for name, extra in (
            ("generate_static", ["--expert-map-path", str(ckpt / f"iter_{args.steps:07d}" / "expert_map.json")]),
            ("generate_dynamic", ["--dynamic-eplb", "--num-iterations-eplb-update", "4", "--eplb-window-size", "4",
                                  "--num-wait-worker-iterations", "1", "--init-redundancy-expert", "2"]),
            ("generate_off", ["--no-eplb"]),
        ):  # fmt: skip
            cmd = [
                *launch, "examples/generate.py", *gen_model, "--load", str(ckpt), "--requests", "4",
                "--new-tokens", "16", "--metrics-out", str(work / f"{name}.json"), *extra,
            ]  # fmt: skip
            steps.append(run_step(name, cmd, work, env, args.timeout))
            gens[name] = _json(work / f"{name}.json")
        samples = {k: v.get("sample") if v else None for k, v in gens.items()}
        checks["generate_same_tokens"] = {
            "ok": None not in samples.values() and len(set(samples.values())) == 1,
            "samples": samples,
        }

        demo_out = str(work / "demo")  # per check: two checks on one machine must not share it
        steps.append(
            run_step("demo_quick", [sys.executable, "examples/demo.py", "--quick", "--out", demo_out], work, env,
                     args.timeout)
        )  # fmt: skip
    if args.bench:
        bench = ["bash", "benchmarks/run_multi_gpu.sh", str(n), "--out", args.out, *args.bench_args.split()]
        steps.append(run_step("multi_gpu_bench", bench, work, env, max(args.timeout, 600)))

    result = {
        "world_size": n,
        "device": "cuda" if cuda else "cpu",
        "environment": environment(),
        "steps": steps,
        "checks": checks,
        "train": {k: train_summary(v) for k, v in runs.items()},
        "generate": gens,
    }
    ok = all(s["rc"] == 0 for s in steps) and all(c.get("ok") for c in checks.values())
    result["ok"] = ok
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_check_ws{n}.json"
    path.write_text(json.dumps(result, indent=1, default=float))
    print("\n| step | rc | s |\n|---|---|---|")
    for s in steps:
        print(f"| {s['name']} | {s['rc']} | {s['seconds']} |")
    print("\n| check | ok | detail |\n|---|---|---|")
    for name, c in checks.items():
        detail = {k: v for k, v in c.items() if k in ("max_rel_diff", "rtol", "steps", "why")}
        print(f"| {name} | {c.get('ok')} | {detail} |")
    print(f"\n{'all passed' if ok else 'FAILED'}; JSON: {path}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
