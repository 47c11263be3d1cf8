"""benchmarks/multi_gpu_bench.py (issue #8): its pure helpers, and the CPU version once end to end through
the `deepspeed` launcher (``benchmarks/run_multi_gpu.sh 2``: 2 ranks, gloo, ``--small``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RUNS = ("off", "eplb", "rotate")


# ============================================================================ pure helpers
def test_compare_losses_flags_the_first_step_over_tolerance():
    import multi_gpu_bench as b

    ok = b.compare_losses([2.0, 1.0], [2.0, 1.00001], 1e-4)
    assert ok["pass"] and ok["first_step_over"] is None and ok["max_rel"] == pytest.approx(1e-5)
    bad = b.compare_losses([2.0, 1.0, 1.0], [2.0, 1.1, 1.0], 1e-4)
    assert not bad["pass"] and bad["first_step_over"] == 1


def test_balancedness_summary_reduces_ranks_per_layer_and_step():
    import multi_gpu_bench as b

    # [T=4, L=2, N=2]: layer 0 perfectly balanced, layer 1 all load on one rank (0.5).
    load = np.zeros((4, 2, 2))
    load[:, 0] = [5, 5]
    load[:, 1] = [10, 0]
    s = b.balancedness_summary(load, warmup=1, switch=2)
    assert s["mean_per_step"] == pytest.approx(0.75)
    assert s["summed"] == pytest.approx(0.75)
    assert s["first_domain"] == pytest.approx(0.75) and s["second_domain"] == pytest.approx(0.75)
    assert len(s["per_step"]) == 4


def test_parse_args_scales_down_without_cuda():
    import multi_gpu_bench as b
    import torch

    args = b.parse_args(["--runs", "eplb"])
    assert args.runs == ["off", "eplb"]  # the baseline always runs, first
    if not torch.cuda.is_available():
        assert args.small and args.dtype == "fp32" and args.loss_rtol == 1e-4
        assert args.hidden_size == b.SMALL["hidden_size"]
    with pytest.raises(SystemExit):
        b.parse_args(["--runs", "off,nope"])


# ============================================================================ through the launcher
@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from dist import free_port

    out = tmp_path_factory.mktemp("multi_gpu")
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        MASTER_PORT=str(free_port()),
        PYTHON=sys.executable,
    )
    proc = subprocess.run(
        ["bash", "benchmarks/run_multi_gpu.sh", "2", "--small", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return json.loads((out / "multi_gpu_ws2_cpu.json").read_text()), proc.stdout


@pytest.mark.slow
def test_environment_and_setup_are_recorded(bench):
    r, stdout = bench
    env = r["env"]
    assert env["world_size"] == 2 and env["ep_size"] == 2 and env["backend"] == "gloo"
    assert env["device"] == "cpu" and len(env["device_names"]) == 2 and env["launcher"] == "deepspeed"
    for key in ("torch", "deepspeed", "megatron_core", "python"):
        assert env[key], key
    assert r["setup"]["dtype"] == "fp32" and r["setup"]["eplb"]["dynamic_eplb"] is True
    assert "| median step (ms) |" in stdout and "loss comparison: PASS" in stdout


@pytest.mark.slow
def test_losses_equal_step_by_step(bench):
    r, _ = bench
    assert set(RUNS) <= set(r["runs"])
    steps = r["setup"]["steps"]
    for name in RUNS:
        assert len(r["runs"][name]["losses"]) == steps
    assert r["summary"]["loss_pass"]
    for name in ("eplb", "rotate"):
        cmp = r["summary"]["loss"][name]
        assert cmp["pass"] and cmp["steps"] == steps and cmp["max_rel"] <= cmp["rtol"], cmp


@pytest.mark.slow
def test_step_times_balancedness_and_stall(bench):
    r, _ = bench
    for name in RUNS:
        run = r["runs"][name]
        assert run["step_ms"]["median_ms"] > 0 and run["step_ms"]["n"] == run["steps"] - run["warmup_steps"]
        bal = run["balancedness"]
        assert 0 < bal["mean_per_step"] <= 1 and 0 < bal["summed"] <= 1
        assert len(bal["per_step"]) == run["steps"]
    for name in ("eplb", "rotate"):
        moves = r["runs"][name]["slot_moves_in_training"]
        assert moves["committed"] >= 2 and moves["moved_slots"] > 0 and moves["moved_bytes"] > 0
        assert moves["bytes_per_s"] > 0
        stall = r["summary"]["stall"][name]
        assert (
            stall["transfer_steps"] > 0 and stall["transfer_vs_steady"] > 0 and stall["transfer_vs_off"] > 0
        )
        kinds = {row["kind"] for row in r["runs"][name]["rows"]}
        assert {"steady", "gather", "plan_await", "transfer"} <= kinds
    # The forced-move policy sends every slot whose expert is not already on the next rank, every time.
    rotate = r["runs"]["rotate"]
    least = r["setup"]["num_layers"] * (rotate["slots_per_rank"] - rotate["redundant_slots"])
    for rec in rotate["slot_moves_in_training"]["per_rebalance"]:
        assert rec["outcome"] != "committed" or rec["moved_slots"] >= least, rec


@pytest.mark.slow
def test_p2p_probe_and_slot_moves(bench):
    r, _ = bench
    assert r["p2p_probe"] and all(p["received_ok"] and p["bytes_per_s_per_rank"] > 0 for p in r["p2p_probe"])
    probe = r["runs"]["eplb"]["slot_move_probe"]
    assert probe["restored_bitwise"] and probe["bytes_per_s_per_rank"] > 0
    assert probe["message_bytes_per_peer_per_layer"] in {p["bytes"] for p in r["p2p_probe"]}
    assert r["summary"]["p2p"]["slot_moves_vs_probe"] > 0
