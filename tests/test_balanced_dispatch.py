"""The ``balanced`` replica dispatch (per-batch shares) in real Megatron-core MoE layers, against the unpatched
model: outputs and gradients equal, every slot computes exactly its share of this batch, the busiest rank is
never heavier than under the even split, activation recompute counts once.

Launches (gloo, CPU, fp32): EP=2 (allgather and alltoall, top-2, + GPT under recompute), EP=4 (alltoall, top-4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from dist import run_distributed  # noqa: E402
from test_megatron_patch import (  # noqa: E402
    _compare,
    _hot_spread_placement,
    _init,
    _moe_config,
    _random_placement,
    _twin_models,
)

from megatron_eplb.config import EPLBConfig  # noqa: E402
from megatron_eplb.replica_split import (  # noqa: E402
    align_bounds,
    balanced_shares,
    copy_bounds,
    rank_loads_of_shares,
    replica_tables,
)

H = 16
RTOL = 1e-6


def _aligned(shares: torch.Tensor, load: torch.Tensor, align: int) -> torch.Tensor:
    """``[E, C]`` shares whose cut points are ``align_bounds`` of theirs."""
    bounds = align_bounds(copy_bounds(shares), load, align)
    ends = torch.cat([bounds, load.view(-1, 1)], dim=1)
    return torch.diff(ends, dim=1, prepend=torch.zeros_like(ends[:, :1]))


def _split_checks(handle, align: int = 1) -> dict:
    """After one forward: the slot counts equal the shares computed from the batch's global counts (their cut
    points rounded to ``align``), and the busiest rank is no heavier than under the even split (collective)."""
    loads = handle.loads().clone()
    torch.distributed.all_reduce(loads)  # [L, E] this batch's global counts
    slot = handle.slot_loads().clone()
    parts = [torch.empty_like(slot) for _ in range(handle.ep_size)]
    torch.distributed.all_gather(parts, slot)
    per_slot = torch.cat(parts, dim=1)  # [L, P]
    exact, not_worse, gain = True, True, 0
    for layer in range(handle.num_layers):
        row = handle.placement.phy2log[layer]
        tables = replica_tables(row, handle.ep_size, handle.num_experts)
        shares = balanced_shares(loads[layer], tables)
        if align > 1:
            shares = _aligned(shares, loads[layer], align)
            cuts = copy_bounds(shares)
            exact &= bool(((cuts % align == 0) | (cuts == loads[layer].view(-1, 1))).all())
        expected = torch.zeros(handle.num_slots, dtype=torch.int64)
        log2phy = torch.from_numpy(handle.placement.log2phy[layer].copy())
        valid = log2phy >= 0
        expected[log2phy[valid]] = shares[valid]
        exact &= bool(torch.equal(expected, per_slot[layer]))
        even = balanced_shares(loads[layer], tables, iterations=0)
        busiest = int(rank_loads_of_shares(shares, tables).max())
        busiest_even = int(rank_loads_of_shares(even, tables).max())
        not_worse &= align > 1 or busiest <= busiest_even
        gain += busiest_even - busiest
    return {"shares_exact": exact, "not_worse_than_even": not_worse, "busiest_rank_gain": gain}


def _recompute(rank: int, world: int) -> dict:
    """A GPT with full activation recompute, patched with replicas and the balanced dispatch, against the
    unpatched model without recompute: loss, dense grads, and loads counted once."""
    from megatron_eplb.patches import megatron as eplb_mcore
    from test_megatron_dist_ckpt import _batch, _gpt, _placement, _rel

    ref = _gpt(0, world)
    pat = _gpt(0, world, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    pat.load_state_dict(ref.state_dict())
    handle = eplb_mcore.apply(pat, _placement(9, world, redundant=2), replica_dispatch="balanced")
    ref_counts, pat_calls = [], []
    hooks = [
        layer.router.register_forward_hook(lambda m, i, o: ref_counts.append(o[1].sum(0).to(torch.int64)))
        for _, layer in eplb_mcore.find_moe_layers(ref)
    ] + [
        layer.router.register_forward_hook(lambda m, i, o: pat_calls.append(1))
        for _, layer in eplb_mcore.find_moe_layers(pat)
    ]
    tokens, position_ids, mask = _batch(rank)
    losses = []
    for model in (ref, pat):
        loss = model(tokens, position_ids, mask, labels=tokens).mean()
        loss.backward()
        losses.append(loss.detach())
    handle.sum_replica_grads()
    for h in hooks:
        h.remove()
    ref_params = dict(ref.named_parameters())
    return {
        "loss": _rel(losses[1], losses[0]),
        "dense_grad": max(
            _rel(p.grad, ref_params[name].grad)
            for name, p in pat.named_parameters()
            if ".experts." not in name and p.grad is not None
        ),
        "loads_match": bool(torch.equal(handle.loads(), torch.stack(ref_counts))),
        "router_calls": len(pat_calls),  # 2 per MoE layer: the forward and its re-run in backward
    }


def _checks(rank: int, world: int, topk: int, dispatchers: tuple[str, ...], recompute: bool) -> dict:
    from megatron_eplb.patches import megatron as eplb_mcore

    _init(world)
    torch.manual_seed(100 + rank)
    x = torch.randn(8, 3, H)
    w = torch.randn(8, 3, H)
    rng = np.random.default_rng(21)
    results: dict = {}
    for dispatcher in dispatchers:
        config = _moe_config(dispatcher, topk=topk, num_layers=2)
        placements = {
            "hot_spread": (_hot_spread_placement(2, world, redundant=4), 1),
            "random_replicas": (_random_placement(rng, 2, world, redundant=4), 1),
            "hot_spread_align4": (_hot_spread_placement(2, world, redundant=4), 4),
            "default": (None, 1),
        }
        for name, (placement, align) in placements.items():
            ref, pat = _twin_models(config)
            cfg = EPLBConfig(eplb_split_align=align)
            handle = eplb_mcore.apply(pat, placement, cfg, replica_dispatch="balanced")
            assert handle.split_align == align
            res = _compare(ref, pat, handle, x, w)
            handle.reset_loads()
            with torch.no_grad():
                pat(x)
            res.update(_split_checks(handle, align))
            results[f"{dispatcher}/{name}"] = res
    if recompute:
        results["recompute_full"] = _recompute(rank, world)
    return results


def _assert_equivalent(res: dict, where: str) -> None:
    for key in ("out", "loss", "x_grad", "router_grad", "expert_grad"):
        assert res[key] <= RTOL, f"{where}: {key} differs by {res[key]:.2e}"
    assert res["loads_match"], f"{where}: loads() != router top-k counts"
    assert res["slot_loads_match"], f"{where}: slot_loads() mapped through phy2log != logical loads"
    assert res["shares_exact"], f"{where}: slot counts differ from the balanced shares"
    assert res["not_worse_than_even"], f"{where}: busiest rank heavier than under the even split"


@pytest.mark.slow
def test_balanced_dispatch_ep2_allgather_alltoall_and_recompute():
    results = run_distributed(_checks, 2, 2, ("allgather", "alltoall"), True, timeout=400)
    # the split matters: somewhere the busiest rank is lighter than under the even split
    assert sum(r.get("busiest_rank_gain", 0) for r in results[0].values()) > 0
    for rank, res in enumerate(results):
        for name, r in res.items():
            if name.startswith("recompute"):
                assert r["loss"] <= RTOL and r["dense_grad"] <= 1e-5, (rank, name, r)
                assert r["loads_match"], (rank, name)
                assert r["router_calls"] == 4, (
                    rank,
                    name,
                    r["router_calls"],
                )  # 2 MoE layers, forward + re-run
            else:
                _assert_equivalent(r, f"rank {rank} {name}")


@pytest.mark.slow
def test_balanced_dispatch_ep4_alltoall_top4():
    results = run_distributed(_checks, 4, 4, ("alltoall",), False, timeout=400)
    assert sum(r["busiest_rank_gain"] for r in results[0].values()) > 0
    for rank, res in enumerate(results):
        for name, r in res.items():
            _assert_equivalent(r, f"rank {rank} {name}")
