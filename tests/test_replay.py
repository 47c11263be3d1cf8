"""megatron_eplb/replay.py and `megatron-eplb replay`: a trace under every strategy, on the same steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_eplb.cli import main
from megatron_eplb.replay import replay
from megatron_eplb.trace import read_trace

REPO = Path(__file__).resolve().parent.parent
DEMO_TRACE = REPO / "examples" / "traces" / "demo_train_ep2.npz"
DEEPSEEK = Path("/work/shared/data/real_traces/sglang_deepseek_v3")


def _rows(result: dict) -> dict:
    return {row["name"]: row for row in result["rows"]}


def test_replay_orders_the_strategies_on_shifting_loads():
    rng = np.random.default_rng(0)
    hot = rng.gamma(0.3, size=(2, 4, 16))  # two phases of skewed routing
    loads = np.concatenate([rng.poisson(200 * hot[i] / hot[i].mean(), size=(15, 4, 16)) for i in (0, 1)])
    result = replay(loads, 4, 4, policies=("greedy", "low_churn"), interval=5, window=5)
    rows = _rows(result)
    assert set(rows) == {
        "default",
        "greedy even",
        "greedy balanced",
        "greedy best split",
        "low_churn even",
        "low_churn balanced",
        "low_churn best split",
        "oracle (per-step plan)",
    }
    for policy in ("greedy", "low_churn"):
        even = np.array(rows[f"{policy} even"]["per_step"])
        balanced = np.array(rows[f"{policy} balanced"]["per_step"])
        best = np.array(rows[f"{policy} best split"]["per_step"])
        assert (balanced >= even - 1e-12).all()  # the per-batch split never loses to the even one
        assert (best >= balanced - 1e-9).all()  # and never beats the bound
        assert rows[f"{policy} balanced"]["mean"] >= 0.98 * rows[f"{policy} best split"]["mean"]
    assert rows["oracle (per-step plan)"]["mean"] > rows["greedy even"]["mean"]
    assert rows["greedy balanced"]["mean"] > rows["default"]["mean"]
    assert rows["low_churn even"]["moved_slots"] <= rows["greedy even"]["moved_slots"]
    assert result["split_vs_bound_min"] >= 0.9
    for row in rows.values():
        assert len(row["per_step"]) == 30 and row["worst"] <= row["p10"] <= row["mean"] <= 1.0


def test_committed_demo_trace():
    trace = read_trace(DEMO_TRACE)
    assert trace.counts.shape == (200, 2, 4, 16)  # steps, source ranks (EP 2), MoE layers, experts
    assert trace.meta["ep_size"] == 2 and trace.meta["domains"] == ["code", "wikipedia"]
    assert (trace.loads().sum(axis=2) == trace.loads().sum(axis=2)[0, 0]).all()  # top-2 of every token


def test_replay_cli_on_the_demo_trace_at_another_ep_size(tmp_path, capsys):
    out, png = tmp_path / "replay.json", tmp_path / "replay.png"
    argv = ["replay", str(DEMO_TRACE), "--ep-size", "4", "--redundancy", "4", "--steps", "60"]
    argv += ["--interval", "20", "--window", "20", "--out", str(out), "--plot", str(png), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "strategy" in text and "greedy balanced" in text and "oracle (per-step plan)" in text
    result = json.loads(out.read_text())
    assert result["config"]["ep_size"] == 4 and result["config"]["steps"] == 60
    rows = _rows(result)
    assert rows["greedy balanced"]["mean"] >= rows["greedy even"]["mean"]
    assert png.is_file() and png.stat().st_size > 10_000


def test_replay_cli_errors(tmp_path, capsys):
    assert main(["replay", str(tmp_path / "nope.npz"), "--ep-size", "4", "--redundancy", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["replay", str(DEMO_TRACE), "--ep-size", "3", "--redundancy", "1", "--plot", ""]) == 2
    assert "do not divide over --ep-size 3" in capsys.readouterr().err
    assert (
        main(["replay", str(DEMO_TRACE), "--ep-size", "2", "--redundancy", "2", "--policies", "gredy"]) == 2
    )
    assert "unknown policy 'gredy'" in capsys.readouterr().err
    # the demo trace has 16 experts: 1000000 - 16 redundant slots fill 1000000 ranks, refused up front
    argv = ["replay", str(DEMO_TRACE), "--ep-size", "1000000", "--redundancy", "999984", "--plot", ""]
    assert main(argv) == 2
    assert "--ep-size 1000000: num_ranks=1,000,000 is larger than any expert-parallel group" in (
        capsys.readouterr().err
    )


@pytest.mark.skipif(not DEEPSEEK.is_dir(), reason="real traces not on this machine")
def test_replay_cli_on_real_load_files_as_steps(tmp_path, capsys):
    files = [str(DEEPSEEK / f"{n}.json") for n in ("prefill_in512", "prefill_in2048", "decode_in1000out1000")]
    out = tmp_path / "ds.json"
    argv = ["replay", *files, "--ep-size", "8", "--redundancy", "8", "--interval", "1", "--window", "1"]
    argv += ["--policies", "greedy", "--no-bound", "--plot", "", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    rows = _rows(json.loads(out.read_text()))
    assert rows["greedy balanced"]["mean"] >= rows["greedy even"]["mean"] > rows["default"]["mean"]
    assert rows["oracle (per-step plan)"]["mean"] > 0.98
