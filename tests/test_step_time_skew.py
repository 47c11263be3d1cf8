"""benchmarks/step_time_skew.py on CPU: 2 gloo ranks through torchrun at tiny sizes (bf16).  The script runs
both expert kinds (SequentialMLP, and the legacy GroupedMLP through megatron-eplb's ``grouped_gemm`` drop-in
over ``torch._grouped_mm``, which runs on CPU in torch 2.13) at forced skew levels, under the default and the
EPLB placement; the measured balancedness falls as the forced skew rises, EPLB undoes it, and every EPLB layer
equals the unpatched one.  Its timings mean nothing here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

pytestmark = pytest.mark.slow  # a benchmark script in a subprocess


def test_step_time_skew_two_gloo_ranks(tmp_path):
    from dist import free_port

    out = tmp_path / "skew.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += [str(REPO / "benchmarks" / "step_time_skew.py"), "--small", "--out", str(out)]
    cmd += ["--ratios", "1.0,1.5,2.0", "--warmup", "1", "--repeats", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["mode"] == "skew" and r["device"] == "cpu"
    for key in ("torch", "megatron_core", "python", "grouped_gemm", "setup", "summary"):
        assert key in r
    rows = r["rows"]
    for kind in ("sequential", "grouped"):
        off = sorted(
            (x for x in rows if x["kind"] == kind and x["placement"] == "default"), key=lambda x: x["level"]
        )
        assert len(off) == 3, f"{kind}: {r.get('grouped_skipped')}"
        bal = [x["balancedness"] for x in off]
        assert all(a > b for a, b in zip(bal, bal[1:])), bal  # more forced skew, less balance
        assert bal[-1] < 0.55  # target 2.0 on EP=2: (nearly) every pair on rank 0
        for x in off:
            assert sum(x["rank_tokens"]) == 2 * r["setup"]["tokens"] * r["setup"]["topk"]
            assert x["median_ms"] > 0 and x["n"] == 2
        fit = r["summary"]["fits"][kind]
        assert fit is not None and {"slope_ms_per_1000_tokens", "intercept_ms"} <= set(fit)
    # Both kinds route identically (same router weights, same input, same bias).
    seq = [x["rank_tokens"] for x in rows if x["kind"] == "sequential" and x["placement"] == "default"]
    grp = [x["rank_tokens"] for x in rows if x["kind"] == "grouped" and x["placement"] == "default"]
    assert seq == grp
    assert r["grouped_gemm"].startswith(("grouped_gemm", "megatron_eplb drop-in"))
    for kind in ("sequential", "grouped"):
        eplb = sorted(
            (x for x in rows if x["kind"] == kind and x["placement"].startswith("eplb")),
            key=lambda x: x["level"],
        )
        assert len(eplb) == 3, kind
        assert eplb[-1]["balancedness"] > 0.9  # EPLB undoes the forced skew
        for x in eplb:  # the patched layer computes what the unpatched one does (bf16)
            assert set(x["equivalence"]) == {"output", "input_grad", "router_grad", "expert_grad"}
            assert max(x["equivalence"].values()) <= 2e-2, (kind, x["equivalence"])
    assert r["equivalence_passed"] is True
    assert len(r["summary"]["eplb_vs_off"]) == 6
    assert "| kind | placement |" in proc.stdout and "equivalence, EPLB vs unpatched" in proc.stdout
