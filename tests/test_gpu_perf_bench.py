"""The one-GPU benchmarks (docs/gpu_perf.md) end to end on CPU (``--small``, one gloo rank): each script runs,
writes its one JSON and its correctness checks hold.  Their timings mean nothing here; the GPU numbers are in
docs/gpu_perf.md and benchmarks/results/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROVENANCE = ("script", "device", "torch", "megatron_core", "small", "grouped_gemm", "seconds")

pytestmark = pytest.mark.slow  # a benchmark script in a subprocess


def _run(script: str, out: Path, *flags: str) -> tuple[dict, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(REPO / "benchmarks" / script), "--out", str(out), "--small", *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [script.replace(".py", ".json")], "one JSON per script"
    result = json.loads((out / script.replace(".py", ".json")).read_text())
    assert all(key in result for key in PROVENANCE)
    assert result["script"] == f"benchmarks/{script}" and result["small"]
    return result, proc.stdout


def test_recording_overhead(tmp_path):
    r, stdout = _run("recording_overhead.py", tmp_path, "--rounds", "4")
    for key in ("recording_overhead_pct", "recording_overhead_ci95_pct", "recording_alone_pct"):
        assert key in r
    rec = r["record"]
    assert rec["rounds"] == 4
    assert rec["bitwise_equal"] and rec["loads_sum_ok"] and rec["slot_loads_equal_loads"]
    assert rec["norecord_counts_nothing"]
    assert rec["kernels_added_by_patch"]["kernels"], "the recording's count op is seen by the profiler"
    assert set(rec["instance_aa_pct"]) == {"unpatched", "patched", "norecord"}
    assert "MoE layer forward" in stdout


def test_split_gemm_cost(tmp_path):
    r, stdout = _run("split_gemm_cost.py", tmp_path, "--rounds", "3", "--align", "4", "16")
    kinds = r["kinds"]
    assert list(kinds) == ["unsplit", "split_exact", "split_aligned_4", "split_aligned_16"]
    assert kinds["unsplit"]["groups"] == 8 and kinds["split_exact"]["groups"] == 10  # 2 replica slots
    assert "split_aligned_16" in stdout


def test_slot_copy_bandwidth(tmp_path):
    r, stdout = _run("slot_copy_bandwidth.py", tmp_path)
    assert r["bandwidth"]["copy_bandwidth_GBps"] > 0
    t = r["transfer"]
    modes = [k for k in t if k.startswith(("staged", "direct"))]
    assert len(modes) == 8 and all(t[k]["correct"] for k in modes)
    assert all(t[k]["fraction_of_copy_bandwidth"] > 0 for k in modes)
    for canary in ("canary_sampled", "canary_full"):
        assert t[canary]["clean"] and t[canary]["corruption_caught"]
    assert "transfer direct_streams2" in stdout


def test_rebalance_stall(tmp_path):
    r, stdout = _run("rebalance_stall.py", tmp_path, "--more-canaries", "sampled")
    t = r["train"]
    assert "rebalance_stall_ratio" in r and r["rebalance_stall_ratio"] == t["rebalance_stall_ratio"]
    assert t["canary"] == "off"
    for key in ("permute", "permute_canary_sampled"):
        assert t[key]["rebalances"] >= 1 and "committed" in t[key]["outcomes"]
    assert t["off"]["rebalances"] == 0
    assert t["memory"]["slot_weight_bytes"] > 0 and t["memory"]["redundant_slots_per_rank_per_layer"] == 2
    assert "rebalance_stall_ratio" in stdout


def test_gpu_equivalence_one_file_with_a_run_per_version(tmp_path):
    """The script writes ``gpu_equivalence.json`` (the committed file's name): its run replaces the one of
    its megatron-core version and keeps the others'."""
    other = {"megatron_core": "0.0.0", "passed": True}
    (tmp_path / "gpu_equivalence.json").write_text(json.dumps({"runs": {"0.0.0": other}}))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_equivalence.py"), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["gpu_equivalence.json"]
    r = json.loads((tmp_path / "gpu_equivalence.json").read_text())
    assert r["script"] == "benchmarks/gpu_equivalence.py" and r["passed"]
    assert r["runs"]["0.0.0"] == other and len(r["runs"]) == 2
    (version,) = set(r["runs"]) - {"0.0.0"}
    run = r["runs"][version]
    assert run["megatron_core"] == version and run["passed"]
    assert set(run["cases"]) == {"bfloat16", "float32"}


def test_committed_results_match_the_scripts():
    """Every committed JSON is one a current script writes, under the name it writes."""
    results = REPO / "benchmarks" / "results"
    for name in ("recording_overhead", "slot_copy_bandwidth", "rebalance_stall"):
        r = json.loads((results / f"{name}.json").read_text())
        assert r["script"] == f"benchmarks/{name}.py" and not r["small"]
    assert not (results / "gpu_perf.json").exists()
    equivalence = json.loads((results / "gpu_equivalence.json").read_text())
    assert set(equivalence["runs"]) == {"0.16.1", "0.19.2"} and equivalence["passed"]
