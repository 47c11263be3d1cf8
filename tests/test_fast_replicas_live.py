"""Per-step replicas (``eplb_fast_replicas``, ``patches/megatron/fast_replicas.py``) in real Megatron-core MoE
layers against the unpatched model (gloo, CPU, fp32): outputs and gradients equal, each copy's gradient summed
back into its holder, the spare slots used, and training over many steps with losses equal.

Launches: EP=2, one per expert kind (SequentialMLP, the legacy GroupedMLP): the MoE-stack checks (allgather and
alltoall dispatchers; the default placement and one with persistent replicas), a GPTModel trained 100 steps with
Adam, full activation recompute and the refusals; EP=4 with two spare slots per rank (SequentialMLP); EP=4 as
2 nodes with the cross-node rule (MoE stack and a GPT trained 30 steps).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from dist import run_distributed  # noqa: E402
from models import EXPERT_KINDS, copies_identical, tiny_gpt  # noqa: E402
from test_megatron_patch import (  # noqa: E402
    _compare,
    _hot_spread_placement,
    _init,
    _moe_config,
    _twin_models,
)

RTOL = 1e-5
STEPS = 100
TWO_NODE_STEPS = 30
LR = 1e-3  # Adam; with 1e-2 the last bits of the copies' gradient sums grow to ~1e-5 over 100 steps


def _stack_checks(handle, ref, pat, x, w) -> dict:
    res = _compare(ref, pat, handle, x, w)
    fast = handle.fast
    # Every token computed once: persistent slot loads + spare loads = the routed pairs (over the EP group).
    total = handle.slot_loads().sum() + fast.spare_loads.sum()
    routed = handle.loads().sum()
    both = torch.stack([total, routed]).to(torch.int64)
    torch.distributed.all_reduce(both)
    res["tokens_conserved"] = bool(both[0] == both[1])
    res["fetched"] = fast.fetched
    res["pool_free_after_backward"] = fast.pool.in_use == 0
    return res


def _gpt_training(handle_kw: dict, kind: str, steps: int, rank: int, world: int) -> dict:
    from megatron.core import parallel_state
    from megatron_eplb.patches import megatron as eplb_mcore

    def build():
        return tiny_gpt(world, moe_aux_loss_coeff=0.01, experts=kind, moe_router_topk=2)

    ref, pat = build(), build()
    pat.load_state_dict(ref.state_dict())
    handle = eplb_mcore.apply(pat, **handle_kw)
    dp_group = parallel_state.get_data_parallel_group()
    losses: dict[str, list[float]] = {"ref": [], "pat": []}
    opts = {
        "ref": torch.optim.Adam(ref.parameters(), lr=LR),
        "pat": torch.optim.Adam(pat.parameters(), lr=LR),
    }
    n_opt = {name: len([p for g in o.param_groups for p in g["params"]]) for name, o in opts.items()}
    gen = torch.Generator().manual_seed(300 + rank)
    # skewed tokens: a few token ids much more often, so that some experts are hot
    weights = torch.ones(32)
    weights[:4] = 20.0
    from megatron_eplb.placement import ExpertPlacement

    rng = np.random.default_rng(9)
    moved = ExpertPlacement(np.stack([rng.permutation(8) for _ in range(2)]), world, 8)
    for step in range(steps):
        if step == steps // 3:  # the slow timescale re-places (optimizer state moves); the fast one follows
            handle.set_placement(moved, opts["pat"])
        tokens = torch.multinomial(weights, 16, replacement=True, generator=gen).view(2, 8)
        position_ids = torch.arange(8).expand(2, 8)
        mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril().logical_not()
        for name, model in (("ref", ref), ("pat", pat)):
            opts[name].zero_grad(set_to_none=True)
            loss = model(tokens, position_ids, mask, labels=tokens).mean()
            loss.backward()
            if model is pat:
                handle.sum_replica_grads()
            for p in model.parameters():
                if p.grad is not None and getattr(p, "allreduce", True):
                    torch.distributed.all_reduce(p.grad, group=dp_group)
                    p.grad /= torch.distributed.get_world_size(dp_group)
            opts[name].step()
            losses[name].append(float(loss.detach()))
    return {
        "losses": losses,
        "copies_identical": copies_identical(handle),
        "fetched": handle.fast.fetched,
        "forwards": handle.fast.forwards,
        "optimizer_params": n_opt,
        "memory": handle.fast.memory_report(),
    }


def _checks(rank: int, world: int, kind: str, steps: int) -> dict:
    from megatron_eplb.patches import megatron as eplb_mcore

    _init(world)
    torch.manual_seed(100 + rank)
    x = torch.randn(8, 3, 16)
    w = torch.randn(8, 3, 16)
    results: dict = {}
    for dispatcher in ("allgather", "alltoall"):
        config = _moe_config(dispatcher, topk=2, num_layers=2, kind=kind)
        for name, placement in (
            ("default", None),
            ("hot_spread", _hot_spread_placement(2, world, redundant=2)),
        ):
            ref, pat = _twin_models(config)
            handle = eplb_mcore.apply(pat, placement, fast_replicas=1)
            results[f"{dispatcher}/{name}"] = _stack_checks(handle, ref, pat, x, w)
            with torch.no_grad():  # without autograd the copies die with the forward
                torch.testing.assert_close(pat(x), ref(x), rtol=RTOL, atol=1e-6)
            results[f"{dispatcher}/{name}"]["pool_free_no_grad"] = handle.fast.pool.in_use == 0
    # the copies on a process group of their own (beside the token dispatch on NCCL)
    ref, pat = _twin_models(_moe_config("alltoall", topk=2, num_layers=2, kind=kind))
    handle = eplb_mcore.apply(pat, fast_replicas=1)
    handle.fast.use_separate_group()
    results["alltoall/own_group"] = _stack_checks(handle, ref, pat, x, w)
    results["alltoall/own_group"]["pool_free_no_grad"] = True
    results["train"] = _gpt_training(dict(fast_replicas=1), kind, steps, rank, world)
    results["errors"] = _errors(_moe_config("alltoall", topk=2, num_layers=1, kind=kind))
    results["recompute"] = _recompute(rank, world, kind)
    return results


def _recompute(rank: int, world: int, kind: str) -> dict:
    """A GPT under full activation recompute with per-step replicas against the unpatched model without it: the
    layer's forward runs again in backward (its counts, copies and fetch again, on every rank in the same order);
    loss and gradients equal, loads counted once."""
    from megatron_eplb.patches import megatron as eplb_mcore
    from test_megatron_patch import _rel

    def gpt(**recompute):
        model = tiny_gpt(world, dispatcher="alltoall", experts=kind, **recompute)
        with torch.no_grad():  # the same router on every rank, expert 0 hot
            for name, p in model.named_parameters():
                if name.endswith("router.weight"):
                    torch.distributed.broadcast(p, 0)
                    p[0] += 0.5 * p[1:].mean(0)
        return model

    ref = gpt()
    pat = gpt(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    pat.load_state_dict(ref.state_dict())
    handle = eplb_mcore.apply(pat, fast_replicas=1)
    counts = []
    hooks = [
        layer.router.register_forward_hook(lambda m, i, o: counts.append(o[1].sum(0).to(torch.int64)))
        for _, layer in eplb_mcore.find_moe_layers(ref)
    ]
    gen = torch.Generator().manual_seed(500 + rank)
    tokens = torch.randint(0, 32, (2, 8), generator=gen)
    position_ids = torch.arange(8).expand(2, 8)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril().logical_not()
    losses = []
    for model in (ref, pat):
        loss = model(tokens, position_ids, mask, labels=tokens).mean()
        loss.backward()
        losses.append(loss.detach())
    handle.sum_replica_grads()
    for h in hooks:
        h.remove()
    ref_params = dict(ref.named_parameters())
    dense = [
        (p, ref_params[n]) for n, p in pat.named_parameters() if ".experts." not in n and p.grad is not None
    ]
    tokens_computed = handle.slot_loads().sum() + handle.fast.spare_loads.sum()
    return {
        "loss": _rel(losses[1], losses[0]),
        "dense_grad": max(_rel(a.grad, b.grad) for a, b in dense),
        "loads_match": bool(torch.equal(handle.loads(), torch.stack(counts))),
        "tokens_once": _all_tokens_once(handle, tokens_computed),
        "pool_free": handle.fast.pool.in_use == 0,
        "fetched": handle.fast.fetched,
    }


def _all_tokens_once(handle, computed) -> bool:
    """Over the EP group, the tokens the experts computed (persistent + spare slots) = the pairs routed once."""
    both = torch.stack([computed, handle.loads().sum()]).to(torch.int64)
    torch.distributed.all_reduce(both)
    return bool(both[0] == both[1])


def _errors(config) -> dict:
    """What per-step replicas refuse, before anything changes: the message of each."""
    from megatron_eplb.patches import megatron as eplb_mcore
    from megatron_eplb.patches.megatron.apply import _check_fast
    from megatron_eplb.patches.megatron.compat import EPLBPatchError

    from megatron_eplb.config import EPLBConfig

    out = {}
    _, pat = _twin_models(config)
    experts = pat.layers[0].experts
    cases = {
        "dispatch": lambda: eplb_mcore.apply(pat, fast_replicas=1, replica_dispatch="even"),
        "expert_class": lambda: _check_fast(
            [("layers.0", _Layer(torch.nn.Linear(2, 2), config))], "balanced"
        ),
    }
    for name, fn in cases.items():
        try:
            fn()
            out[name] = None
        except EPLBPatchError as exc:
            out[name] = str(exc)
    pat.layers[0].config.gradient_accumulation_fusion = True
    try:
        eplb_mcore.apply(pat, config=EPLBConfig(eplb_fast_replicas=True))
        out["fusion"] = None
    except EPLBPatchError as exc:
        out["fusion"] = str(exc)
    pat.layers[0].config.gradient_accumulation_fusion = False
    out["unchanged"] = (
        pat.layers[0].experts is experts and getattr(pat, "_megatron_eplb_handle", None) is None
    )
    return out


class _Layer:
    def __init__(self, experts, config) -> None:
        self.experts, self.config = experts, config


@pytest.mark.slow
@pytest.mark.parametrize("kind", EXPERT_KINDS)
def test_fast_replicas_equal_unpatched_and_sum_gradients_back(kind):
    results = run_distributed(_checks, 2, kind, STEPS, timeout=900)
    recompute_fetched = []
    for rank, res in enumerate(results):
        rec = res.pop("recompute")
        recompute_fetched.append(rec["fetched"])
        assert rec["loss"] <= RTOL and rec["dense_grad"] <= RTOL, rec
        assert rec["loads_match"] and rec["tokens_once"] and rec["pool_free"], rec
        errors = res.pop("errors")
        assert "use 'balanced'" in errors["dispatch"], errors
        assert "expert class Linear" in errors["expert_class"], errors
        assert "supported: SequentialMLP, GroupedMLP" in errors["expert_class"], errors
        assert "gradient_accumulation_fusion=False" in errors["fusion"], errors
        assert errors["unchanged"], errors
        train = res.pop("train")
        assert train["fetched"] > 0
        for name, r in res.items():
            where = f"rank {rank} {kind} {name}"
            for key in ("out", "loss", "x_grad", "router_grad", "expert_grad"):
                assert r[key] <= RTOL, f"{where}: {key} differs by {r[key]:.2e}"
            assert r["loads_match"], where
            assert r["tokens_conserved"], where
            assert r["pool_free_after_backward"] and r["pool_free_no_grad"], where
        ref, pat = np.array(train["losses"]["ref"]), np.array(train["losses"]["pat"])
        assert len(pat) == STEPS
        np.testing.assert_allclose(pat, ref, rtol=RTOL)
        assert train["copies_identical"]
        assert train["optimizer_params"]["pat"] == train["optimizer_params"]["ref"]  # copies own no state
    assert sum(recompute_fetched) > 0  # the recompute case used its spare slots
    # The spare slots were really used (so the equal expert gradients above include copies' gradients summed
    # back into their holders): on the default placement a copy computed tokens on some rank, in every case.
    for case in ("allgather/default", "alltoall/default", "alltoall/own_group"):
        assert sum(res[case]["fetched"] for res in results) > 0, case


def _ep4_checks(rank: int, world: int, budget: int) -> dict:
    from megatron_eplb.patches import megatron as eplb_mcore
    from test_megatron_patch import _random_placement

    from megatron_eplb.config import EPLBConfig

    _init(world)
    torch.manual_seed(100 + rank)
    x = torch.randn(16, 3, 16)
    w = torch.randn(16, 3, 16)
    out = {}
    for dispatcher in ("alltoall", "allgather"):
        config = _moe_config(dispatcher, topk=4, num_layers=2)
        replicas = _random_placement(np.random.default_rng(3), 2, world, 4)
        placements = {"default": (None, 1), "replicas": (replicas, 1), "replicas_align2": (replicas, 2)}
        for name, (placement, align) in placements.items():
            ref, pat = _twin_models(config)
            cfg = EPLBConfig(eplb_split_align=align)  # cut points at even positions: the same math
            handle = eplb_mcore.apply(pat, placement, cfg, fast_replicas=budget)
            out[f"{dispatcher}/{name}"] = _stack_checks(handle, ref, pat, x, w)
    return out


@pytest.mark.slow
def test_fast_replicas_ep4_two_spare_slots():
    """EP 4, top-4, two spare slots per rank, with and without persistent replicas (SequentialMLP)."""
    results = run_distributed(_ep4_checks, 4, 2, timeout=900)
    for rank, res in enumerate(results):
        for name, r in res.items():
            for key in ("out", "loss", "x_grad", "router_grad", "expert_grad"):
                assert r[key] <= RTOL, f"rank {rank} {name}: {key} differs by {r[key]:.2e}"
            assert r["loads_match"] and r["tokens_conserved"] and r["pool_free_after_backward"], (rank, name)
    assert all(sum(res[name]["fetched"] for res in results) > 0 for name in results[0])


def _two_node_checks(rank: int, world: int) -> dict:
    """EP 4 as 2 nodes of 2 ranks (``eplb_num_nodes``), one spare slot per rank, through ``apply``'s config:
    copies anywhere (``eplb_fast_cross_node_min_tokens = 0``), the cross-node rule at a few tokens, and at more
    tokens than a step has (no copy crosses the nodes)."""
    from megatron_eplb.patches import megatron as eplb_mcore

    from megatron_eplb.config import EPLBConfig

    _init(world)
    torch.manual_seed(100 + rank)
    x = torch.randn(16, 3, 16)
    w = torch.randn(16, 3, 16)
    out = {}
    for m in (0, 8, 10**6):
        config = EPLBConfig(eplb_fast_replicas=True, eplb_num_nodes=2, eplb_fast_cross_node_min_tokens=m)
        ref, pat = _twin_models(_moe_config("alltoall", topk=4, num_layers=2))
        handle = eplb_mcore.apply(pat, config=config)
        res = _stack_checks(handle, ref, pat, x, w)
        fast = handle.fast
        mine = torch.tensor([fast.fetched_cross_node])
        torch.distributed.all_reduce(mine)
        res["group_cross_node"] = fast.group_cross_node  # the same count on every rank
        res["sum_of_ranks_cross_node"] = int(mine)
        res["rule"] = (fast.num_nodes, fast.cross_node_min_tokens, fast.planner(0).tables.cross_node_rule)
        out[m] = res
    # a GPT trained with the rule on (re-placed by the slow timescale at a third: the tables retargeted)
    config = EPLBConfig(eplb_fast_replicas=True, eplb_num_nodes=2, eplb_fast_cross_node_min_tokens=4)
    out["train"] = _gpt_training(dict(config=config), "sequential", TWO_NODE_STEPS, rank, world)
    return out


@pytest.mark.slow
def test_fast_replicas_two_nodes_cross_node_rule():
    """With the cross-node rule the outputs and gradients still equal the unpatched model's, the tokens are
    computed once, and the copies across nodes are counted (each rank its own, their sum the group's); a GPT
    trained with it has the unpatched model's losses."""
    results = run_distributed(_two_node_checks, 4, timeout=900)
    fetched = []
    for rank, res in enumerate(results):
        train = res.pop("train")
        np.testing.assert_allclose(train["losses"]["pat"], train["losses"]["ref"], rtol=RTOL)
        assert len(train["losses"]["pat"]) == TWO_NODE_STEPS and train["copies_identical"]
        assert train["optimizer_params"]["pat"] == train["optimizer_params"]["ref"]
        fetched.append(train["fetched"])
        for m, r in res.items():
            for key in ("out", "loss", "x_grad", "router_grad", "expert_grad"):
                assert r[key] <= RTOL, f"rank {rank} m={m}: {key} differs by {r[key]:.2e}"
            assert r["loads_match"] and r["tokens_conserved"] and r["pool_free_after_backward"], (rank, m)
            assert r["group_cross_node"] == r["sum_of_ranks_cross_node"] == results[0][m]["group_cross_node"]
        assert res[0]["rule"] == (2, 0, False) and res[8]["rule"] == (2, 8, True)
    first = results[0]
    print({m: (r["group_cross_node"], sum(x[m]["fetched"] for x in results)) for m, r in first.items()})
    assert first[0]["group_cross_node"] > 0  # without the rule some copies cross the nodes (measured 4 of 6)
    assert first[8]["group_cross_node"] < first[0]["group_cross_node"]  # fewer with it (1 of 4)
    assert first[10**6]["group_cross_node"] == 0  # none pays for more tokens than the step has
    assert sum(r[10**6]["fetched"] for r in results) > 0  # the in-node copies are still taken
    assert sum(fetched) > 0  # the GPT's spare slots were used
