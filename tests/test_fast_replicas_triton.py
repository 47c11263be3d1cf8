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
from megatron_eplb.fast_replicas import FastPlanner, cross_node_copies, fast_tables, plan_fast_replicas
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


def _chosen(row, ranks: int, experts: int, fast: int, load) -> torch.Tensor:
    tables = fast_tables(np.asarray(row), ranks, experts, fast, DEVICE)
    w = torch.as_tensor(np.asarray(load), dtype=torch.int64, device=DEVICE)
    return plan_fast_replicas(w[None], tables).fast_expert[0]


def test_fused_plan_union_rows():
    """The union split's rows (the K replicated experts, then the spare slots' experts, each once): an expert
    given two spare copies, a persistently replicated expert given a spare copy, no replicated expert (K = 0),
    every expert replicated (K = E); tables without ``replicated`` (derived at launch) alike."""
    # one hot expert spread over three more ranks: chosen three times
    row, load = np.array([0, 1, 2, 3]), [4000, 3, 2, 1]
    assert (_chosen(row, 4, 4, 1, load) == 0).sum() >= 2
    _check(row, 4, 4, 1, [load, [900, 800, 0, 1], [5, 0, 0, 0]])
    assert fast_tables(row, 4, 4, 1).replicated.numel() == 0
    # expert 0 on ranks 0 and 1 (K = 1, then -1 padding), hot: a spare copy on rank 2 or 3 as well
    row = np.array([0, 1, 0, 2, 3, 4, 5, 6])
    load = [6000, 10, 20, 30, 40, 50, 60]
    spare = _chosen(row, 4, 7, 2, load)
    assert (spare == 0).any() and (spare >= 0).sum() >= 2
    assert fast_tables(row, 4, 7, 2).replicated.tolist() == [0]
    _check(row, 4, 7, 2, [load, [0, 900, 900, 0, 0, 0, 1], [3000, 3000, 0, 0, 0, 0, 7]])
    # every expert twice (K = E), hot ones copied again
    row = np.array([0, 1, 2, 3, 1, 0, 3, 2])
    assert fast_tables(row, 4, 4, 1).replicated.tolist() == [0, 1, 2, 3]
    rng = np.random.default_rng(3)
    _check(row, 4, 4, 1, [[5000, 10, 7, 3], [100, 0, 0, 100]] + check_loads(rng, 4)[::3])
    _check(row, 4, 4, 2, [[5000, 4000, 7, 3], [1, 1, 1, 1]])
    # more row positions (K + N * F = 24) than experts (16): repeats and padding past E
    row = random_row(np.random.default_rng([16, 8, 3, 2, 0, 99]), 16, 8, 3, 1)
    _check(row, 8, 16, 2, [[1, 0, 0, 0, 2, 2, 2, 1, 0, 1, 2, 1, 0, 1, 0, 2], check_loads(rng, 16)[4]])
    # a placement with three copies, two replicated experts and single ones; tables without replicated
    row = np.array([0, 1, 0, 2, 0, 3, 1, 4, 5, 6])
    tables = fast_tables(row, 5, 7, 1, DEVICE)
    assert tables.replicated.tolist() == [0, 1, -1]
    bare = tables._replace(replicated=None)
    for load in check_loads(rng, 7):
        w = torch.as_tensor(load, device=DEVICE)
        want = plan_fast_replicas(w[None], tables)
        for got in (fused.plan_fast_replicas_fused(w, tables), fused.plan_fast_replicas_fused(w, bare)):
            assert all(torch.equal(a, b[0]) for a, b in zip(got, want))


def test_fits_and_launch_config():
    # the splits work over K and R = K + N * F rows: E <= 256 (512) at N <= 16 (8) with one copy, or at N <= 8
    # with K <= 16; N >= 16 with C >= 2 or N >= 32 never; K unknown: the most there can be (E)
    assert fused.fits(64, 1, 8, 1) and fused.fits(64, 2, 8, 2, 16) and fused.fits(64, 1, 16, 1)
    assert fused.fits(256, 1, 8, 1) and fused.fits(128, 1, 8, 2) and fused.fits(256, 1, 16, 1)
    assert fused.fits(128, 2, 8, 1, 8) and fused.fits(256, 2, 8, 1, 16) and fused.fits(64, 3, 8, 1, 8)
    assert fused.fits(512, 1, 8, 1) and not fused.fits(64, 2, 8, 2) and not fused.fits(64, 2, 16, 1, 8)
    assert not fused.fits(64, 3, 16, 1) and not fused.fits(256, 1, 32, 1) and not fused.fits(256, 1, 64, 1)
    assert not fused.fits(128, 2, 8, 1) and not fused.fits(256, 2, 16, 1, 16)
    # the row list's positions, repeats included: R_P >= K + N * F even above E
    assert fused.launch_config(16, 3, 8, 2, 8)["R_P"] == 32
    cfg = fused.launch_config(64, 1, 8, 1)
    assert cfg == {"E_P": 64, "C_P": 2, "D_P": 8, "N_P": 8, "F_P": 2, "K_P": 2, "R_P": 8, "num_warps": 4}
    # the warps by the largest tile: 4 to 1024 elements, 8 below 4096, then 16
    assert fused.launch_config(64, 2, 8, 1, 8)["num_warps"] == 16  # [R_P, D_P, D_P] = [16, 16, 16]
    assert fused.launch_config(128, 1, 8, 1)["num_warps"] == 8  # [E_P, C_P, N_P] = [128, 2, 8]
    assert fused.launch_config(16, 1, 4, 1)["num_warps"] == 4
    for shape in [(8, 1, 2, 1), (64, 2, 8, 2, 16), (256, 1, 8, 1), (64, 1, 16, 1)]:
        cfg = fused.launch_config(*shape)
        tile = cfg["R_P"] * cfg["D_P"] * max(cfg["N_P"], cfg["D_P"])
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


def test_fused_plan_with_nodes_and_the_rule_off():
    """Tables of 2 nodes without the cross-node rule (``m = 0``) are the rule-free plan, bitwise."""
    rng = np.random.default_rng(20)
    row = random_row(rng, 16, 4, 5, 0)
    tables = fast_tables(row, 4, 16, 1, DEVICE, num_nodes=2, cross_node_min_gain=0)
    assert not tables.cross_node_rule
    for load in check_loads(rng, 16)[:4]:
        w = torch.as_tensor(np.asarray(load), dtype=torch.int64, device=DEVICE)
        got = fused.plan_fast_replicas_fused(w, tables)
        assert all(torch.equal(a, b[0]) for a, b in zip(got, plan_fast_replicas(w[None], tables)))


@pytest.mark.parametrize(
    "experts,ranks,slots,fast,nodes,m",
    [
        (16, 4, 4, 1, 2, 16),
        (16, 4, 5, 1, 2, 1),
        (16, 8, 2, 1, 2, 64),
        (32, 8, 5, 2, 4, 8),
        (8, 2, 4, 2, 2, 3),
    ],
)
def test_fused_plan_with_the_cross_node_rule(experts, ranks, slots, fast, nodes, m):
    """The cross-node rule in the kernel: bitwise the torch plan on random placements (redundant copies, some
    on one rank) x adversarial loads, on the default placement with skewed loads, and on the hand-made case
    whose copy across nodes is refused below ``m`` and taken above it."""
    rng = np.random.default_rng([experts, ranks, slots, fast, nodes, m])
    row = random_row(rng, experts, ranks, slots)
    tables = fast_tables(row, ranks, experts, fast, DEVICE, num_nodes=nodes, cross_node_min_gain=m)
    assert tables.cross_node_rule
    loads = check_loads(rng, experts)
    gamma = rng.gamma(0.3, size=(4, experts))
    loads += [rng.multinomial(2048, g / g.sum()) for g in gamma]
    default = ExpertPlacement.default(1, experts, ranks, 0).phy2log[0]
    ruled = fast_tables(default, ranks, experts, fast, DEVICE, num_nodes=nodes, cross_node_min_gain=m)
    crossed = []
    for load in loads:
        w = torch.as_tensor(np.asarray(load), dtype=torch.int64, device=DEVICE)
        for tab in (tables, ruled):
            want = plan_fast_replicas(w[None], tab)
            got = fused.plan_fast_replicas_fused(w, tab)
            for name, a, b in zip(want._fields, got, want):
                assert torch.equal(a, b[0]), (
                    f"{name}: m={m} load={np.asarray(load).tolist()} row={row.tolist()}"
                )
            crossed.append(int(cross_node_copies(got.fast_expert, tab)))
    if m <= 16:  # the rule does not refuse everything here
        assert sum(crossed) > 0


def test_fused_plan_hand_made_cross_node_case():
    """EP 4 in 2 nodes, expert r on rank r: expert 0's copy across nodes gains 300 tokens more than inside."""
    load = torch.tensor([1000, 700, 100, 100], device=DEVICE)
    for m, want in ((400, [-1, 0, -1, -1]), (200, [-1, 0, 0, 1]), (0, [2, 0, 0, 1])):
        tables = fast_tables(np.arange(4), 4, 4, 1, DEVICE, num_nodes=2, cross_node_min_gain=m)
        got = fused.plan_fast_replicas_fused(load, tables)
        assert got.fast_expert[:, 0].tolist() == want
        assert all(torch.equal(a, b[0]) for a, b in zip(got, plan_fast_replicas(load[None], tables)))
    ruled = fast_tables(np.arange(4), 4, 4, 1, DEVICE, num_nodes=2, cross_node_min_gain=200)
    assert FastPlanner(ruled)._kernel()[1] is None  # the planner takes the kernel with the rule too
