"""megatron_eplb/fast_replicas_triton.py: the fused per-step plan is bitwise ``plan_fast_replicas(load[None], ...)``
in every output (spare experts, union copy ranks and slots, shares).

Runs on CUDA, or on CPU through triton's interpreter::

    TRITON_INTERPRET=1 PYTHONPATH=$PWD:/path/to/triton python -m pytest -q tests/test_fast_replicas_triton.py

Skipped where triton does not import (CPU CI) or where there is neither CUDA nor the interpreter.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_eplb import fast_replicas_triton as fused
from megatron_eplb.fast_replicas import FastPlanner, fast_tables, plan_fast_replicas
from megatron_eplb.placement import ExpertPlacement

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
# the GPU benchmark (benchmarks/fast_replicas_gpu.py) checks the same cases before timing the kernel
from fast_replicas_gpu import CHECK_SHAPES, check_fused_plan, check_loads, random_row  # noqa: E402

if not fused.available():
    pytest.skip(
        "triton is not importable here (CPU CI): the fused plan is not built", allow_module_level=True
    )
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not torch.cuda.is_available() and not _INTERPRET:
    pytest.skip("the fused plan needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not _INTERPRET else "cpu")


def _check(row, ranks: int, experts: int, fast: int, loads, iterations: int = 8) -> int:
    tables = fast_tables(np.asarray(row), ranks, experts, fast, DEVICE)
    for load in loads:
        w = torch.as_tensor(np.asarray(load), dtype=torch.int64, device=DEVICE)
        want = plan_fast_replicas(w[None], tables, iterations)
        got = fused.plan_fast_replicas_fused(w, tables, iterations)
        for name, a, b in zip(want._fields, got, want):
            assert a.dtype == torch.int64 and a.shape == b[0].shape, name
            assert torch.equal(a, b[0]), (
                f"{name}: E={experts} N={ranks} F={fast} iterations={iterations} "
                f"load={np.asarray(load).tolist()} row={np.asarray(row).tolist()}"
            )
    return len(loads)


@pytest.mark.parametrize("experts,ranks,slots,fast,empty", CHECK_SHAPES)
def test_fused_plan_equals_the_torch_plan(experts, ranks, slots, fast, empty):
    """Random persistent placements (redundant copies, some twice on one rank, empty slots) x adversarial loads:
    zeros, one hot expert (1000 and 2**40), one token, two equal hot experts, all equal, ties, skewed, near
    2**40 (the greedy key ``gain * scale`` wraps), large skewed."""
    rng = np.random.default_rng([experts, ranks, slots, fast, 7])
    row = random_row(rng, experts, ranks, slots, empty)
    assert _check(row, ranks, experts, fast, check_loads(rng, experts)) == 10


@pytest.mark.parametrize("experts,ranks,fast,redundant", [(16, 4, 1, 0), (64, 8, 1, 0), (16, 2, 2, 2)])
def test_fused_plan_on_the_default_placement(experts, ranks, fast, redundant):
    """Megatron's placement (no spare choice is ever blocked by a persistent copy: every round may copy)."""
    rng = np.random.default_rng(experts + ranks)
    row = ExpertPlacement.default(1, experts, ranks, redundant).phy2log[0]
    gamma = rng.gamma(0.3, size=(4, experts))
    loads = [rng.multinomial(8192, g / g.sum()) for g in gamma] + check_loads(rng, experts)[1:3]
    _check(row, ranks, experts, fast, loads)


def test_fused_plan_for_other_round_counts():
    rng = np.random.default_rng(1)
    row = random_row(rng, 16, 4, 5, 1)
    loads = check_loads(rng, 16)[::3]
    for iterations in (0, 1, 3):
        _check(row, 4, 16, 2, loads, iterations)


def test_fused_plan_on_every_small_load():
    """A grid of small loads on a placement with a replicated expert: ties everywhere, many zero steps,
    rounds without gain, a spare copy that ends up idle."""
    row = np.array([0, 1, 0, 2, 3, 4])  # 3 ranks x 2 slots: expert 0 on ranks 0 and 1
    loads = [np.array([a, b, c, d, 1]) for a in (0, 8) for b in (0, 5) for c in (0, 6) for d in (1, 4)]
    _check(row, 3, 5, 1, loads)


def test_fused_plan_edge_shapes():
    rng = np.random.default_rng(2)
    # one rank: nowhere to copy to; no spare slot at all; every rank full of one expert's copies
    _check(np.array([0, 1, 2, 3]), 1, 4, 1, check_loads(rng, 4)[::2])
    _check(random_row(rng, 8, 2, 5), 2, 8, 0, check_loads(rng, 8)[::2])
    _check(np.array([0, 0, 1, 2, 0, 0, 3, 4]), 2, 5, 2, check_loads(rng, 5)[::2])


def test_the_gpu_check_passes_here():
    """``benchmarks/fast_replicas_gpu.py``'s check (what it runs on CUDA before timing) on its own seed."""
    shapes = CHECK_SHAPES if DEVICE.type == "cuda" else CHECK_SHAPES[::6]  # the interpreter: two shapes
    plans, bad = check_fused_plan(DEVICE, seeds=1, shapes=shapes)
    assert plans == 10 * len(shapes) and bad == []


def test_fits_and_launch_config():
    # the brief's one-block limit: E <= 64 at N <= 8 with up to 2 persistent copies, or N <= 16 with one;
    # E <= 256 at N <= 8 with one; EP 64 never
    assert fused.fits(64, 1, 8, 1) and fused.fits(64, 2, 8, 2) and fused.fits(64, 1, 16, 1)
    assert fused.fits(256, 1, 8, 1) and fused.fits(128, 1, 8, 2)
    assert not fused.fits(64, 3, 16, 1) and not fused.fits(256, 1, 16, 1) and not fused.fits(256, 1, 64, 1)
    assert not fused.fits(128, 2, 8, 1)
    cfg = fused.launch_config(64, 1, 8, 1)
    assert cfg == {"E_P": 64, "C_P": 2, "D_P": 8, "N_P": 8, "F_P": 2, "num_warps": 8}
    for shape in [(8, 1, 2, 1), (64, 2, 8, 2), (256, 1, 8, 1), (64, 1, 16, 1)]:
        cfg = fused.launch_config(*shape)
        tile = cfg["E_P"] * cfg["D_P"] * max(cfg["N_P"], cfg["D_P"])
        assert tile <= fused.MAX_TILE and fused.fits(*shape)


def test_out_buffer_and_views():
    row = ExpertPlacement.default(1, 8, 2, 0).phy2log[0]
    tables = fast_tables(row, 2, 8, 1, DEVICE)
    w = torch.arange(8, device=DEVICE) * 100
    size = 2 * 1 + 3 * 8 * tables.max_copies
    flat = torch.full((size,), -7, dtype=torch.int64, device=DEVICE)
    plan = fused.plan_fast_replicas_fused(w, tables, out=flat)
    assert plan.shares.data_ptr() == flat[size - 8 * tables.max_copies :].data_ptr()
    want = plan_fast_replicas(w, tables)
    assert all(torch.equal(a, b) for a, b in zip(plan, want))
    assert all(torch.equal(a, b) for a, b in zip(fused.plan_views(flat.clone(), tables), want))
    with pytest.raises(ValueError, match="out must be"):
        fused.plan_fast_replicas_fused(w, tables, out=flat[:-1])
    with pytest.raises(ValueError, match="7 experts, the tables 8"):
        fused.plan_fast_replicas_fused(w[:7], tables)


def test_planner_uses_the_kernel_on_cuda():
    if DEVICE.type != "cuda":
        pytest.skip("FastPlanner launches the kernel on CUDA only")
    rng = np.random.default_rng(11)
    for in_graph in (True, False):
        FastPlanner.FUSED_IN_GRAPH = in_graph
        try:
            row = random_row(rng, 64, 8, 9, 2)
            tables = fast_tables(row, 8, 64, 1, DEVICE)
            planner = FastPlanner(tables)
            assert planner.path == ("triton_graph" if in_graph else "triton")
            for load in check_loads(rng, 64):
                w = torch.as_tensor(load, device=DEVICE)
                assert all(torch.equal(a, b) for a, b in zip(planner(w), plan_fast_replicas(w, tables)))
            graph = FastPlanner(tables, fused=False)
            assert graph.path == "graph"
        finally:
            FastPlanner.FUSED_IN_GRAPH = True


def test_planner_direct_launch_path(monkeypatch):
    """``FastPlanner``'s ``"triton"`` path (one launch per call), forced on this device: the torch plan, and a
    retarget to tables of the same shapes keeps the kernel (they are read in place)."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # a CPU-only torch raises
    rng = np.random.default_rng(5)
    rows = [random_row(rng, 16, 4, 5, 2) for _ in range(2)]
    planner = FastPlanner(fast_tables(rows[0], 4, 16, 1, DEVICE))
    planner.path, planner._fused = "triton", fused  # what __init__ picks on CUDA without FUSED_IN_GRAPH
    w = torch.as_tensor(check_loads(rng, 16)[7], device=DEVICE)
    assert all(torch.equal(a, b) for a, b in zip(planner(w), plan_fast_replicas(w, planner.tables)))
    other = fast_tables(rows[1], 4, 16, 1, DEVICE)
    if other.copy_rank.shape == planner.tables.copy_rank.shape:
        assert planner.retarget(other) is planner and planner.path == "triton"
        assert all(torch.equal(a, b) for a, b in zip(planner(w), plan_fast_replicas(w, other)))
    assert FastPlanner(other, fused=False).path == ("graph" if DEVICE.type == "cuda" else "torch")
