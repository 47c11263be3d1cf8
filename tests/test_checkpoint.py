"""The one logical checkpoint (megatron_eplb/checkpoint.py): logical <-> physical expert names, the placement
to resume with, and a save / load round trip through ``EPLBManager`` with a torch optimizer in one 2-process
gloo run (Adam's ``step`` count travels once)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist import run_distributed  # noqa: E402
from models import SEQ, E, V, init_megatron, tiny_gpt  # noqa: E402

from megatron_eplb.checkpoint import (  # noqa: E402
    CheckpointError,
    logical_to_physical,
    physical_to_logical,
    resume_placement,
)
from megatron_eplb.config import EPLBConfig  # noqa: E402
from megatron_eplb.placement import ExpertPlacement  # noqa: E402

# ============================================================================ logical <-> physical names


def test_checkpoint_conversion_roundtrip():
    prefixes = ["a.local_experts.", "b.local_experts."]
    phy2log = np.array([[0, 1, 2, 0], [2, 1, 0, 1]])
    logical = {
        f"{p}{e}.w": torch.full((2,), float(10 * i + e)) for i, p in enumerate(prefixes) for e in range(3)
    }
    logical["other"] = torch.ones(1)
    physical = logical_to_physical(logical, phy2log, prefixes)
    assert physical["b.local_experts.3.w"][0] == 11
    assert physical_to_logical(physical, phy2log, prefixes).keys() == logical.keys()
    local = logical_to_physical(logical, phy2log, prefixes, rank=1, slots_per_rank=2)
    assert local["a.local_experts.1.w"][0] == 0 and "a.local_experts.2.w" not in local
    physical["a.local_experts.3.w"] = physical["a.local_experts.3.w"] + 1
    with pytest.raises(CheckpointError, match="differs"):
        physical_to_logical(physical, phy2log, prefixes)
    with pytest.raises(CheckpointError, match="no logical expert 2"):
        logical_to_physical(
            {k: v for k, v in logical.items() if "b.local_experts.2" not in k}, phy2log, prefixes
        )


# ============================================================================ the placement to resume with


def _handle(ep: int, redundant: int, layers: int = 2, experts: int = 8):
    placement = ExpertPlacement.default(layers, experts, ep, redundant)
    return SimpleNamespace(
        placement=placement,
        num_layers=layers,
        num_experts=experts,
        ep_size=ep,
        num_slots=placement.num_slots,
    )


def test_resume_placement_restores_replans_or_keeps(tmp_path):
    load = np.arange(16, dtype=np.int64).reshape(2, 8) ** 2
    saved = ExpertPlacement.default(2, 8, 2, 2).with_load(load)
    new, info = resume_placement(None, _handle(2, 2))
    assert new is None and info["action"] == "kept"
    new, info = resume_placement(saved, _handle(2, 2))
    assert new is saved and info["action"] == "restored"
    new, info = resume_placement(saved, _handle(1, 2))  # one GPU lost: plan for EP=1 from the load
    assert info["action"] == "replanned" and info["saved_ep_size"] == 2 and info["ep_size"] == 1
    assert new.num_ranks == 1 and new.num_slots == 10 and np.array_equal(new.expert_load, load)
    assert info["balancedness"] >= info["balancedness_default"]
    new, info = resume_placement(ExpertPlacement.default(2, 8, 2, 2), _handle(1, 2))  # no recorded load
    assert new is None and info["action"] == "kept" and "records no expert_load" in info["message"]
    path = tmp_path / "map.json"
    saved.to_json(path)
    new, info = resume_placement(saved, _handle(1, 2), EPLBConfig(expert_map_path=str(path)))
    assert new is None and "expert_map_path" in info["message"]
    with pytest.raises(CheckpointError, match="saved for another model"):
        resume_placement(saved, _handle(2, 2, experts=16))


# ============================================================================ round trip, 2 ranks


def _step(model, manager, opt, rank: int, seed: int) -> float:
    from megatron.core import parallel_state

    gen = torch.Generator().manual_seed(seed * 10 + rank)
    tokens = torch.randint(0, V, (2, SEQ), generator=gen)
    position_ids = torch.arange(SEQ).expand(2, SEQ)
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).tril().logical_not()
    opt.zero_grad(set_to_none=True)
    loss = model(tokens, position_ids, mask, labels=tokens).mean()
    loss.backward()
    manager.before_optimizer_step()
    world = torch.distributed.get_world_size()
    for p in model.parameters():  # dense gradients over data parallel, expert ones over expert-DP
        if p.grad is not None:
            dense = getattr(p, "allreduce", True)
            group = (
                parallel_state.get_data_parallel_group()
                if dense
                else parallel_state.get_expert_data_parallel_group()
            )
            torch.distributed.all_reduce(p.grad, group=group)
            p.grad /= world
    opt.step()
    manager.step()
    return float(loss.detach())


def _run(model_redundancy: int, rank: int):
    from megatron_eplb.patches import megatron as eplb_mcore

    from megatron_eplb.manager import EPLBManager

    init_megatron(2)
    model = tiny_gpt(2, seed=rank + 3)  # a different start on each run: a load that did nothing would show
    cfg = EPLBConfig(init_redundancy_expert=model_redundancy)
    handle = eplb_mcore.apply(model, config=cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, handle, opt, EPLBManager(handle, cfg, opt)


def _copy(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items() if torch.is_tensor(v)}


def _round_trip(rank: int, world: int, directory: str) -> dict:
    from megatron_eplb.checkpoint import logical_optimizer_state, read_logical_checkpoint

    model, handle, opt, manager = _run(2, 0)
    for i in range(3):
        _step(model, manager, opt, rank, i)
    manager.save_checkpoint(directory)
    payload = read_logical_checkpoint(directory)
    state_a = logical_optimizer_state(model, handle, manager.optimizer_state)
    weights_a = _copy(handle.logical_state_dict())  # dense entries are views of the live parameters
    loss_a = _step(model, manager, opt, rank, 3)
    after_a = handle.logical_state_dict()

    model_b, handle_b, opt_b, manager_b = _run(0, rank)  # 8 slots instead of 10: re-planned from the load
    meta = manager_b.load_checkpoint(directory)
    state_b = logical_optimizer_state(model_b, handle_b, manager_b.optimizer_state)
    weights_b = _copy(handle_b.logical_state_dict())
    steps_b = sorted({int(float(s["step"])) for s in opt_b.state.values()})
    manager_step = manager_b.step_count
    loss_b = _step(model_b, manager_b, opt_b, rank, 3)
    after_b = handle_b.logical_state_dict()
    manager.close()
    manager_b.close()
    experts = [k for k in payload["optimizer"] if ".local_experts." in k]
    return {
        "payload_keys": sorted(k for k in payload if k not in ("model", "optimizer")),
        "experts": len(experts),
        "state_keys": sorted({k for v in payload["optimizer"].values() for k in v}),
        "optimizer_step": payload["optimizer_step"],
        "eplb_step_count": payload["eplb_step_count"],
        "placement": meta["placement"]["action"],
        "manager_step": manager_step,
        "steps_b": steps_b,
        "weights_equal": all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a),
        "state_equal": set(state_a) == set(state_b)
        and all(torch.equal(state_a[k][s], state_b[k][s]) for k in state_a for s in state_a[k]),
        "loss": (loss_a, loss_b),
        "diff_keys": [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])],
        "after_diff": max(
            float((after_a[k] - after_b[k]).abs().max()) for k in after_a if torch.is_tensor(after_a[k])
        ),
    }


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    return run_distributed(_round_trip, 2, str(tmp_path_factory.mktemp("ckpt")), timeout=300)


@pytest.mark.slow
def test_one_logical_format(round_trip):
    r = round_trip[0]
    assert r["payload_keys"] == ["eplb_step_count", "format", "optimizer_step", "version"]
    assert r["experts"] == 2 * E * 2  # MoE layers x logical experts x (fc1, fc2), each once
    assert r["state_keys"] == ["exp_avg", "exp_avg_sq"]  # by logical parameter name, no step
    assert r["optimizer_step"] == 3 and r["eplb_step_count"] == 3


@pytest.mark.slow
def test_load_into_another_placement_resumes_every_expert_and_the_step_count(round_trip):
    for r in round_trip:
        assert r["placement"] == "replanned" and r["manager_step"] == 3
        assert r["weights_equal"] and r["state_equal"], r["diff_keys"]
        assert r["steps_b"] == [3]
        assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-5)
        assert r["after_diff"] <= 1e-5  # Adam's 4th step with the right bias correction
