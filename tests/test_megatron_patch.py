"""Placement-aware Megatron-core MoE (``megatron_eplb.patches.megatron``) against the unpatched model.

Each multi-process launch (gloo, CPU, fp32) runs many checks and returns their results; the tests
assert on them.  Launches, per expert kind (``SequentialMLP``, the legacy ``GroupedMLP``): EP=2 (allgather,
top-2, 3 MoE layers, + error cases + checkpoint save), EP=4 (alltoall, top-4, checkpoint saved at EP=2
loaded at EP=4), GPTModel training at EP=2.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from dist import run_distributed  # noqa: E402
from models import (  # noqa: E402
    EXPERT_KINDS,
    copies_identical,
    expert_kind_config,
    fp32_grouped,
    local_expert_tensors,
    tiny_gpt,
)

from megatron_eplb import checkpoint as ckpt  # noqa: E402
from megatron_eplb.load_recorder import MAX_PENDING_SLOT_COUNTS  # noqa: E402
from megatron_eplb.placement import ExpertPlacement  # noqa: E402
from megatron_eplb.protocols import ExpertModel  # noqa: E402

E = 8  # logical experts
H = 16  # hidden size
RTOL = 1e-5


# ====================================================================== helpers run in every rank


def _init(ep: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron_eplb.patches import megatron as eplb_mcore

    eplb_mcore.enable_cpu()
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(1234)


def _moe_config(dispatcher: str, topk: int, num_layers: int = 3, kind: str = "sequential"):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=H,
        num_attention_heads=2,
        num_moe_experts=E,
        moe_router_topk=topk,
        moe_ffn_hidden_size=8,
        ffn_hidden_size=8,
        moe_token_dispatcher_type=dispatcher,
        use_cpu_initialization=True,
        add_bias_linear=False,
        moe_aux_loss_coeff=0.0,
        **expert_kind_config(kind),
    )


class _MoEStack(torch.nn.Module):
    """``num_layers`` MoE layers with residuals (the smallest model holding several MoELayers)."""

    def __init__(self, config):
        super().__init__()
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
        from megatron.core.transformer.spec_utils import build_module

        spec = get_moe_module_spec(use_te=False, num_experts=E, moe_grouped_gemm=config.moe_grouped_gemm)
        self.layers = torch.nn.ModuleList(
            [build_module(spec, config=config) for _ in range(config.num_layers)]
        )
        fp32_grouped(self)

    def forward(self, x):
        for layer in self.layers:
            y, _ = layer(x)
            x = x + y
        return x


def _twin_models(config):
    """An unpatched model and an identical one to patch."""
    torch.manual_seed(0)
    ref = _MoEStack(config)
    # Same router on every rank (as after data-parallel sync), and a hot expert 0 so replicas matter.
    with torch.no_grad():
        for layer in ref.layers:
            torch.distributed.broadcast(layer.router.weight, 0)
            layer.router.weight[0] += 0.5 * layer.router.weight[1:].mean(0)
    pat = _MoEStack(config)
    pat.load_state_dict(ref.state_dict())
    return ref, pat


def _random_placement(rng, num_layers: int, ep: int, redundant: int) -> ExpertPlacement:
    """Random placement with ``redundant`` replicas, no two copies of an expert on one rank."""
    rows = []
    for _ in range(num_layers):
        while True:
            extra = rng.choice(E, size=redundant, replace=redundant > E)
            row = rng.permutation(np.concatenate([np.arange(E), extra]))
            per_rank = row.reshape(ep, -1)
            if all(len(set(r)) == len(r) for r in per_rank):
                rows.append(row)
                break
    return ExpertPlacement(np.stack(rows), ep, E)


def _hot_spread_placement(num_layers: int, ep: int, redundant: int) -> ExpertPlacement:
    """Expert 0 (the hottest) with a copy on every rank, the others spread, extra copies of 1, 2, ..."""
    slots = (E + redundant) // ep
    ranks = [[0] for _ in range(ep)]
    pool = list(range(1, E)) + [1 + i % (E - 1) for i in range(ep * slots - ep - (E - 1))]
    for expert in pool:
        free = [r for r in range(ep) if len(ranks[r]) < slots and expert not in ranks[r]]
        ranks[min(free, key=lambda r: len(ranks[r]))].append(expert)
    return ExpertPlacement(np.tile(np.concatenate(ranks), (num_layers, 1)), ep, E)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _expert_grads_logical(model) -> list[torch.Tensor]:
    """``[L]`` of ``[E, n]`` expert gradients of the unpatched model (gathered, logical order)."""
    out = []
    for layer in model.layers:
        local = local_expert_tensors(layer.experts, lambda p: p.grad)
        parts = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, local)
        out.append(torch.cat(parts))
    return out


def _compare(ref, pat, handle, x, w) -> dict:
    """Forward+backward both models on ``x``; the relative errors and recorded load checks."""
    router_counts = []
    hooks = [
        layer.router.register_forward_hook(lambda m, i, o: router_counts.append(o[1].sum(0).to(torch.int64)))
        for layer in ref.layers
    ]
    handle.reset_loads()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref.zero_grad(set_to_none=True)
    pat.zero_grad(set_to_none=True)
    out1, out2 = ref(x1), pat(x2)
    loss1, loss2 = (out1 * w).square().sum(), (out2 * w).square().sum()
    loss1.backward()
    loss2.backward()
    for h in hooks:
        h.remove()
    handle.sum_replica_grads()
    res = {
        "out": _rel(out2, out1),
        "loss": _rel(loss2.detach(), loss1.detach()),
        "x_grad": _rel(x2.grad, x1.grad),
        "router_grad": max(
            _rel(b.router.weight.grad, a.router.weight.grad) for a, b in zip(ref.layers, pat.layers)
        ),
    }
    # Expert gradients: every copy holds the logical expert's gradient of the unpatched model.
    logical = _expert_grads_logical(ref)
    worst = 0.0
    for layer in range(handle.num_layers):
        for k, slot in enumerate(handle.local_slots()):
            e = int(handle.placement.phy2log[layer, slot])
            g = torch.cat([sp.of(sp.param.grad).reshape(-1) for sp in handle.slot_params(layer, k)])
            worst = max(worst, _rel(g, logical[layer][e]))
    res["expert_grad"] = worst
    # Recording: loads equal the router's top-k count; slot loads map back to all ranks' logical counts.
    loads = handle.loads().clone()
    res["loads_match"] = bool(torch.equal(loads, torch.stack(router_counts)))
    all_loads = loads.clone()
    torch.distributed.all_reduce(all_loads)
    slot_loads = handle.slot_loads().clone()
    parts = [torch.empty_like(slot_loads) for _ in range(handle.ep_size)]
    torch.distributed.all_gather(parts, slot_loads)
    gathered = torch.cat(parts, dim=1)  # [L, P]
    mapped = torch.zeros_like(all_loads)
    phy2log = torch.tensor(handle.placement.phy2log)
    mapped.scatter_add_(1, phy2log, gathered)
    res["slot_loads_match"] = bool(torch.equal(mapped, all_loads))
    spread = 0
    for layer in range(handle.num_layers):
        for e in range(E):
            copies = gathered[layer, phy2log[layer] == e]
            spread = max(spread, int(copies.max() - copies.min()))
    res["copy_spread"] = spread
    return res


def _expect_error(fn, *words) -> str:
    from megatron_eplb.patches.megatron import EPLBPatchError

    try:
        fn()
    except EPLBPatchError as exc:
        msg = str(exc)
        missing = [w for w in words if w not in msg]
        return f"missing {missing} in: {msg}" if missing else "ok"
    return "no error raised"


# ====================================================================== launches


def _ep2_checks(rank: int, world: int, out_dir: str, kind: str) -> dict:
    from megatron_eplb.patches import megatron as eplb_mcore

    _init(world)
    config = _moe_config("allgather", topk=2, kind=kind)
    num_layers = config.num_layers
    rng = np.random.default_rng(7)
    results: dict = {}
    torch.manual_seed(100 + rank)
    x = torch.randn(8, 3, H)
    w = torch.randn(8, 3, H)

    # --- errors before anything changes
    errs = {}
    ref, pat = _twin_models(config)
    before = [id(layer.experts) for layer in pat.layers]
    errs["layers"] = _expect_error(
        lambda: eplb_mcore.apply(pat, ExpertPlacement.default(2, E, world)), "2 MoE layers", "3"
    )
    errs["experts"] = _expect_error(
        lambda: eplb_mcore.apply(pat, ExpertPlacement.default(num_layers, 6, world)), "6 logical experts"
    )
    errs["ranks"] = _expect_error(
        lambda: eplb_mcore.apply(pat, ExpertPlacement.default(num_layers, E, 4)), "4 ranks"
    )
    errs["no_moe"] = _expect_error(
        lambda: eplb_mcore.apply(torch.nn.Linear(2, 2)), "no Megatron-core MoELayer"
    )
    real = pat.layers[1].experts
    pat.layers[1].experts = torch.nn.Identity()
    errs["expert_class"] = _expect_error(
        lambda: eplb_mcore.apply(pat), "Identity", "GroupedMLP, SequentialMLP"
    )
    pat.layers[1].experts = real
    errs["dispatch"] = _expect_error(
        lambda: eplb_mcore.apply(pat, replica_dispatch="nearest"), "even", "local_first"
    )
    errs["unchanged"] = "ok" if before == [id(layer.experts) for layer in pat.layers] else "model changed"

    # --- default placement, then random with replicas, then hot experts spread, via set_placement
    handle = eplb_mcore.apply(pat)
    errs["twice"] = _expect_error(lambda: eplb_mcore.apply(pat), "already")
    results["is_expert_model"] = isinstance(handle, ExpertModel)
    results["default"] = _compare(ref, pat, handle, x, w)
    params_before = [id(p) for p in pat.parameters()]
    placements = {
        "random_replicas": _random_placement(rng, num_layers, world, redundant=4),
        "hot_spread": _hot_spread_placement(num_layers, world, redundant=4),
    }
    errs["slots_per_rank"] = _expect_error(
        lambda: handle.set_placement(_random_placement(rng, num_layers, world, redundant=2)), "slots per rank"
    )
    errs["same_params"] = "ok"
    # A fresh handle for P = 12 slots (the slot count is fixed at apply).
    ref, pat = _twin_models(config)
    handle = eplb_mcore.apply(
        pat, placements["random_replicas"], replica_dispatch="even"
    )  # copy_spread below
    params_before = [id(p) for p in pat.parameters()]
    for name, placement in placements.items():
        handle.set_placement(placement)
        results[name] = _compare(ref, pat, handle, x, w)
        results[name]["copies_identical"] = copies_identical(handle)
    if params_before != [id(p) for p in pat.parameters()]:
        errs["same_params"] = "set_placement re-created parameters"
    # local_first: same math, more pairs stay on their rank
    ref_lf, pat_lf = _twin_models(config)
    handle_lf = eplb_mcore.apply(pat_lf, placements["hot_spread"], replica_dispatch="local_first")
    results["local_first"] = _compare(ref_lf, pat_lf, handle_lf, x, w)

    # --- commit_layer: a mover filled the slots of layer 1 for a new row, then commits it
    row = placements["random_replicas"].phy2log[1]
    from megatron_eplb.slot_copies import gather_logical

    logical = gather_logical(handle, 1)
    for k, slot in enumerate(handle.local_slots()):
        handle.write_slot(1, k, handle._unflatten(logical[int(row[slot])]))
    handle.commit_layer(1, row)
    results["commit_layer"] = _compare(ref, pat, handle, x, w)
    errs["commit_bad_row"] = _expect_error(lambda: handle.commit_layer(0, row[:-1]), "slots")

    # --- recording switched off counts nothing; forwards never read keep a bounded number of slot counts
    handle.reset_loads()
    handle.recording = False
    with torch.no_grad():
        pat(x)
    results["recording_off_counted"] = int(handle.loads().sum()) + int(handle.slot_loads().sum())
    handle.recording = True
    forwards = MAX_PENDING_SLOT_COUNTS + 3
    with torch.no_grad():
        for _ in range(forwards):
            pat(x)
    results["pending_kept_max"] = max(len(p) for p in handle._recorder.slot_pending)
    slot_total = handle.slot_loads().sum(dim=1)
    torch.distributed.all_reduce(slot_total)
    pairs = x.shape[0] * x.shape[1] * config.moe_router_topk * forwards  # per rank and layer
    results["loads_after_many"] = handle.loads().sum(dim=1).tolist() == [pairs] * num_layers
    results["slot_loads_after_many"] = slot_total.tolist() == [pairs * world] * num_layers
    handle.reset_loads()

    # --- logical checkpoint: save with one placement, load into another placement
    sd = handle.logical_state_dict()
    results["ckpt_keys"] = {
        k: None if v is None else list(v.shape) for k, v in sd.items() if k.startswith("layers.0.experts.")
    }
    # the unpatched model's own experts (Megatron's layout: expert r * E / EP + k on rank r) are the logical
    # checkpoint's, read independently of the patch
    ref_experts = [local_expert_tensors(layer.experts) for layer in ref.layers]
    results["ckpt_matches_ref"] = all(
        torch.equal(
            local_expert_tensors(layer.experts),
            ref_experts[i],
        )
        for i, layer in enumerate(_unpatched_from_logical(config, sd).layers)
    )
    _, other = _twin_models(config)
    with torch.no_grad():  # scramble, so the load must fill everything
        for p in other.parameters():
            p.normal_()
    handle2 = eplb_mcore.apply(
        other, _random_placement(np.random.default_rng(3), num_layers, world, redundant=2)
    )
    handle2.load_logical_state_dict(sd)
    results["ckpt_reload"] = _compare(ref, other, handle2, x, w)
    if rank == 0:
        torch.save(sd, os.path.join(out_dir, "logical.pt"))
        ckpt.save_expert_map(handle.placement, os.path.join(out_dir, "logical.pt"))
    torch.distributed.barrier()
    results["errors"] = errs
    return results


def _unpatched_from_logical(config, logical: dict) -> _MoEStack:
    """A new unpatched model holding the logical state dict ``logical`` (Megatron's default layout)."""
    from megatron_eplb.patches import megatron as eplb_mcore

    model = _MoEStack(config)
    model.load_state_dict(eplb_mcore.unpatched_state_dict(model, logical))
    return model


def _ep4_checks(rank: int, world: int, ckpt_path: str, kind: str) -> dict:
    from megatron_eplb.patches import megatron as eplb_mcore

    _init(world)
    config = _moe_config("alltoall", topk=4, num_layers=2, kind=kind)
    num_layers = config.num_layers
    rng = np.random.default_rng(11)
    torch.manual_seed(200 + rank)
    x = torch.randn(6, 2, H)
    w = torch.randn(6, 2, H)
    results: dict = {}
    for name, placement in {
        "default": None,
        "random_replicas": _random_placement(rng, num_layers, world, redundant=4),
        "hot_spread": _hot_spread_placement(num_layers, world, redundant=4),
    }.items():
        ref, pat = _twin_models(config)
        handle = eplb_mcore.apply(pat, placement, replica_dispatch="even")  # copy_spread: the even split's
        results[name] = _compare(ref, pat, handle, x, w)
    # set_placement on the last handle, then back
    handle.set_placement(_random_placement(rng, num_layers, world, redundant=4))
    results["set_placement"] = _compare(ref, pat, handle, x, w)
    results["set_placement"]["copies_identical"] = copies_identical(handle)
    # A checkpoint saved at EP=2 (3 layers there: take a 3-layer model here)
    config3 = _moe_config("alltoall", topk=4, num_layers=3, kind=kind)
    sd = torch.load(ckpt_path)
    saved_map = ckpt.load_expert_map(ckpt_path)
    results["saved_map_ranks"] = saved_map.num_ranks
    ref3, pat3 = _twin_models(config3)
    ref3.load_state_dict(eplb_mcore.unpatched_state_dict(ref3, sd))
    handle3 = eplb_mcore.apply(pat3, _hot_spread_placement(3, world, redundant=4))
    handle3.load_logical_state_dict(sd)
    results["ckpt_other_ep"] = _compare(ref3, pat3, handle3, x, w)
    return results


def _gpt_training(rank: int, world: int, steps: int, kind: str) -> dict:
    from megatron.core import parallel_state
    from megatron_eplb.patches import megatron as eplb_mcore

    from megatron_eplb.config import EPLBConfig

    _init(world)

    def build():
        return tiny_gpt(world, moe_aux_loss_coeff=0.01, experts=kind)

    ref, pat = build(), build()
    pat.load_state_dict(ref.state_dict())
    handle = eplb_mcore.apply(pat, config=EPLBConfig(init_redundancy_expert=2))
    hot = _random_placement(np.random.default_rng(5), 2, world, redundant=2)
    dp_group = parallel_state.get_data_parallel_group()
    losses: dict[str, list[float]] = {"ref": [], "pat": []}
    opts = {
        "ref": torch.optim.Adam(ref.parameters(), lr=1e-2),
        "pat": torch.optim.Adam(pat.parameters(), lr=1e-2),
    }
    gen = torch.Generator().manual_seed(300 + rank)
    for step in range(steps):
        if step == 2:
            handle.set_placement(hot, opts["pat"])  # re-place mid-training; Adam state moves with the weights
        tokens = torch.randint(0, 32, (2, 8), generator=gen)
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
        "moe_layers": handle.layer_names,
        "placement_layers": handle.num_layers,
        "copies_identical": copies_identical(handle),
    }


# ====================================================================== tests


@pytest.fixture(scope="module", params=EXPERT_KINDS)
def ep2(tmp_path_factory, request):
    out = tmp_path_factory.mktemp(f"eplb_ckpt_{request.param}")
    results = run_distributed(_ep2_checks, 2, str(out), request.param, timeout=300)
    return results, out, request.param


def _assert_equivalent(res: dict, where: str) -> None:
    for key in ("out", "loss", "x_grad", "router_grad", "expert_grad"):
        assert res[key] <= RTOL, f"{where}: {key} differs by {res[key]:.2e}"
    assert res["loads_match"], f"{where}: loads() != router top-k counts"
    assert res["slot_loads_match"], f"{where}: slot_loads() mapped through phy2log != logical loads"


@pytest.mark.slow
def test_ep2_allgather_top2_equivalence(ep2):
    results, _, _ = ep2
    for rank, res in enumerate(results):
        for name in (
            "default",
            "random_replicas",
            "hot_spread",
            "local_first",
            "commit_layer",
            "ckpt_reload",
        ):
            _assert_equivalent(res[name], f"rank {rank} {name}")
        for name in ("random_replicas", "hot_spread"):
            assert res[name]["copies_identical"]
            # even dispatch: copies of one expert differ by at most one pair per rank
            assert res[name]["copy_spread"] <= 2, res[name]["copy_spread"]


@pytest.mark.slow
def test_ep2_recording_switch_and_bounded_slot_counts(ep2):
    results, _, _ = ep2
    for res in results:
        assert res["recording_off_counted"] == 0
        assert res["pending_kept_max"] < MAX_PENDING_SLOT_COUNTS
        assert res["loads_after_many"] and res["slot_loads_after_many"]


@pytest.mark.slow
def test_ep2_handle_is_an_expert_model(ep2):
    results, _, _ = ep2
    assert all(res["is_expert_model"] for res in results)


@pytest.mark.slow
def test_ep2_errors_are_clear_and_change_nothing(ep2):
    results, _, _ = ep2
    for res in results:
        bad = {k: v for k, v in res["errors"].items() if v != "ok"}
        assert not bad, bad


@pytest.mark.slow
def test_ep2_logical_checkpoint(ep2):
    results, out, kind = ep2
    for res in results:
        assert res["ckpt_matches_ref"]
        if kind == "sequential":  # the unpatched model's keys without EP: one module per logical expert
            assert sorted(res["ckpt_keys"])[0] == "layers.0.experts.local_experts.0.linear_fc1._extra_state"
            assert res["ckpt_keys"]["layers.0.experts.local_experts.7.linear_fc2.weight"] == [H, 8]
        else:  # ... or the E experts stacked, as GroupedMLP stacks its local experts
            assert res["ckpt_keys"] == {
                "layers.0.experts.weight1": [H, E * 8],
                "layers.0.experts.weight2": [E * 8, H],
            }
    assert (out / "logical.pt").is_file()
    assert ckpt.load_expert_map(out / "logical.pt").num_ranks == 2


@pytest.mark.slow
def test_ep4_alltoall_top4_equivalence_and_other_ep_checkpoint(ep2):
    _, out, kind = ep2
    results = run_distributed(_ep4_checks, 4, str(out / "logical.pt"), kind, timeout=400)
    for rank, res in enumerate(results):
        for name in ("default", "random_replicas", "hot_spread", "set_placement", "ckpt_other_ep"):
            _assert_equivalent(res[name], f"rank {rank} {name}")
        assert res["set_placement"]["copies_identical"]
        assert res["hot_spread"]["copy_spread"] <= 4
        assert res["saved_map_ranks"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", EXPERT_KINDS)
def test_gpt_model_trains_like_unpatched(kind):
    results = run_distributed(_gpt_training, 2, 4, kind, timeout=300)
    for res in results:
        ref, pat = np.array(res["losses"]["ref"]), np.array(res["losses"]["pat"])
        np.testing.assert_allclose(pat, ref, rtol=RTOL)
        assert res["placement_layers"] == 2
        assert res["moe_layers"] == ["decoder.layers.1.mlp", "decoder.layers.2.mlp"]
        assert res["copies_identical"]


# ====================================================================== single-process


def test_seam_registries():
    """A new expert class is one registered storage; the dispatchers are the adapters' names."""
    from megatron_eplb.patches.megatron import SUPPORTED_DISPATCHERS, EPLBPatchError
    from megatron_eplb.patches.megatron.experts import base
    from megatron_eplb.patches.megatron.experts.grouped import GroupedMLPStorage
    from megatron_eplb.patches.megatron.experts.sequential import SequentialMLPStorage

    assert SUPPORTED_DISPATCHERS == ("allgather", "alltoall")
    assert base.supported_expert_classes() == ("GroupedMLP", "SequentialMLP")

    class Toy(torch.nn.Module):
        pass

    class ToyStorage(base.ExpertStorage):
        class_name = "Toy"

        @classmethod
        def expert_class(cls):
            return Toy

    with pytest.raises(
        EPLBPatchError, match="expert class Toy is not supported; supported: GroupedMLP, SequentialMLP$"
    ):
        base.storage_class(Toy(), "here")
    base.register(ToyStorage)
    try:
        assert base.storage_class(Toy(), "here") is ToyStorage
        assert base.supported_expert_classes() == ("GroupedMLP", "SequentialMLP", "Toy")
    finally:
        base._STORAGES.remove(ToyStorage)
    assert SequentialMLPStorage.key_prefix == "local_experts."
    assert GroupedMLPStorage.key_prefix == "slots."


def test_te_grouped_mlp_is_refused_saying_what_is_missing():
    """TEGroupedMLP (Transformer Engine) has no storage: apply's check says what is missing and what works."""
    from megatron_eplb.patches.megatron import EPLBPatchError
    from megatron_eplb.patches.megatron.experts import base

    te_like = type("TEGroupedMLP", (torch.nn.Module,), {})()
    with pytest.raises(EPLBPatchError) as info:
        base.storage_class(te_like, "MoE layer 'decoder.layers.0.mlp'")
    msg = str(info.value)
    for words in (
        "expert class TEGroupedMLP is not supported; supported: GroupedMLP, SequentialMLP",
        "Transformer Engine",
        "linear_fc1.weight{k}",
        "patches/megatron/experts/te_grouped.py",
        "moe_use_legacy_grouped_gemm=True",
        "moe_grouped_gemm=False",
    ):
        assert words in msg, (words, msg)


def test_slot_params_cover_whole_per_slot_and_stacked_parameters():
    """SlotParam: a whole per-slot parameter (SequentialMLP, TEGroupedMLP's weight{k}) or a block of a stacked
    one (GroupedMLP); the same cut applies to anything shaped like the parameter and to ZeRO fragments."""
    from megatron_eplb.slots import SlotParam

    per_slot = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]  # weight0, weight1
    whole = SlotParam.whole(per_slot[1])
    assert whole.is_whole and whole.data.data_ptr() == per_slot[1].data_ptr()
    stacked = torch.nn.Parameter(torch.arange(2 * 3 * 4, dtype=torch.float32).view(3, 8))  # [H, S * F]
    blocks = [SlotParam.block(stacked, k, 2, (3, 4)) for k in range(2)]
    assert torch.equal(blocks[1].data, stacked.detach().view(2, 3, 4)[1])  # GroupedMLP's own view
    moment = torch.zeros_like(stacked)
    blocks[1].of(moment).fill_(1.0)  # a view: writes the moment's block
    assert moment.view(2, 3, 4)[0].sum() == 0 and moment.view(2, 3, 4)[1].sum() == 12
    fragment = torch.arange(6, 18, dtype=torch.float32)  # flat elements [6, 18) of the parameter
    assert blocks[0].of_fragment(fragment, 6).tolist() == list(range(6, 12))
    assert blocks[1].of_fragment(fragment, 6).tolist() == list(range(12, 18))
    assert blocks[1].of_fragment(fragment[:4], 6).numel() == 0
    with pytest.raises(ValueError, match="do not make a parameter"):
        SlotParam.block(stacked, 0, 3, (3, 4))
