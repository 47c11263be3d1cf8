"""megatron_eplb/replica_split_triton.py: the fused kernel is bitwise ``copy_bounds(balanced_shares(...))``.

Runs on CUDA, or on CPU through triton's interpreter::

    TRITON_INTERPRET=1 PYTHONPATH=$PWD:/path/to/triton DS_ACCELERATOR=cpu python -m pytest -q \\
        tests/test_replica_split_triton.py

Skipped where triton does not import (CPU CI) or where there is neither CUDA nor the interpreter.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_eplb import replica_split_triton as fused
from megatron_eplb.replica_split import (
    BalancedSplit,
    align_bounds,
    balanced_shares,
    copy_bounds,
    replica_tables,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
# the GPU check (benchmarks/replica_split_bench.py) runs the same cases
from replica_split_bench import CHECK_SHAPES, check_fused, check_loads  # noqa: E402
from replica_split_bench import random_placement as _placement  # noqa: E402

if not fused.available():
    pytest.skip(
        "triton is not importable here (CPU CI): the fused split is not built", allow_module_level=True
    )
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not torch.cuda.is_available() and not _INTERPRET:
    pytest.skip("the fused split needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not _INTERPRET else "cpu")


def _check(row: np.ndarray, ranks: int, experts: int, loads, iterations_list=(8,)) -> int:
    tables = replica_tables(row, ranks, experts, DEVICE)
    checked = 0
    for load in loads:
        w = torch.as_tensor(load, device=DEVICE)
        for iterations in iterations_list:
            want = copy_bounds(balanced_shares(w, tables, iterations))
            got = fused.balanced_bounds(w, tables, iterations)
            assert got.dtype == torch.int64 and got.shape == want.shape
            assert torch.equal(got, want), (
                f"E={experts} N={ranks} K={tables.replicated.numel()} C={tables.copy_rank.shape[1]} "
                f"iterations={iterations} load={load.tolist()} row={row.tolist()}"
            )
            checked += 1
    return checked


@pytest.mark.parametrize("experts,ranks,slots,copies,empty", CHECK_SHAPES)
def test_fused_bounds_equal_the_torch_split(experts, ranks, slots, copies, empty):
    rng = np.random.default_rng(experts * 1000 + ranks * 10 + copies)
    checked = 0
    for _ in range(3):
        row = _placement(rng, experts, ranks, slots, copies, empty)
        checked += _check(row, ranks, experts, check_loads(rng, experts))
    assert checked == 24


def test_fused_bounds_for_other_round_counts():
    # seed 0: 4 of these 128 splits fall back to the even split (worse busiest rank), checked with the others
    rng = np.random.default_rng(0)
    for _ in range(4):
        row = _placement(rng, 24, 4, 8, 4)
        _check(row, 4, 24, check_loads(rng, 24), iterations_list=(0, 1, 2, 3, 16))


def test_fused_bounds_without_replicas_and_with_one_copy_at_most():
    rng = np.random.default_rng(3)
    # K = 0, C = 1: no bounds at all
    row = np.array([1, 0, -1, 2, 3, -1])
    tables = replica_tables(row, 2, 4, DEVICE)
    assert tables.replicated.numel() == 0 and tables.copy_rank.shape[1] == 1
    got = fused.balanced_bounds(torch.tensor([5, 6, 7, 8], device=DEVICE), tables)
    assert got.shape == (4, 0)
    # K = 0 while the tables have C = 2 columns (a retargeted split keeps its shapes): the even split
    tables = replica_tables(np.array([0, 1, 2, 0]), 2, 3, DEVICE)
    empty = tables._replace(
        copy_rank=torch.tensor([[0, 2], [0, 2], [1, 2]], device=DEVICE),
        copy_count=torch.ones(3, dtype=torch.int64, device=DEVICE),
        single_rank=torch.tensor([0, 0, 1], device=DEVICE),
        replicated=torch.zeros(0, dtype=torch.int64, device=DEVICE),
    )
    for load in check_loads(rng, 3):
        w = torch.as_tensor(load, device=DEVICE)
        assert torch.equal(fused.balanced_bounds(w, empty), copy_bounds(balanced_shares(w, empty)))


def test_fused_bounds_on_every_pair_of_small_loads():
    """Exhaustive over small loads on a placement with shared ranks: ties everywhere, many zero steps."""
    row = np.array([0, 1, 2, 0, 1, 3, 2, 1, 0])  # 3 ranks x 3 slots: expert 0 and 1 on every rank
    loads = [np.array([a, b, c, d]) for a in range(0, 7, 2) for b in range(5) for c in (0, 3) for d in (1, 9)]
    _check(row, 3, 4, loads)


@pytest.mark.parametrize("align", [2, 3, 128])
def test_fused_bounds_aligned_equal_the_torch_split(align):
    """The kernel's rounding of the cut points (``align``) is ``align_bounds``'s, bitwise."""
    rng = np.random.default_rng(align)
    for experts, ranks, slots, copies in ((16, 4, 6, 3), (64, 8, 10, 2)):
        row = _placement(rng, experts, ranks, slots, copies)
        tables = replica_tables(row, ranks, experts, DEVICE)
        for load in check_loads(rng, experts):
            w = torch.as_tensor(load, device=DEVICE)
            want = align_bounds(copy_bounds(balanced_shares(w, tables)), w, align)
            assert torch.equal(fused.balanced_bounds(w, tables, align=align), want), (align, load.tolist())


def test_balanced_split_uses_the_kernel_on_cuda():
    if DEVICE.type != "cuda":
        pytest.skip("BalancedSplit launches the kernel on CUDA only")
    rng = np.random.default_rng(11)
    row = _placement(rng, 64, 8, 10, 3)
    tables = replica_tables(row, 8, 64, DEVICE)
    split, aligned = BalancedSplit(tables), BalancedSplit(tables, align=128)
    for load in check_loads(rng, 64):
        w = torch.as_tensor(load, device=DEVICE)
        assert torch.equal(split(w), copy_bounds(balanced_shares(w, tables)))
        assert torch.equal(aligned(w), align_bounds(copy_bounds(balanced_shares(w, tables)), w, 128))
    assert split.path.startswith("triton")  # "triton_graph" (the default) or "triton"


def test_the_gpu_check_passes_here():
    """``benchmarks/replica_split_bench.py``'s check (what ``--device cuda`` runs first) on one seed."""
    rows, bad = check_fused(DEVICE, seeds=1)
    assert rows > 100 and bad == []
