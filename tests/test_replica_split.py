"""megatron_eplb/replica_split.py: per-batch replica shares (the ``balanced`` dispatch's split), pure torch."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_eplb.placement import ExpertPlacement
from megatron_eplb.policy import rebalance
from megatron_eplb.replica_split import (
    BalancedSplit,
    align_bounds,
    balanced_shares,
    best_split_bound,
    copy_bounds,
    even_shares,
    rank_loads_of_shares,
    replica_tables,
    source_offsets,
    water_fill,
)

REAL = Path("/work/shared/data/real_traces")
DEEPSEEK = REAL / "sglang_deepseek_v3"
OLMOE = REAL / "olmoe_routing_output" / "olmoe_mixtral_domain_expert_counts.json"


def _busiest(load: np.ndarray, row: np.ndarray, ranks: int, iterations=None) -> int:
    tables = replica_tables(row, ranks, load.shape[0])
    kw = {} if iterations is None else {"iterations": iterations}
    shares = balanced_shares(torch.as_tensor(load, dtype=torch.int64), tables, **kw)
    return int(rank_loads_of_shares(shares, tables).max())


def test_water_fill_levels_the_lowest_copies():
    levels = torch.tensor([[5, 1, 3], [0, 0, 1 << 50], [2, 2, 2]])
    amount = torch.tensor([5, 3, 4])
    out = water_fill(levels, amount)
    # row 0: raise 1 and 3 to 4 and 4 (3 + 1 tokens) then 1 left; row 1: a missing copy gets nothing
    assert out.sum(1).tolist() == [5, 3, 4]
    assert out[0].tolist() == [0, 3, 2] or out[0].tolist() == [0, 4, 1]
    assert (levels + out)[0, 1:].max() - (levels + out)[0, 1:].min() <= 1
    assert out[1, 2] == 0 and abs(int(out[1, 0] - out[1, 1])) <= 1
    assert out[2].tolist() == [2, 1, 1]  # ties: the remainder goes to the lower copy index


def test_shares_sum_to_counts_and_respect_copies():
    rng = np.random.default_rng(0)
    for _ in range(30):
        ranks, experts = int(rng.choice([2, 4, 8])), 16
        redundant = ranks * int(rng.integers(1, 4))
        plan_load = rng.gamma(0.4, size=(1, experts)) * 1000
        row = rebalance(plan_load, experts + redundant, ranks, policy="greedy").phy2log[0]
        tables = replica_tables(row, ranks, experts)
        load = torch.as_tensor(rng.integers(0, 500, size=experts) * (rng.random(experts) < 0.8))
        shares = balanced_shares(load, tables)
        assert torch.equal(shares.sum(1), load)
        assert (shares >= 0).all()
        assert (shares[tables.copy_rank == ranks] == 0).all()  # nothing on a missing copy
        single = tables.copy_count == 1
        assert torch.equal(shares[single, 0], load[single])
        # deterministic: the same call gives the same tensor
        assert torch.equal(shares, balanced_shares(load.clone(), tables))
        # never worse than the even split
        even = even_shares(load, tables.copy_count, tables.copy_rank.shape[1])
        assert rank_loads_of_shares(shares, tables).max() <= rank_loads_of_shares(even, tables).max()


def test_same_rank_copies_and_empty_layers():
    # two copies of expert 0 on rank 0 (slots per rank > E), one rank, and a layer without replicas
    tables = replica_tables(np.array([0, 1, 0, 1]), 1, 2)
    shares = balanced_shares(torch.tensor([7, 0]), tables)
    assert shares.sum(1).tolist() == [7, 0]
    plain = replica_tables(np.array([1, 0, 2, 3]), 2, 4)
    assert plain.replicated.numel() == 0
    assert balanced_shares(torch.tensor([1, 2, 3, 4]), plain)[:, 0].tolist() == [1, 2, 3, 4]


def test_bounds_route_every_source_pair_to_its_copy_quota():
    """Sources laid end to end: the runs ``[bounds[c-1], bounds[c])`` give copy ``c`` exactly its share."""
    rng = np.random.default_rng(1)
    counts = torch.as_tensor(rng.integers(0, 50, size=(4, 6)))  # [N_src, E]
    row = np.array([0, 1, 2, 0, 3, 1, 4, 5, 0, 2, 5, 3])  # 4 ranks x 3 slots
    tables = replica_tables(row, 4, 6)
    shares = balanced_shares(counts.sum(0), tables)
    bounds, first = copy_bounds(shares), source_offsets(counts)
    got = torch.zeros_like(shares)
    for src in range(4):
        for e in range(6):
            pos = first[src, e] + torch.arange(int(counts[src, e]))
            copy = torch.searchsorted(bounds[e], pos, right=True)
            got[e] += torch.bincount(copy, minlength=shares.shape[1])
    assert torch.equal(got, shares)


@pytest.mark.parametrize("align", [2, 8, 128])
def test_aligned_bounds_cut_at_multiples_and_conserve_tokens(align):
    """``align_bounds``: every cut inside an expert's run is a multiple of ``align``, moved by at most
    ``align / 2``; runs stay consecutive and end at the total; an empty copy stays empty; BalancedSplit(align)
    returns exactly that."""
    rng = np.random.default_rng(align)
    for _ in range(20):
        ranks, experts = 4, 12
        row = np.concatenate([rng.permutation(experts), rng.choice(experts, 4, replace=False)])
        tables = replica_tables(row, ranks, experts)
        load = torch.as_tensor(rng.integers(0, 600, size=experts))
        shares = balanced_shares(load, tables)
        exact = copy_bounds(shares)
        bounds = align_bounds(exact, load, align)
        total = load.view(-1, 1)
        assert bool((bounds <= total).all()) and bool((torch.diff(bounds, dim=1) >= 0).all())
        inside = bounds < total
        assert bool((bounds[inside] % align == 0).all())
        assert bool(((bounds - exact).abs()[inside] <= align // 2).all())
        assert torch.equal(bounds[exact >= total], exact[exact >= total])
        empty = torch.diff(exact, dim=1) == 0
        assert bool((torch.diff(bounds, dim=1)[empty] == 0).all())
        assert torch.equal(BalancedSplit(tables, align=align)(load), bounds)
    assert align_bounds(exact, load, 1) is exact


def _brute_force_best(load: np.ndarray, row: np.ndarray, ranks: int) -> int:
    """Exact integer optimum of the busiest rank by enumeration (tiny cases only)."""
    tables = replica_tables(row, ranks, load.shape[0])
    fixed = np.zeros(ranks, dtype=np.int64)
    choices = []
    for e in range(load.shape[0]):
        r = tables.copy_rank[e, : int(tables.copy_count[e])].numpy()
        if len(r) == 1:
            fixed[r[0]] += load[e]
        else:
            splits = [s for s in itertools.product(range(load[e] + 1), repeat=len(r)) if sum(s) == load[e]]
            choices.append([(r, s) for s in splits])
    best = None
    for combo in itertools.product(*choices):
        rl = fixed.copy()
        for r, s in combo:
            np.add.at(rl, r, s)
        best = rl.max() if best is None else min(best, rl.max())
    return int(best)


def test_exact_bound_brackets_the_brute_force_optimum():
    rng = np.random.default_rng(2)
    row = np.array([0, 1, 2, 0, 3, 1])  # 3 ranks x 2 slots: experts 0 and 1 replicated
    for _ in range(20):
        load = rng.integers(0, 12, size=4)
        lower, upper = best_split_bound(load, row, 3)
        best = _brute_force_best(load, row, 3)
        assert lower - 1e-9 <= best <= np.ceil(upper - 1e-9) + 1
        assert upper - lower <= 1e-6 * max(1, load.sum())
        assert _busiest(load, row, 3) <= np.ceil(lower - 1e-9) + 1  # integer rounding: within one token


def _ratio(load: np.ndarray, placement: ExpertPlacement) -> list[float]:
    """Per layer: the exact bound's busiest rank / the balanced split's (1.0 = as good as the LP)."""
    out = []
    for layer in range(load.shape[0]):
        lower, _ = best_split_bound(load[layer], placement.phy2log[layer], placement.num_ranks)
        busiest = _busiest(load[layer], placement.phy2log[layer], placement.num_ranks)
        out.append(lower / busiest if busiest else 1.0)
    return out


@pytest.mark.parametrize("ranks,experts,redundant", [(4, 16, 4), (8, 64, 8), (8, 64, 16), (8, 64, 64)])
def test_within_two_percent_of_the_bound_on_random_loads(ranks, experts, redundant):
    rng = np.random.default_rng(ranks * 1000 + redundant)
    plan = rebalance(rng.gamma(0.5, size=(8, experts)) * 1000, experts + redundant, ranks, policy="greedy")
    load = (rng.gamma(0.5, size=(8, experts)) * 2000).astype(np.int64)  # another load than planned on
    ratios = _ratio(load, plan)
    assert min(ratios) >= 0.98, ratios


def _deepseek(name: str) -> np.ndarray:
    return np.asarray(json.loads((DEEPSEEK / name).read_text())["logical_count"], dtype=np.float64)[3:]


@pytest.mark.skipif(not DEEPSEEK.is_dir(), reason="real traces not on this machine")
@pytest.mark.parametrize("ranks,redundant", [(8, 8), (32, 32), (16, 64)])
def test_within_two_percent_of_the_bound_on_deepseek_loads(ranks, redundant):
    plan = rebalance(_deepseek("prefill_in512.json"), 256 + redundant, ranks, policy="greedy")
    test = _deepseek("decode_in1000out1000.json")  # another workload than planned on, scaled to a batch
    load = np.round(test / test.sum(1, keepdims=True) * 8192 * 8).astype(np.int64)[::4]
    ratios = _ratio(load, ExpertPlacement(plan.phy2log[::4], ranks, 256, allow_same_rank_copies=True))
    assert min(ratios) >= 0.98, min(ratios)


@pytest.mark.skipif(not OLMOE.is_file(), reason="real traces not on this machine")
def test_within_two_percent_of_the_bound_on_olmoe_domains():
    counts = json.loads(OLMOE.read_text())["models"]["olmoe"]["counts"]
    domains = sorted(counts)
    for plan_on, test_on in zip(domains, domains[1:] + domains[:1]):  # planned on one domain, run on another
        plan = rebalance(np.asarray(counts[plan_on], dtype=np.float64), 72, 8, policy="greedy")
        assert min(_ratio(np.asarray(counts[test_on], dtype=np.int64), plan)) >= 0.98


def test_runs_on_cuda_like_on_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    row = rebalance(np.random.default_rng(3).gamma(0.5, size=(1, 64)) * 1000, 72, 8).phy2log[0]
    load = torch.randint(0, 1000, (64,))
    cpu = balanced_shares(load, replica_tables(row, 8, 64))
    gpu = balanced_shares(load.cuda(), replica_tables(row, 8, 64, "cuda"))
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("device,fused_in_graph", [("cpu", False), ("cuda", False), ("cuda", True)])
def test_balanced_split_replays_what_it_computes(device, fused_in_graph, monkeypatch):
    """``BalancedSplit``: on CUDA the fused kernel (where triton imports: launched directly, or captured in a
    graph) or one captured graph of the torch split, for each new batch; the same bounds as the eager
    functions for every load (a replay never returns a stale or shared output)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from megatron_eplb.replica_split import BalancedSplit

    monkeypatch.setattr(BalancedSplit, "FUSED_IN_GRAPH", fused_in_graph)
    row = rebalance(np.random.default_rng(5).gamma(0.5, size=(1, 64)) * 1000, 72, 8).phy2log[0]
    tables = replica_tables(row, 8, 64, device)
    split = BalancedSplit(tables)
    if device == "cpu":
        assert split.path == "torch"
    gen = torch.Generator().manual_seed(6)
    outs = []
    for _ in range(4):
        load = torch.randint(0, 5000, (64,), generator=gen).to(device)
        outs.append(split(load))
        assert torch.equal(outs[-1], copy_bounds(balanced_shares(load, tables)))
    assert split.path in (("torch",) if device == "cpu" else ("triton", "triton_graph", "graph"))
    assert (split._graph is not None) == (split.path in ("graph", "triton_graph"))
    assert not torch.equal(outs[0], outs[1])
    # A new placement: with tables of the same shapes (seed 9) the same graph replays on the new tables, with
    # other shapes (seed 7: 8 replicated experts instead of 5) a new split.
    for seed, same in ((9, True), (7, False)):
        other = rebalance(np.random.default_rng(seed).gamma(0.5, size=(1, 64)) * 1000, 72, 8).phy2log[0]
        new_tables = replica_tables(other, 8, 64, device)
        moved = split.retarget(new_tables)
        assert (moved is split) == same
        load = torch.randint(0, 5000, (64,), generator=gen).to(device)
        assert torch.equal(moved(load), copy_bounds(balanced_shares(load, new_tables)))


def test_balanced_split_falls_back_when_the_fused_kernel_fails(monkeypatch):
    """A kernel that fails to compile or launch: logged, the graph path for this split and every later one,
    and (capturing fails on CPU here) the eager split: the same bounds either way."""
    from megatron_eplb.replica_split import BalancedSplit

    class Broken:
        @staticmethod
        def balanced_bounds(load, tables, iterations):
            raise RuntimeError("no kernel today")

    monkeypatch.setattr(BalancedSplit, "_fused_failed", False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    row = rebalance(np.random.default_rng(5).gamma(0.5, size=(1, 64)) * 1000, 72, 8).phy2log[0]
    tables = replica_tables(row, 8, 64)
    split = BalancedSplit(tables)
    split.path, split._fused = "triton", Broken()
    load = torch.randint(0, 5000, (64,), generator=torch.Generator().manual_seed(2))
    assert torch.equal(split(load), copy_bounds(balanced_shares(load, tables)))
    assert BalancedSplit._fused_failed and split.path == "torch" and split._fused is None


def test_fused_kernel_sizes_import_without_triton():
    """The fused kernel's module imports without triton (CPU CI); its padded sizes and the one-block limit."""
    from megatron_eplb import replica_split_triton as fused

    cfg = fused.launch_config(30, 3, 5, 3)
    assert (cfg["C_P"], cfg["K_P"], cfg["N_P"]) == (4, 8, 4) and cfg["num_warps"] == 4
    assert fused.launch_config(8, 2, 0, 1)["K_P"] == 2  # K = 0 and N = 1 pad to 2
    assert fused.fits(256, 2, 64, 64) and fused.fits(64, 8, 64, 16) and fused.fits(512, 4, 64, 64)
    assert not fused.fits(512, 4, 128, 64) and not fused.fits(1024, 8, 512, 64)


def test_batched_loads_split_like_one_at_a_time():
    rng = np.random.default_rng(4)
    row = rebalance(rng.gamma(0.5, size=(1, 32)) * 1000, 40, 8, policy="greedy").phy2log[0]
    tables = replica_tables(row, 8, 32)
    loads = torch.as_tensor(rng.integers(0, 800, size=(3, 5, 32)))
    batched = balanced_shares(loads, tables)
    assert batched.shape == (3, 5, 32, tables.copy_rank.shape[1])
    for i in range(3):
        for j in range(5):
            assert torch.equal(batched[i, j], balanced_shares(loads[i, j], tables))
    assert rank_loads_of_shares(batched, tables).shape == (3, 5, 8)
