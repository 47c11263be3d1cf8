"""EPLB for DeepSpeed's own MoE layer (patches/deepspeed_moe/): routing, equivalence, checkpoints.

The model is examples/train_deepspeed_moe.py's GPT (``deepspeed.moe.layer.MoE`` in every block), small.
Launches are shared: one 2-rank run (EP = 2) holds the equivalence checks against the unpatched DeepSpeed
model (top-1 and top-2, capacity dropping on and off, ZeRO 0 and 1, fp32 and bf16, rebalances that move
slots every 2 steps), the per-slot capacity measurement and the checkpoint round trips; one 4-rank run
(EP = 2 x expert-DP = 2) repeats the equivalence with ZeRO 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "examples"))

ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
SMALL = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--num-experts", "8",
         "--ffn-hidden-size", "32", "--seq-length", "16", "--micro-batch-size", "4", "--min-capacity", "4"]  # fmt: skip
STEPS = 8
# bf16: the copies' gradients are summed in fp32 from bf16 and rounded once more than the single expert's
# (the Megatron path's bound, tests/test_deepspeed.py).
BF16_REPLICA_RTOL = 2e-3


# ============================================================================ pure routing


def test_routes_to_slots_splits_each_expert_evenly_over_its_copies():
    from megatron_eplb.patches.deepspeed_moe import routes_to_slots

    from megatron_eplb.placement import build_log2phy

    phy2log = np.array([[0, 1, 2, 0, 3, 0, 1, 2]])  # expert 0: 3 copies, 1 and 2: 2, 3: 1
    log2phy, count = build_log2phy(phy2log, 4)
    gen = torch.Generator().manual_seed(0)
    k, t, capacity = 2, 40, 12
    experts = torch.randint(0, 4, (k, t), generator=gen)
    experts[1] = (experts[0] + 1) % 4  # top-2: two distinct experts per token
    # rows in each expert's buffer in DeepSpeed's order (first choices, then second), some dropped
    rows = torch.zeros_like(experts)
    for e in range(4):
        mask = experts == e
        rows[mask] = torch.arange(int(mask.sum()))
    indices = torch.where(rows < capacity, experts, -1)
    for offset in (0, 1):
        slot, row = routes_to_slots(
            indices.int(), rows.int(), torch.as_tensor(log2phy[0]), torch.as_tensor(count[0]), offset=offset
        )
        kept = indices >= 0
        assert torch.equal(slot >= 0, kept)
        assert torch.equal(
            torch.as_tensor(phy2log[0])[slot[kept]], indices[kept].long()
        )  # a copy of its expert
        pairs = set(zip(slot[kept].tolist(), row[kept].tolist()))
        assert len(pairs) == int(kept.sum()) and int(row[kept].max()) < capacity  # own row, within capacity
        for e in range(4):  # copies of one expert get its rows within one of each other
            per_copy = [int((slot[kept] == s).sum()) for s in log2phy[0, e] if s >= 0]
            assert max(per_copy) - min(per_copy) <= 1, (e, per_copy)


def test_per_slot_capacity_is_the_expert_capacity_times_its_copies():
    from megatron_eplb.patches.deepspeed_moe import per_slot_capacity, routes_to_slots

    from megatron_eplb.placement import build_log2phy

    phy2log = np.array([[0, 0, 0, 1, 2, 3]])
    log2phy, count = build_log2phy(phy2log, 4)
    t = 60
    experts = torch.tensor([0] * 40 + [1] * 10 + [2] * 6 + [3] * 4)[None]  # expert 0 is hot
    rows = torch.zeros_like(experts)
    for e in range(4):
        rows[experts == e] = torch.arange(int((experts == e).sum()))
    slot, row = routes_to_slots(
        experts.int(), rows.int(), torch.as_tensor(log2phy[0]), torch.as_tensor(count[0])
    )
    gates = torch.rand(1, t)
    slot2, _, gates2 = per_slot_capacity(slot, row, gates, capacity=8)
    kept = [int(((slot2 >= 0) & (experts == e)).sum()) for e in range(4)]
    assert kept == [24, 8, 6, 4]  # min(n_e, c_e * 8): 3 copies of the hot expert keep 24 of its 40 tokens
    assert torch.equal(gates2, gates * (slot2 >= 0))  # top-1: the raw gate value, dropped ones zero
    top2 = per_slot_capacity(slot.repeat(2, 1), row.repeat(2, 1), torch.rand(2, t), capacity=8)[2]
    kept2 = top2 > 0
    sums = top2.sum(0)[kept2.any(0)]
    assert torch.allclose(sums, torch.ones_like(sums))  # k >= 2: renormalised over the kept routes


def test_capacity_key_and_refusals():
    from megatron_eplb.config import CAPACITY, EPLBConfig, EPLBConfigError

    assert CAPACITY == ("logical", "per_slot") and EPLBConfig().eplb_capacity == "logical"
    assert EPLBConfig(eplb_capacity="per_slot").eplb_capacity == "per_slot"
    with pytest.raises(EPLBConfigError, match="eplb_capacity"):
        EPLBConfig(eplb_capacity="slot")


# ============================================================================ multi-process helpers


def _shift_policy(load, num_slots, num_ranks, previous=None, **kwargs):
    """A test policy that always moves experts: rotate every layer's slots by one rank's worth plus one."""
    phy2log = np.asarray(previous.phy2log if hasattr(previous, "phy2log") else previous)
    return np.roll(phy2log, num_slots // num_ranks + 1, axis=1)


def _args(extra=()):
    import train_deepspeed_moe as ex

    return ex.parse_args([*SMALL, "--no-wandb", *extra])


def _ds_config(stage: int, bf16: bool = False, lr: float = 1e-2) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def _engine(extra, stage, eplb, bf16=False, policy_fn=None):
    """``(engine, manager)``: the example's GPT under plain ``deepspeed.initialize`` (``eplb`` None) or
    ``eplb_dsmoe.initialize`` (``eplb`` a dict of EPLB keys, or False: no EPLB, read-only handle)."""
    import deepspeed
    import train_deepspeed_moe as ex
    from megatron_eplb.patches import deepspeed_moe as eplb_dsmoe

    args = _args(extra)
    model = ex.build_model(args, 2)
    cfg = _ds_config(stage, bf16)
    if eplb is None:
        engine, *_ = deepspeed.initialize(
            model=model, config=cfg, model_parameters=[p for p in model.parameters() if p.requires_grad]
        )
        return engine, None
    engine, _, _, _, manager = eplb_dsmoe.initialize(model=model, config=cfg, eplb=eplb, policy_fn=policy_fn)
    return engine, manager


def _batch(step: int, rank_stream: int, vocab: int = 256):
    g = torch.Generator().manual_seed(10_000 * rank_stream + step)
    tokens = torch.randint(0, vocab, (4, 17), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _kept_routes(engine):
    """Forward hooks on every gate: the logical expert of each kept route per forward (``-1`` dropped),
    mapped back from slots through the placement the layer routed with."""
    from megatron_eplb.patches.deepspeed_moe import find_moe_layers

    handle = getattr(engine, "eplb_handle", None)
    seen: list[torch.Tensor] = []

    def hook_for(layer):
        def hook(module, inputs, out):
            ids = out[3].long()
            if handle is not None and handle.patched:
                phy2log = torch.as_tensor(handle.placement.phy2log[layer])
                ids = torch.where(ids >= 0, phy2log[ids.clamp(min=0)], -1)
            seen.append(ids.clone())

        return hook

    for layer, (_, moe) in enumerate(find_moe_layers(engine.module)):
        moe.deepspeed_moe.gate.register_forward_hook(hook_for(layer))
    return seen


def _run(engine, steps, stream, kept=None):
    """Train ``steps`` steps; returns (losses, records, eval logits of a fixed batch)."""
    losses, records = [], 0
    for step in range(steps):
        tokens, labels = _batch(step, stream)
        torch.manual_seed(1000 + step)  # the gate's random draws (RTS, top-2 sampling), the same in both runs
        loss = engine(tokens, labels)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach().float()))
        records += getattr(engine, "eplb_last_record", None) is not None
    return losses, records, _eval(engine, stream)


def _eval(engine, stream):
    engine.eval()
    tokens, _ = _batch(999, stream)
    torch.manual_seed(4242)
    with torch.no_grad():
        out = engine(tokens).float().clone()
    engine.train()
    return out


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


DYN = {"dynamic_eplb": True, "num_iterations_eplb_update": 2, "num_wait_worker_iterations": 0,
       "init_redundancy_expert": 2, "eplb_layers_per_step": 2}  # fmt: skip


def _equivalence(stream, extra, stage, bf16=False, redundancy=2):
    """The unpatched DeepSpeed model and the EPLB one (``redundancy`` redundant slots, a slot-moving
    rebalance every 2 steps), trained on the same batches with the same random draws."""
    base_engine, _ = _engine(extra, stage, None, bf16)
    base_kept = _kept_routes(base_engine)
    base = _run(base_engine, STEPS, stream)
    eplb = {**DYN, "init_redundancy_expert": redundancy}
    engine, manager = _engine(extra, stage, eplb, bf16, policy_fn=_shift_policy)
    kept = _kept_routes(engine)
    eplb = _run(engine, STEPS, stream)
    same_drops = len(kept) == len(base_kept) and all(torch.equal(a, b) for a, b in zip(kept, base_kept))
    dropped = sum(int((b < 0).sum()) for b in base_kept)
    out = {
        "loss_rel": _rel(eplb[0], base[0]),
        "records": eplb[1],
        "moved": sum(r.moved_slots for r in manager.history if r.outcome == "committed"),
        "eval_diff": float((eplb[2] - base[2]).abs().max()),
        "same_drops": same_drops,
        "dropped_routes": dropped,
        "routes": sum(b.numel() for b in base_kept),
        "bitwise": eplb[0] == base[0],
        "base_losses": base[0],
        "eplb_losses": eplb[0],
    }
    manager.close()
    return out, engine, manager


# ============================================================================ EP = 2


def _ep2_checks(rank, world):
    import deepspeed

    os.environ.update(ENV)
    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for k in (1, 2):
        for drop in (True, False):
            extra = ["--moe-top-k", str(k), "--capacity-factor", "0.5"] + (
                [] if drop else ["--no-drop-tokens"]
            )
            out[f"k{k}_drop{drop}"], engine, manager = _equivalence(rank, extra, stage=0)
    out["zero1"], engine, manager = _equivalence(
        rank, ["--moe-top-k", "2", "--capacity-factor", "0.5"], stage=1
    )
    for stage in (0, 1):
        out[f"bf16_zero{stage}"], _, _ = _equivalence(rank, ["--moe-top-k", "2"], stage, bf16=True)
        out[f"bf16_zero{stage}_r0"], _, _ = _equivalence(
            rank, ["--moe-top-k", "2"], stage, bf16=True, redundancy=0
        )
    out["megatron_core_imported"] = sorted(k for k in sys.modules if k.startswith("megatron.core"))[:3]
    return out


@pytest.fixture(scope="module")
def ep2():
    from dist import run_distributed

    return run_distributed(_ep2_checks, 2, timeout=900, env=ENV)[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["k1_dropTrue", "k1_dropFalse", "k2_dropTrue", "k2_dropFalse", "zero1"])
def test_losses_outputs_and_drops_equal_the_unpatched_layer(ep2, case):
    c = ep2[case]
    assert c["records"] >= 2 and c["moved"] > 0, c  # rebalances that moved slots
    assert c["loss_rel"] <= 1e-5, (c["base_losses"], c["eplb_losses"])
    assert c["eval_diff"] <= 1e-5, c["eval_diff"]
    assert c["same_drops"], "the EPLB gate kept another set of (token, expert) pairs"
    if "dropTrue" in case or case == "zero1":
        assert c["dropped_routes"] > 0, "the capacity dropped nothing: the drop path was not exercised"
    else:
        assert c["dropped_routes"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
def test_bf16_moves_exact_and_replicas_within_bf16_rounding(ep2, stage):
    moved = ep2[f"bf16_zero{stage}_r0"]
    # without replicas the math is the same in the same order: moving slots (bf16 weights, fp32 masters, Adam
    # moments) leaves the run bit-identical to the unpatched one; a master or a moment left behind breaks it
    assert moved["records"] >= 2 and moved["moved"] > 0 and moved["bitwise"], moved
    c = ep2[f"bf16_zero{stage}"]
    assert c["records"] >= 2 and c["moved"] > 0
    assert c["loss_rel"] <= BF16_REPLICA_RTOL, (c["base_losses"], c["eplb_losses"])


@pytest.mark.slow
def test_no_megatron_core_needed(ep2):
    """Megatron-DeepSpeed users need not have megatron-core: the whole run never imported it."""
    assert ep2["megatron_core_imported"] == []
