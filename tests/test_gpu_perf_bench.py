"""benchmarks/gpu_perf.py (issue #7) end to end on CPU (``--small``, one gloo rank): the script runs every
part and its correctness checks hold.  Its timings mean nothing here; the GPU numbers are in docs/gpu_perf.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # a benchmark script in a subprocess


def test_gpu_perf_small_runs_every_part_and_checks_hold(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_perf.py"), "--out", str(tmp_path), "--small"]
    cmd += ["--parts", "bw,record,transfer,train"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_perf.json").read_text())
    for key in (
        "device",
        "torch",
        "megatron_core",
        "recording_overhead_pct",
        "recording_alone_pct",
        "rebalance_stall_ratio",
    ):
        assert key in r
    rec = r["record"]
    assert rec["bitwise_equal"] and rec["loads_sum_ok"] and rec["slot_loads_equal_loads"]
    assert rec["norecord_counts_nothing"]
    assert rec["kernels_added_by_patch"]["kernels"], "the recording's count op is seen by the profiler"
    assert set(rec["instance_aa_pct"]) == {"unpatched", "patched", "norecord"}
    assert all(v["correct"] for k, v in r["transfer"].items() if k.startswith(("staged", "direct")))
    assert r["transfer"]["canary_sampled"]["corruption_caught"]
    permute = r["train"]["permute"]
    assert permute["rebalances"] >= 1 and "committed" in permute["outcomes"]
    assert "MoE layer forward" in proc.stdout
