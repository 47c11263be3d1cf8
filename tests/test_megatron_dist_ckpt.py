"""Megatron dist checkpointing and activation recompute with the placement-aware MoE patch.

Checkpoints saved through ``model.sharded_state_dict()`` + ``megatron.core.dist_checkpointing.save``
(``torch_dist`` backend, gloo, CPU) must hold the standard logical layout: each logical expert once, under
the key and offset the unpatched model gives it.  So a checkpoint of the patched model loads into the
unpatched model, one of the unpatched model loads into a patched model with any placement, and a patched
model with one placement loads into another placement or EP size; every case gives the source model's
outputs.  Under activation recompute the recorded loads count each real forward once.

Launches, per expert kind (``SequentialMLP``, the legacy ``GroupedMLP``): EP=2 (checkpoints saved, loaded
across placements, recompute checks), EP=4 (the EP=2 checkpoints loaded at another EP size).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from dist import run_distributed  # noqa: E402
from models import EXPERT_KINDS, SEQ, E, H, V, copies_identical, init_megatron, tiny_gpt  # noqa: E402

from megatron_eplb.placement import ExpertPlacement  # noqa: E402

pytestmark = pytest.mark.slow

RTOL = 1e-5


# ====================================================================== helpers run in every rank


_KIND = {"experts": "sequential"}  # the expert kind of this launch (set by the launch functions)


def _gpt(seed: int, ep: int, **recompute):
    """A 3-layer GPTModel (dense, MoE, MoE; alltoall, top-2) initialised from ``seed``."""
    model = tiny_gpt(ep, dispatcher="alltoall", seed=seed, experts=_KIND["experts"], **recompute)
    with torch.no_grad():  # the same router on every rank (as after data-parallel sync), expert 0 hot
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                torch.distributed.broadcast(p, 0)
                p[0] += 0.5 * p[1:].mean(0)
    return model


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + rank)
    tokens = torch.randint(0, V, (2, SEQ), generator=gen)
    position_ids = torch.arange(SEQ).expand(2, SEQ)
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).tril().logical_not()
    return tokens, position_ids, mask


def _logits(model, rank: int) -> torch.Tensor:
    with torch.no_grad():
        return model(*_batch(rank)).detach()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _placement(seed: int, ep: int, redundant: int) -> ExpertPlacement:
    """2 MoE layers; ``redundant`` replicas of random experts, no two copies of an expert on one rank."""
    rng = np.random.default_rng(seed)
    rows = []
    while len(rows) < 2:
        row = rng.permutation(np.concatenate([np.arange(E), rng.choice(E, size=redundant)]))
        if all(len(set(r)) == len(r) for r in row.reshape(ep, -1)):
            rows.append(row)
    return ExpertPlacement(np.stack(rows), ep, E)


def _patched(seed: int, ep: int, placement: ExpertPlacement, source=None, **recompute):
    """A patched :func:`_gpt` (with the weights of ``source`` when given)."""
    from megatron_eplb.patches import megatron as eplb_mcore

    model = _gpt(seed, ep, **recompute)
    if source is not None:
        model.load_state_dict(source.state_dict())
    return model, eplb_mcore.apply(model, placement)


def _save(model, path: str) -> None:
    import os

    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), path, sharded_strategy=("torch_dist", 1))


def _load(model, path: str) -> None:
    from megatron.core import dist_checkpointing

    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path))


def _saved_layout(model) -> list[tuple]:
    """Sorted ``(key, global_shape, global_offset)`` of the main replicas over all ranks: what is saved
    (after the factories GroupedMLP's entries are made of, as the save applies them).  An expert tensor's
    chunk is listed per logical expert (offset along the expert axis): the unpatched GroupedMLP saves its
    local experts as one chunk, the patched one each slot apart (its experts need not be contiguous)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    mine = sorted(
        (t.key, tuple(t.global_shape), (t.global_offset[0] + i, *t.global_offset[1:]))
        for t in nested_values(sharded)
        if isinstance(t, ShardedTensor) and is_main_replica(t.replica_id)
        for i in range(t.local_shape[0] if ".experts.experts." in t.key and not t.prepend_axis_num else 1)
    )
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return sorted(x for part in everyone for x in part)


def _recompute_check(rank: int, ep: int, **recompute) -> dict:
    """Patched model (with replicas) under recompute vs the unpatched one without: loss, grads, loads."""
    from megatron_eplb.patches.megatron import find_moe_layers

    ref = _gpt(0, ep)
    pat, handle = _patched(0, ep, _placement(9, ep, redundant=2), ref, **recompute)
    ref_counts, pat_calls = [], []
    hooks = [
        layer.router.register_forward_hook(lambda m, i, o: ref_counts.append(o[1].sum(0).to(torch.int64)))
        for _, layer in find_moe_layers(ref)
    ] + [
        layer.router.register_forward_hook(lambda m, i, o: pat_calls.append(1))
        for _, layer in find_moe_layers(pat)
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
    dense_grad = max(
        _rel(p.grad, ref_params[name].grad)
        for name, p in pat.named_parameters()
        if ".experts." not in name and p.grad is not None
    )
    return {
        "loss": _rel(losses[1], losses[0]),
        "dense_grad": dense_grad,
        "loads_match": bool(torch.equal(handle.loads(), torch.stack(ref_counts))),
        "router_calls": len(pat_calls),  # 2 per MoE layer: the forward and its re-run in backward
    }


# ====================================================================== launches


def _ep2_checks(rank: int, world: int, out_dir: str, kind: str) -> dict:
    _KIND["experts"] = kind
    init_megatron(world)
    res: dict = {}
    ref = _gpt(0, world)
    expected = _logits(ref, rank)
    pat_a, _ = _patched(0, world, _placement(1, world, redundant=4), ref)  # S = 6
    res["patched_equals_ref"] = _rel(_logits(pat_a, rank), expected)
    res["same_saved_layout"] = _saved_layout(pat_a) == _saved_layout(ref)
    res["saved_expert_tensors"] = len([x for x in _saved_layout(pat_a) if ".experts.experts." in x[0]])
    _save(ref, f"{out_dir}/ref")
    _save(pat_a, f"{out_dir}/patched")

    from megatron.core import dist_checkpointing

    meta = {
        name: {
            k: tuple(v.global_shape)
            for k, v in dist_checkpointing.load_tensors_metadata(f"{out_dir}/{name}").items()
        }
        for name in ("ref", "patched")
    }
    res["same_checkpoint_metadata"] = meta["ref"] == meta["patched"]
    res["expert_keys"] = sorted(k for k in meta["patched"] if ".experts." in k)
    res["expert_shape"] = meta["patched"]["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"]

    # patched (placement A) -> unpatched
    unpatched = _gpt(1, world)
    res["before_load"] = _rel(_logits(unpatched, rank), expected)  # another init: the load must matter
    _load(unpatched, f"{out_dir}/patched")
    res["patched_to_unpatched"] = _rel(_logits(unpatched, rank), expected)
    # patched (placement A) -> patched with another placement and redundancy (S = 5)
    pat_b, handle_b = _patched(1, world, _placement(2, world, redundant=2))
    _load(pat_b, f"{out_dir}/patched")
    res["patched_to_other_placement"] = _rel(_logits(pat_b, rank), expected)
    res["copies_identical_b"] = copies_identical(handle_b)
    # unpatched -> patched with replicas
    pat_c, handle_c = _patched(1, world, _placement(3, world, redundant=4))
    _load(pat_c, f"{out_dir}/ref")
    res["unpatched_to_patched"] = _rel(_logits(pat_c, rank), expected)
    res["copies_identical_c"] = copies_identical(handle_c)
    # S = 9 > E slots per rank: two copies of an expert on one rank (one left out, filled on load)
    rng = np.random.default_rng(6)
    rows = [np.concatenate([rng.permutation(np.append(np.arange(E), r)) for r in (0, 1)]) for _ in range(2)]
    pat_d, handle_d = _patched(1, world, ExpertPlacement(np.stack(rows), world, E))
    _load(pat_d, f"{out_dir}/patched")
    res["patched_to_same_rank_copies"] = _rel(_logits(pat_d, rank), expected)
    res["copies_identical_d"] = copies_identical(handle_d)
    res["same_saved_layout_d"] = _saved_layout(pat_d) == _saved_layout(ref)
    _save(pat_d, f"{out_dir}/same_rank_copies")
    unpatched_d = _gpt(2, world)
    _load(unpatched_d, f"{out_dir}/same_rank_copies")
    res["same_rank_copies_to_unpatched"] = _rel(_logits(unpatched_d, rank), expected)
    torch.save(expected, f"{out_dir}/logits_ep2_rank{rank}.pt")

    # activation recompute: full (uniform, 1 layer per unit) and selective MoE-layer recompute
    res["recompute_full"] = _recompute_check(
        rank, world, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    )
    res["recompute_moe"] = _recompute_check(
        rank, world, recompute_granularity="selective", recompute_modules=["moe"]
    )
    return res


def _ep4_checks(rank: int, world: int, out_dir: str, kind: str) -> dict:
    """The EP=2 checkpoints at EP=4: the unpatched one into a patched model, the patched one into both."""
    _KIND["experts"] = kind
    init_megatron(world)
    res: dict = {}
    unpatched = _gpt(1, world)
    _load(unpatched, f"{out_dir}/ref")
    expected = _logits(unpatched, rank)
    if rank < 2:  # the same tokens as at EP=2
        res["unpatched_ep4_equals_ep2"] = _rel(expected, torch.load(f"{out_dir}/logits_ep2_rank{rank}.pt"))
    pat, handle = _patched(1, world, _placement(4, world, redundant=4))  # S = 3
    _load(pat, f"{out_dir}/patched")
    res["patched_ep2_to_patched_ep4"] = _rel(_logits(pat, rank), expected)
    res["copies_identical"] = copies_identical(handle)
    pat2, _ = _patched(2, world, _placement(5, world, redundant=4))
    _load(pat2, f"{out_dir}/ref")
    res["unpatched_ep2_to_patched_ep4"] = _rel(_logits(pat2, rank), expected)
    unpatched2 = _gpt(2, world)
    _load(unpatched2, f"{out_dir}/patched")
    res["patched_ep2_to_unpatched_ep4"] = _rel(_logits(unpatched2, rank), expected)
    return res


# ====================================================================== tests


@pytest.fixture(scope="module", params=EXPERT_KINDS)
def ep2(tmp_path_factory, request):
    out = tmp_path_factory.mktemp(f"eplb_dist_ckpt_{request.param}")
    return run_distributed(_ep2_checks, 2, str(out), request.param, timeout=300), out, request.param


def test_patched_checkpoint_has_the_unpatched_layout(ep2):
    results, _, _ = ep2
    for res in results:
        assert res["patched_equals_ref"] <= RTOL
        assert res["same_saved_layout"], "main-replica (key, shape, offset) differ from the unpatched model's"
        assert res["saved_expert_tensors"] == 2 * 2 * E, res["saved_expert_tensors"]  # layers x fc1/fc2 x E
        assert res["same_checkpoint_metadata"]
        assert res["expert_keys"] == [
            f"decoder.layers.{i}.mlp.experts.experts.linear_fc{j}.weight" for i in (1, 2) for j in (1, 2)
        ]
        assert res["expert_shape"] == (E, 8, H)  # one row per logical expert, replicas not duplicated


def test_ep2_checkpoints_load_across_placements_and_unpatched(ep2):
    results, _, _ = ep2
    for rank, res in enumerate(results):
        assert res["before_load"] > 1e-3
        for key in ("patched_to_unpatched", "patched_to_other_placement", "unpatched_to_patched"):
            assert res[key] <= RTOL, f"rank {rank} {key}: outputs differ by {res[key]:.2e}"
        assert res["copies_identical_b"] and res["copies_identical_c"]


def test_same_rank_copies_save_once_and_fill_on_load(ep2):
    results, _, _ = ep2
    for rank, res in enumerate(results):
        for key in ("patched_to_same_rank_copies", "same_rank_copies_to_unpatched"):
            assert res[key] <= RTOL, f"rank {rank} {key}: outputs differ by {res[key]:.2e}"
        assert res["copies_identical_d"] and res["same_saved_layout_d"]


@pytest.mark.parametrize("mode", ["recompute_full", "recompute_moe"])
def test_recompute_counts_loads_once(ep2, mode):
    results, _, _ = ep2
    for rank, res in enumerate(results):
        r = res[mode]
        assert r["router_calls"] == 4, (
            f"rank {rank}: recompute did not re-run the router ({r['router_calls']})"
        )
        assert r["loads_match"], f"rank {rank}: loads() != router top-k counts of one forward"
        assert r["loss"] <= RTOL and r["dense_grad"] <= 1e-4, r


def test_ep2_checkpoints_load_at_ep4(ep2):
    _, out, kind = ep2
    results = run_distributed(_ep4_checks, 4, str(out), kind, timeout=300)
    for rank, res in enumerate(results):
        for key in (
            "patched_ep2_to_patched_ep4",
            "unpatched_ep2_to_patched_ep4",
            "patched_ep2_to_unpatched_ep4",
        ):
            assert res[key] <= RTOL, f"rank {rank} {key}: outputs differ by {res[key]:.2e}"
        assert res["copies_identical"]
        if rank < 2:
            assert res["unpatched_ep4_equals_ep2"] <= RTOL
