"""EPLB for DeepSpeed's own MoE layer (patches/deepspeed_moe/): routing, equivalence, checkpoints.

The model is examples/train_deepspeed_moe.py's GPT (``deepspeed.moe.layer.MoE`` in every block), small.
Launches are shared: one 2-rank run (EP = 2) holds the equivalence checks against the unpatched DeepSpeed
model (top-1 and top-2, capacity dropping on and off, ZeRO 0, 1 and 2, fp32 and bf16, rebalances that move
slots every 2 steps), the per-slot capacity measurement and the checkpoint round trips; one 4-rank run
(EP = 2 x expert-DP = 2) repeats the equivalence with ZeRO 0 and 1, and ZeRO 2 with redundant slots (buckets
reduce-scattered inside backward, gradient accumulation; and once without the hold-back of those
reductions, which must break it).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
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


def test_split_routes_give_each_copy_its_share_within_the_capacity():
    """The balanced dispatch's mapping: every source rank's kept routes (DeepSpeed's dense rows, some
    dropped) land on copies of their expert, each (slot, row) once per source, rows < C, and the copies
    together receive exactly the shares ``balanced_shares`` computed from the ranks' counts."""
    from megatron_eplb.patches.deepspeed_moe import split_routes_to_slots
    from megatron_eplb.patches.deepspeed_moe.routing import expert_counts

    from megatron_eplb.placement import build_log2phy
    from megatron_eplb.replica_split import (
        balanced_shares,
        copy_bounds,
        even_shares,
        rank_loads_of_shares,
        replica_tables,
        source_offsets,
    )

    phy2log = np.array([0, 1, 2, 0, 3, 0, 1, 4, 5, 6, 7, 1])  # 3 ranks x 4 slots; 0: 3 copies, 1: 3
    ranks, num_experts, t, capacity = 3, 8, 48, 10
    log2phy, count = build_log2phy(phy2log[None], num_experts)
    gen = torch.Generator().manual_seed(3)
    routes = []
    for _ in range(ranks):  # each source rank: top-2 routes skewed to experts 0 and 1, DeepSpeed's rows
        first = torch.where(torch.rand(t, generator=gen) < 0.7, 0, torch.randint(0, 8, (t,), generator=gen))
        experts = torch.stack([first, (first + 1 + torch.randint(0, 7, (t,), generator=gen)) % 8])
        rows = torch.zeros_like(experts)
        for e in range(num_experts):
            mask = experts == e
            rows[mask] = torch.arange(int(mask.sum()))
        routes.append((torch.where(rows < capacity, experts, -1).int(), rows.int()))
    every = torch.stack([expert_counts(ind, num_experts) for ind, _ in routes])  # [N, E] kept routes
    tables = replica_tables(phy2log, ranks, num_experts)
    shares = balanced_shares(every.sum(0), tables)
    bounds = copy_bounds(shares)
    received = torch.zeros(len(phy2log), dtype=torch.int64)
    for r, (indices, rows) in enumerate(routes):
        slot, row = split_routes_to_slots(
            indices, rows, torch.as_tensor(log2phy[0]), source_offsets(every)[r], bounds
        )
        kept = indices >= 0
        assert torch.equal(slot >= 0, kept)
        assert torch.equal(torch.as_tensor(phy2log)[slot[kept]], indices[kept].long())  # a copy of its expert
        pairs = set(zip(slot[kept].tolist(), row[kept].tolist()))
        assert len(pairs) == int(kept.sum()) and int(row[kept].max()) < capacity
        received += torch.bincount(slot[kept], minlength=len(phy2log))
    for e in range(num_experts):  # the copies computed exactly the shares
        got = [int(received[s]) for s in log2phy[0, e] if s >= 0]
        assert got == shares[e, : count[0, e]].tolist(), (e, got, shares[e])
    busiest = int(rank_loads_of_shares(shares, tables).max())
    even = int(rank_loads_of_shares(even_shares(every.sum(0), tables.copy_count, 3), tables).max())
    assert busiest < even, (busiest, even)  # this batch: the balanced split beats the even one


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


def test_zero_stages_supported_and_refused():
    """ZeRO 0, 1 and 2 with and without redundant slots (the Megatron-core path's check: it does not look at
    the slots); stage 3 refused, naming the supported stages (in a launch: test_unsupported_setups...)."""
    from megatron_eplb.patches import deepspeed as eplb_ds
    from megatron_eplb.patches.deepspeed_moe import SUPPORTED_ZERO_STAGES

    from megatron_eplb.errors import DeepSpeedEPLBError

    assert SUPPORTED_ZERO_STAGES == eplb_ds.SUPPORTED_ZERO_STAGES == (0, 1, 2)

    def ds(stage):
        return {"zero_optimization": {"stage": stage}, "eplb": {"init_redundancy_expert": 2}}

    assert [eplb_ds.check_ds_config(ds(s)) for s in (0, 1, 2)] == [0, 1, 2]
    with pytest.raises(DeepSpeedEPLBError, match="supported stages: 0, 1, 2"):
        eplb_ds.check_ds_config(ds(3))


# ============================================================================ multi-process helpers


def _shift_policy(load, num_slots, num_ranks, previous=None, **kwargs):
    """A test policy that always moves experts: rotate every layer's slots by one rank's worth plus one."""
    phy2log = np.asarray(previous.phy2log if hasattr(previous, "phy2log") else previous)
    return np.roll(phy2log, num_slots // num_ranks + 1, axis=1)


def _move_policy(load, num_slots, num_ranks, previous=None, **kwargs):
    """:func:`_shift_policy`, then rank 0's slots reversed: the copies of an expert do not keep one local slot
    index on every rank, so under ZeRO 2 their gradient partitions live on different expert-DP ranks."""
    phy2log = _shift_policy(load, num_slots, num_ranks, previous)
    per_rank = num_slots // num_ranks
    phy2log[:, :per_rank] = phy2log[:, :per_rank][:, ::-1].copy()
    return phy2log


def _args(extra=()):
    import train_deepspeed_moe as ex

    return ex.parse_args([*SMALL, "--no-wandb", *extra])


def _ds_config(
    stage: int, bf16: bool = False, lr: float = 1e-2, data_before: bool = False, clip=0.0, gas=1, bucket=None
) -> dict:
    """``gas``: gradient accumulation steps; ``bucket``: ZeRO's reduce (and all-gather) bucket size in elements
    (small: ZeRO 2 reduce-scatters buckets inside backward; DeepSpeed's default holds the whole model)."""
    cfg = {
        "use_data_before_expert_parallelism": data_before,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": clip,
        "steps_per_print": 10**9,
    }
    if bucket is not None:
        cfg["zero_optimization"].update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def _engine(extra, stage, eplb, bf16=False, policy_fn=None, data_before=False, clip=0.0, gas=1, bucket=None):
    """``(engine, manager)``: the example's GPT under plain ``deepspeed.initialize`` (``eplb`` None) or
    ``eplb_dsmoe.initialize`` (``eplb`` a dict of EPLB keys, or False: no EPLB, read-only handle)."""
    import deepspeed
    import train_deepspeed_moe as ex
    from megatron_eplb.patches import deepspeed_moe as eplb_dsmoe

    args = _args(extra)
    model = ex.build_model(args, 2, data_before)
    cfg = _ds_config(stage, bf16, data_before=data_before, clip=clip, gas=gas, bucket=bucket)
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
                phy2log = torch.tensor(handle.placement.phy2log[layer])
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


# eplb_max_plan_wait: the due step waits for the plan (a cold worker on 2 shared cores may take seconds), so
# rebalances come at fixed steps in these short runs
DYN = {"dynamic_eplb": True, "num_iterations_eplb_update": 2, "num_wait_worker_iterations": 0, "eplb_max_plan_wait": 60.0,
       "init_redundancy_expert": 2, "eplb_layers_per_step": 2}  # fmt: skip


def _equivalence(
    stream,
    extra,
    stage,
    bf16=False,
    redundancy=2,
    data_before=False,
    baseline=None,
    clip=0.0,
    gas=1,
    bucket=None,
    policy_fn=_shift_policy,
    steps=STEPS,
):
    """The unpatched DeepSpeed model (``baseline`` None: plain ``deepspeed.initialize``; False: ``initialize(
    eplb=False)``) and the EPLB one (``redundancy`` redundant slots, a slot-moving rebalance every 2 optimizer
    steps), trained on the same batches with the same random draws (``steps`` micro-steps, ``gas`` of them
    per optimizer step).  ZeRO 2: ``copies_identical`` — every copy of an expert bitwise the same in weights,
    fp32 master and Adam moments at the end."""
    ds = {"data_before": data_before, "clip": clip, "gas": gas, "bucket": bucket}
    base_engine, _ = _engine(extra, stage, baseline, bf16, **ds)
    base_kept = _kept_routes(base_engine)
    base = _run(base_engine, steps, stream)
    eplb = {**DYN, "init_redundancy_expert": redundancy}
    engine, manager = _engine(extra, stage, eplb, bf16, policy_fn=policy_fn, **ds)
    kept = _kept_routes(engine)
    eplb = _run(engine, steps, stream)
    if baseline is False:  # both record: the same routed pairs and drops
        drops = [e.eplb_handle.drop_counts().tolist() for e in (base_engine, engine)]
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
        "drop_counts": drops if baseline is False else None,
        "base_losses": base[0],
        "eplb_losses": eplb[0],
        "replicas": int((engine.eplb_handle.placement.replica_count > 1).sum()),
        "copies_identical": _copies_identical(engine) if stage == 2 else None,
    }
    manager.close()
    return out, engine, manager


def _copies_identical(engine) -> bool:
    """Every copy of an expert holds bitwise the same weights, fp32 master and Adam moments (collective)."""
    from megatron_eplb.patches.deepspeed import DeepSpeedSlotState
    from models import copies_identical

    return copies_identical(engine.eplb_handle, DeepSpeedSlotState(engine))


def _dispatch_balance(stream, extra, steps=12) -> dict:
    """The unpatched model, then EPLB with the ``even`` and the ``balanced`` dispatch on the same batches,
    random draws and plans (greedy, every 3 steps): losses, the kept routes, and the realized per-step
    balancedness (kept tokens per rank) of each dispatch."""
    base_engine, _ = _engine(extra, 0, None)
    base_kept = _kept_routes(base_engine)
    base = _run(base_engine, steps, stream)
    out = {"base_losses": base[0]}
    for dispatch in ("even", "balanced"):
        eplb = {"dynamic_eplb": True, "num_iterations_eplb_update": 3, "num_wait_worker_iterations": 0,
                "eplb_max_plan_wait": 60.0, "eplb_worker_timeout": 60.0, "init_redundancy_expert": 4,
                "eplb_layers_per_step": 2, "eplb_policy": "greedy", "eplb_log_interval": 1,
                "eplb_replica_dispatch": dispatch}  # fmt: skip
        engine, manager = _engine(extra, 0, eplb)
        kept = _kept_routes(engine)
        losses, _, logits = _run(engine, steps, stream)
        committed = [r.completed_step for r in manager.history if r.outcome == "committed"]
        out[dispatch] = {
            "handle_dispatch": engine.eplb_handle.replica_dispatch,
            "loss_rel": _rel(losses, base[0]),
            "eval_diff": float((logits - base[2]).abs().max()),
            "same_drops": len(kept) == len(base_kept)
            and all(torch.equal(a, b) for a, b in zip(kept, base_kept)),
            "committed": committed,
            "placement": engine.eplb_handle.placement.phy2log.tolist(),
            # steps after the first commit: the same placement in both runs, balance set by the dispatch
            "realized": [
                m["eplb/balancedness_realized"]
                for m in manager.realized
                if committed and m["first_step"] > committed[0]
            ],  # fmt: skip
        }
        manager.close()
    return out


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
    # gradient clipping by the logical norm, the same with initialize(eplb=False)
    out["clip"], _, _ = _equivalence(
        rank, ["--moe-top-k", "2", "--capacity-factor", "0.5"], 1, baseline=False, clip=0.05
    )
    for bf16 in (False, True):  # ZeRO 2 without redundant slots: slots move, the run stays bit-identical
        out[f"zero2_bf16{bf16}"], _, _ = _equivalence(
            rank, ["--moe-top-k", "2", "--capacity-factor", "0.5"], 2, bf16, 0
        )
        # ... and with them (buckets reduce-scattered inside backward; EP x expert-DP = 2 x 2: ZERO2 below)
        out[f"zero2_r2_bf16{bf16}"], _, _ = _equivalence(
            rank, ["--moe-top-k", "2", "--capacity-factor", "0.5"], 2, bf16, 2, bucket=ZERO2_BUCKET
        )
    for name, extra in (("capacity", ["--capacity-factor", "1.0"]), ("dropless", ["--no-drop-tokens"])):
        out[f"balance_{name}"] = _dispatch_balance(rank, ["--moe-top-k", "2", *extra])
    out["client_optimizer"] = _client_optimizer_flow(rank)
    out["pitfalls"] = _pitfalls()
    out["per_slot"] = _per_slot_checks(rank)
    tmp = Path(tempfile.gettempdir()) / f"eplb_dsmoe_ckpt_{os.environ['MASTER_PORT']}"
    for stage in (0, 1):
        out[f"ckpt_zero{stage}"] = _checkpoint_checks(rank, tmp / f"z{stage}", stage)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
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
@pytest.mark.parametrize("case", ["capacity", "dropless"])
def test_balanced_dispatch_equals_the_unpatched_layer_and_balances_better_than_even(ep2, case):
    """``balanced`` (the default) for deepspeed.moe: the gate's kept routes and the losses are the unpatched
    layer's (capacity semantics exact), and on the same placements the busiest rank is lighter than with
    the ``even`` split."""
    c = ep2[f"balance_{case}"]
    even, balanced = c["even"], c["balanced"]
    assert (even["handle_dispatch"], balanced["handle_dispatch"]) == ("even", "balanced")
    for run in (even, balanced):
        assert run["loss_rel"] <= 1e-5 and run["eval_diff"] <= 1e-5, run
        assert run["same_drops"], "the EPLB gate kept another set of (token, expert) pairs"
        assert run["committed"], run
    assert even["placement"] == balanced["placement"] and even["committed"] == balanced["committed"]
    assert len(balanced["realized"]) >= 5 and len(balanced["realized"]) == len(even["realized"])
    assert np.mean(balanced["realized"]) > np.mean(even["realized"]), (balanced["realized"], even["realized"])
    assert min(np.subtract(balanced["realized"], even["realized"])) >= -0.02


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
def test_clipping_by_the_logical_norm_with_and_without_eplb(ep2):
    c = ep2["clip"]
    assert c["records"] >= 2 and c["moved"] > 0 and c["same_drops"] and c["loss_rel"] <= 1e-5, c
    base, eplb = c["drop_counts"]
    assert base == eplb and sum(d for _, d in base) > 0  # the unpatched model's read-only handle records too


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True])
def test_zero2_without_redundant_slots_is_bit_identical(ep2, bf16):
    c = ep2[f"zero2_bf16{bf16}"]
    assert c["records"] >= 2 and c["moved"] > 0 and c["bitwise"] and c["same_drops"], c


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True])
def test_zero2_with_redundant_slots_on_ep2(ep2, bf16):
    """EP 2 (expert-DP 1), ZeRO 2 with redundant slots and small buckets: fp32 losses equal to the unpatched
    model's, bf16 within bf16 rounding, the copies bitwise identical (weights, fp32 master, Adam moments)."""
    c = ep2[f"zero2_r2_bf16{bf16}"]
    print(f"bf16={bf16}: largest relative loss difference {c['loss_rel']:.3g}")
    assert c["records"] >= 2 and c["moved"] > 0 and c["replicas"] > 0, c
    assert c["loss_rel"] <= (BF16_REPLICA_RTOL if bf16 else 1e-5), (c["base_losses"], c["eplb_losses"])
    assert c["copies_identical"], c


@pytest.mark.slow
def test_no_megatron_core_needed(ep2):
    """Megatron-DeepSpeed users need not have megatron-core: the whole run never imported it."""
    assert ep2["megatron_core_imported"] == []


# ============================================================================ EP = 2 x expert-DP = 2


def _ep2_dp2_checks(rank, world):
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import groups

    os.environ.update(ENV)
    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    drop = ["--capacity-factor", "0.5"]
    out["zero1_k2"], engine, _ = _equivalence(rank, ["--moe-top-k", "2", *drop], stage=1)
    out["layout"] = (
        dist.get_process_group_ranks(engine.eplb_handle.ep_group),
        groups._get_expert_data_parallel_group_ranks("ep_size_2"),
    )
    out["zero0_k1"], _, _ = _equivalence(rank, ["--moe-top-k", "1", *drop], stage=0)
    # DeepSpeed's other layout (ds_config use_data_before_expert_parallelism): groups made afresh
    for table in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                  groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):  # fmt: skip
        table.pop("ep_size_2", None)
    out["data_before_k2"], engine, _ = _equivalence(
        rank, ["--moe-top-k", "2", *drop], stage=1, data_before=True
    )
    out["layout_data_before"] = dist.get_process_group_ranks(engine.eplb_handle.ep_group)
    out.update(_zero2_replica_checks(rank))
    return out


# ZeRO 2 with replicas on EP 2 x expert-DP 2: three MoE layers, so ZeRO's expert-DP partitions split a layer's
# slots between the two expert-DP ranks, and _move_policy, so the copies of an expert have their partition
# pieces on different expert-DP ranks; small buckets, so DeepSpeed reduce-scatters them inside backward.
# Without the hold-back, a copy's gradient is reduce-scattered (and freed on the ranks that do not own its
# partition) before the replica sum: the copies then diverge (ZERO2_UNHELD shows it).
ZERO2_BUCKET = 4096  # elements; one expert of SMALL has 1072
ZERO2 = {  # case: _equivalence's arguments besides the ZeRO 2 layout
    "zero2_fp32_k2": {"extra": ["--moe-top-k", "2", "--capacity-factor", "0.5"]},
    "zero2_fp32_k1_gas2": {"extra": ["--moe-top-k", "1", "--capacity-factor", "0.5"], "gas": 2},
    "zero2_bf16_k2_gas2": {"extra": ["--moe-top-k", "2"], "bf16": True, "gas": 2},
    # clipping by the logical norm (full gradients gathered from ZeRO's partitions): against initialize(eplb=False)
    "zero2_fp32_k2_clip": {"extra": ["--moe-top-k", "2", "--capacity-factor", "0.5"], "clip": 0.05, "baseline": False},
}  # fmt: skip
ZERO2_UNHELD = "zero2_fp32_k2_unheld"


def _zero2_equivalence(stream, extra, gas=1, **kwargs) -> dict:
    layout = {"bucket": ZERO2_BUCKET, "policy_fn": _move_policy, "gas": gas, "steps": STEPS * gas}
    return _equivalence(stream, [*extra, "--num-layers", "3"], 2, **layout, **kwargs)[0]


def _zero2_replica_checks(stream) -> dict:
    from megatron_eplb.patches.deepspeed import engine as ds_engine

    out = {case: _zero2_equivalence(stream, **kwargs) for case, kwargs in ZERO2.items()}
    hold_back = ds_engine.hold_back_reductions
    # the feature removed: DeepSpeed reduce-scatters the expert gradients as soon as they are ready
    ds_engine.hold_back_reductions = lambda engine, params: None
    try:
        out[ZERO2_UNHELD] = _zero2_equivalence(stream, **ZERO2["zero2_fp32_k2"])
    finally:
        ds_engine.hold_back_reductions = hold_back
    return out


@pytest.fixture(scope="module")
def ep2_dp2():
    from dist import run_distributed

    return run_distributed(_ep2_dp2_checks, 4, timeout=900, env=ENV)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["zero1_k2", "zero0_k1", "data_before_k2"])
def test_ep2_x_dp2_equals_the_unpatched_layer(ep2_dp2, case):
    for rank, out in enumerate(ep2_dp2):
        c = out[case]
        assert c["records"] >= 2 and c["moved"] > 0, (rank, c)
        assert c["loss_rel"] <= 1e-5, (rank, c["base_losses"], c["eplb_losses"])
        assert c["eval_diff"] <= 1e-5 and c["same_drops"] and c["dropped_routes"] > 0, (rank, c)
    # DeepSpeed's groups: EP over consecutive ranks, expert-DP strided; the other layout the other way round
    assert [list(o["layout"][0]) for o in ep2_dp2] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [list(o["layout"][1]) for o in ep2_dp2] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [list(o["layout_data_before"]) for o in ep2_dp2] == [[0, 2], [1, 3], [0, 2], [1, 3]]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ZERO2))
def test_zero2_with_replicas_equals_the_unpatched_layer(ep2_dp2, case):
    """ZeRO 2 with redundant slots on EP 2 x expert-DP 2 (buckets reduce-scattered inside backward, the copies'
    partition pieces on different ranks, slots moved): fp32 losses equal to the unpatched DeepSpeed model's
    (with clipping: ``initialize(eplb=False)``'s, which clips by the same logical norm), bf16 within bf16
    rounding; every copy bitwise the same in weights, fp32 master and Adam moments."""
    bf16 = "bf16" in case
    print(case, "largest relative loss difference", max(out[case]["loss_rel"] for out in ep2_dp2))
    for rank, out in enumerate(ep2_dp2):
        c = out[case]
        assert c["records"] >= 2 and c["moved"] > 0 and c["replicas"] > 0, (rank, c)
        tol = BF16_REPLICA_RTOL if bf16 else 1e-5
        assert c["loss_rel"] <= tol, (rank, c["base_losses"], c["eplb_losses"])
        assert bf16 or c["eval_diff"] <= 1e-5, (rank, c["eval_diff"])  # outputs at evaluation after the moves
        assert c["copies_identical"], (rank, "the copies of an expert diverged")


@pytest.mark.slow
def test_zero2_replicas_need_the_hold_back(ep2_dp2):
    """The same run with DeepSpeed's in-backward reduction not held back: the copies diverge (this layout
    really reduce-scatters expert gradients before the replica sum)."""
    unheld = [out[ZERO2_UNHELD] for out in ep2_dp2]
    print("without the hold-back: relative loss differences", [c["loss_rel"] for c in unheld])
    assert not all(c["copies_identical"] for c in unheld), unheld
    assert max(c["loss_rel"] for c in unheld) > 1e-5, [c["loss_rel"] for c in unheld]


# ============================================================================ per-slot capacity


def _drop_run(stream, extra, capacity, redundancy, steps=12):
    """Per-step share of dropped (token, expert) pairs over both ranks, under dynamic EPLB (greedy policy:
    replicas of the hottest experts) with ``eplb_capacity=capacity``; and the losses."""
    import torch.distributed as dist

    cfg = {**DYN, "num_iterations_eplb_update": 3, "init_redundancy_expert": redundancy,
           "eplb_capacity": capacity, "eplb_policy": "greedy"}  # fmt: skip
    engine, manager = _engine(extra, 0, cfg)
    handle = engine.eplb_handle
    rates, losses = [], []
    for step in range(steps):
        tokens, labels = _batch(step, stream)
        torch.manual_seed(1000 + step)
        handle.reset_drop_counts()
        loss = engine(tokens, labels)
        engine.backward(loss)
        counts = handle.drop_counts().sum(dim=0).clone()
        dist.all_reduce(counts)
        rates.append(float(counts[1]) / float(counts[0]))
        engine.step()
        losses.append(float(loss.detach()))
    manager.close()
    return {
        "rates": rates,
        "losses": losses,
        "committed": sum(r.outcome == "committed" for r in manager.history),
        "dispatch": handle.replica_dispatch,
    }


def _per_slot_checks(stream):
    out = {}
    for k in (1, 2):
        extra = ["--moe-top-k", str(k), "--capacity-factor", "1.0"]
        out[f"k{k}_logical"] = _drop_run(stream, extra, "logical", 2)
        out[f"k{k}_per_slot"] = _drop_run(stream, extra, "per_slot", 2)
    # one copy per expert: per-slot capacity is the logical one; top-2 drops by position either way
    out["k2_per_slot_r0"], _, _ = _equivalence_per_slot_r0(stream)
    return out


def _equivalence_per_slot_r0(stream):
    extra = ["--moe-top-k", "2", "--capacity-factor", "0.5"]
    base_engine, _ = _engine(extra, 0, None)
    base_kept = _kept_routes(base_engine)
    base = _run(base_engine, STEPS, stream)
    cfg = {**DYN, "init_redundancy_expert": 0, "eplb_capacity": "per_slot"}
    engine, manager = _engine(extra, 0, cfg, policy_fn=_shift_policy)
    kept = _kept_routes(engine)
    eplb = _run(engine, STEPS, stream)
    manager.close()
    same = len(kept) == len(base_kept) and all(torch.equal(a, b) for a, b in zip(kept, base_kept))
    return {"loss_rel": _rel(eplb[0], base[0]), "same_drops": same, "records": eplb[1]}, engine, manager


@pytest.mark.slow
def test_per_slot_capacity_without_replicas_is_the_logical_capacity(ep2):
    c = ep2["per_slot"]["k2_per_slot_r0"]
    assert c["records"] >= 2 and c["same_drops"] and c["loss_rel"] <= 1e-5, c


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2])
def test_per_slot_capacity_drops_fewer_tokens(ep2, k):
    """Measured: the share of (token, expert) pairs dropped per step with replicas of the hot experts, per-slot
    capacity against the default (logical capacity = the unpatched layer's drops), same model and batches."""
    logical, per_slot = ep2["per_slot"][f"k{k}_logical"], ep2["per_slot"][f"k{k}_per_slot"]
    assert logical["committed"] >= 2 and per_slot["committed"] >= 2
    after = slice(3, None)  # after the first rebalance put replicas on the hot experts
    mean_logical = float(np.mean(logical["rates"][after]))
    mean_per_slot = float(np.mean(per_slot["rates"][after]))
    print(
        f"top-{k}: dropped per step {mean_logical:.4f} (logical capacity) vs {mean_per_slot:.4f} (per slot)"
    )
    assert mean_per_slot < mean_logical
    assert all(np.isfinite(per_slot["losses"]))
    # per-slot capacity splits replicas evenly (keeps the most pairs); the default dispatch serves logical
    assert (logical["dispatch"], per_slot["dispatch"]) == ("balanced", "even")


# ============================================================================ checkpoints


def _logical_optim(engine):
    from megatron_eplb.patches.deepspeed import DeepSpeedSlotState

    from megatron_eplb.checkpoint import logical_optimizer_state

    return logical_optimizer_state(engine.module, engine.eplb_handle, DeepSpeedSlotState(engine))


def _optim_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(
        set(a[k]) == set(b[k])
        and all(torch.allclose(a[k][s].float(), b[k][s].float(), atol=1e-7) for s in a[k])
        for k in a
    )


def _train_more(engine, steps, stream, first=100):
    losses = []
    for step in range(first, first + steps):
        tokens, labels = _batch(step, stream)
        torch.manual_seed(1000 + step)
        loss = engine(tokens, labels)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def _checkpoint_checks(stream, tmp: Path, stage: int):
    import torch.distributed as dist
    from megatron_eplb.patches import deepspeed_moe as eplb_dsmoe

    out = {}
    extra = ["--moe-top-k", "2", "--capacity-factor", "0.5"]
    engine, manager = _engine(extra, stage, dict(DYN), policy_fn=_shift_policy)
    _run(engine, 6, stream)
    ref_eval, ref_optim = _eval(engine, stream), _logical_optim(engine)
    out["moved"] = sum(r.outcome == "committed" for r in manager.history)
    out["replicas"] = int((engine.eplb_handle.placement.replica_count > 1).sum())
    # --- the logical checkpoint: EPLB -> the model without EPLB -> EPLB with another slot count
    eplb_dsmoe.save_checkpoint(engine, manager, tmp / "logical", tag="a")
    plain, _ = _engine(extra, stage, False)
    info = eplb_dsmoe.load_checkpoint(plain, None, tmp / "logical")
    out["to_plain"] = {
        "eval": float((_eval(plain, stream) - ref_eval).abs().max()),
        "optim": _optim_equal(_logical_optim(plain), ref_optim),
        "global_steps": plain.global_steps,
        "action": info["placement"]["action"],
    }
    eplb_dsmoe.save_checkpoint(plain, None, tmp / "logical", tag="b")
    other, other_manager = _engine(extra, stage, {**DYN, "init_redundancy_expert": 4})
    info = eplb_dsmoe.load_checkpoint(other, other_manager, tmp / "logical", tag="b")
    out["back"] = {
        "eval": float((_eval(other, stream) - ref_eval).abs().max()),
        "optim": _optim_equal(_logical_optim(other), ref_optim),
        "action": info["placement"]["action"],
        "slots": other.eplb_handle.num_slots,
    }
    other_manager.close()
    # --- engine.save_checkpoint / load_checkpoint: exact resume into a fresh EPLB engine
    engine.save_checkpoint(str(tmp / "native"), tag="n", client_state={"mine": 7})
    resumed, resumed_manager = _engine(extra, stage, dict(DYN), policy_fn=_shift_policy)
    _, client = resumed.load_checkpoint(str(tmp / "native"))
    out["native"] = {
        "placement": resumed.eplb_handle.placement == engine.eplb_handle.placement,
        "client": {
            k: v
            for k, v in client.items()
            if not torch.is_tensor(v) and k in ("mine", "megatron_eplb_step_count")
        },
        "step": (resumed_manager.step_count, manager.step_count),
        "eval": float((_eval(resumed, stream) - ref_eval).abs().max()),
        "optim": _optim_equal(_logical_optim(resumed), ref_optim),
        "files": sorted(p.name for p in (tmp / "native" / "n").iterdir() if p.name.startswith("layer_")),
    }
    # ... into an EPLB engine with another slot count: from the logical checkpoint beside DeepSpeed's files
    wider, wider_manager = _engine(extra, stage, {**DYN, "init_redundancy_expert": 4})
    _, meta = wider.load_checkpoint(str(tmp / "native"))
    out["native_other_slots"] = {
        "action": meta["placement"]["action"],
        "eval": float((_eval(wider, stream) - ref_eval).abs().max()),
        "optim": _optim_equal(_logical_optim(wider), ref_optim),
        "steps": (wider.global_steps, wider_manager.step_count),
    }
    wider_manager.close()
    a, b = _train_more(engine, 4, stream), _train_more(resumed, 4, stream)
    out["native"]["continue_equal"] = a == b
    out["native"]["moved_after_resume"] = sum(r.outcome == "committed" for r in resumed_manager.history)
    resumed_manager.close()
    # --- plain DeepSpeed (no megatron-eplb at all) reads the EPLB model's engine.save_checkpoint weights
    raw, _ = _engine(extra, stage, None)
    raw.load_checkpoint(str(tmp / "native"), load_optimizer_states=False)
    out["raw_reads_native"] = float((_eval(raw, stream) - ref_eval).abs().max())
    # ... and its own engine.save_checkpoint loads into EPLB engines (weights; optimizer too without redundancy)
    _train_more(raw, 1, stream, first=200)
    raw_eval, raw_optim = _eval(raw, stream), _logical_optim_raw(raw)
    raw.save_checkpoint(str(tmp / "raw"), tag="r")
    for redundancy in (2, 0):
        eplb_engine, eplb_manager = _engine(extra, stage, {**DYN, "init_redundancy_expert": redundancy})
        eplb_engine.load_checkpoint(str(tmp / "raw"))
        out[f"raw_to_eplb_r{redundancy}"] = {
            "eval": float((_eval(eplb_engine, stream) - raw_eval).abs().max()),
            "optim": _optim_equal(_logical_optim(eplb_engine), raw_optim),
        }
        eplb_manager.close()
    manager.close()
    dist.barrier()
    return out


def _logical_optim_raw(engine):
    """The logical optimizer state of an engine built without megatron-eplb (read through attach())."""
    from megatron_eplb.patches.deepspeed import DeepSpeedSlotState
    from megatron_eplb.patches.deepspeed_moe import attach

    from megatron_eplb.checkpoint import logical_optimizer_state

    return logical_optimizer_state(engine.module, attach(engine.module), DeepSpeedSlotState(engine))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
def test_logical_checkpoint_to_the_model_without_eplb_and_back(ep2, stage):
    c = ep2[f"ckpt_zero{stage}"]
    assert c["moved"] >= 2 and c["replicas"] > 0  # saved after slot-moving rebalances, with replicas
    plain = c["to_plain"]
    assert plain["eval"] <= 1e-5 and plain["optim"] and plain["global_steps"] == 6, plain
    assert plain["action"] == "kept"  # DeepSpeed's own layout is filled, never re-placed
    back = c["back"]
    # the model without EPLB saved DeepSpeed's own layout (8 slots, no recorded load): 12 slots start default
    assert back["slots"] == 12 and back["action"] == "kept", back
    assert back["eval"] <= 1e-5 and back["optim"], back


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
def test_engine_save_and_load_checkpoint_lose_nothing(ep2, stage):
    n = ep2[f"ckpt_zero{stage}"]["native"]
    assert n["placement"] and n["step"] == (6, 6) and n["client"] == {"mine": 7}, n
    assert n["eval"] == 0.0 and n["optim"], n
    assert n["continue_equal"] and n["moved_after_resume"] >= 1, n  # the same next steps, rebalances included
    w = ep2[f"ckpt_zero{stage}"]["native_other_slots"]  # 10 slots saved, 12 now: re-planned from the load
    assert w["action"] == "replanned" and w["eval"] <= 1e-5 and w["optim"] and w["steps"] == (6, 6), w
    # DeepSpeed's expert files hold logical experts: 8 per layer, none for the 2 redundant slots
    assert len(n["files"]) == 2 * 8 and all(f"_expert_{e}_" in " ".join(n["files"]) for e in range(8))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
def test_native_checkpoints_between_plain_deepspeed_and_eplb(ep2, stage):
    c = ep2[f"ckpt_zero{stage}"]
    assert c["raw_reads_native"] <= 1e-5  # plain deepspeed.initialize reads the EPLB model's weights
    r2, r0 = c["raw_to_eplb_r2"], c["raw_to_eplb_r0"]
    assert r2["eval"] <= 1e-5 and r0["eval"] <= 1e-5, c
    assert r0["optim"], r0  # DeepSpeed's own layout (no redundant slot): the optimizer state loads too


# ============================================================================ the example, launched


LAUNCH_ITERS = 30


def _launch(args: list[str], num_gpus: int, timeout: int = 400):
    import subprocess

    from demo import launcher
    from dist import free_port

    cmd = launcher()
    if "--master_port" not in cmd:
        cmd += ["--master_port", str(free_port())]
    cmd += ["--num_gpus", str(num_gpus), "examples/train_deepspeed_moe.py", *args]
    env = {
        **os.environ,
        **ENV,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """``deepspeed --num_gpus 2 examples/train_deepspeed_moe.py`` with dynamic EPLB, then a resume of its
    ``engine.save_checkpoint`` on one rank (EP = 1)."""
    out = tmp_path_factory.mktemp("dsmoe")
    common = ["--num-layers", "2", "--hidden-size", "32", "--num-experts", "8", "--ffn-hidden-size", "64",
              "--seq-length", "32", "--micro-batch-size", "4", "--deepspeed_config", "configs/ds_config.json",
              "--no-wandb", "--log-interval", "5", "--output-dir", str(out)]  # fmt: skip
    log = _launch(
        [
            *common,
            "--train-iters",
            str(LAUNCH_ITERS),
            "--dynamic-eplb",
            "--num-iterations-eplb-update",
            "8",
            "--num-wait-worker-iterations",
            "1",
            "--eplb-max-plan-wait",
            "60",
            "--eplb-window-size",
            "8",
            "--eplb-log-interval",
            "5",
            "--save",
            str(out / "ckpt"),
            "--metrics-out",
            str(out / "metrics.json"),
        ],  # fmt: skip
        2,
    )
    resumed = _launch(
        [
            *common,
            "--train-iters",
            "3",
            "--load",
            str(out / "ckpt"),
            "--metrics-out",
            str(out / "resumed.json"),
        ],
        1,
    )
    import json

    return (
        out,
        json.loads((out / "metrics.json").read_text()),
        log,
        json.loads((out / "resumed.json").read_text()),
        resumed,
    )


@pytest.mark.slow
def test_example_trains_with_dynamic_eplb_under_the_launcher(launched):
    out, metrics, log, _, _ = launched
    losses = metrics["losses"]
    assert len(losses) == LAUNCH_ITERS and all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert sum(r["outcome"] == "committed" for r in metrics["rebalances"]) >= 2, log[-3000:]
    assert metrics["realized_balancedness"] and len(metrics["drop_rates"]) == LAUNCH_ITERS
    assert "==> summary" in log and "realized balancedness per step, all steps" in log
    assert "pairs dropped by the capacity" in log
    tag = out / "ckpt" / "final"  # DeepSpeed's checkpoint, with the map and the logical checkpoint beside
    assert (tag / "eplb" / "expert_map.json").is_file() and (tag / "eplb" / "model_logical.pt").is_file()
    assert (out / "ckpt" / "latest").read_text().strip() == "final"


@pytest.mark.slow
def test_example_resumes_its_checkpoint_on_one_rank(launched):
    """engine.load_checkpoint of the 2-rank run's checkpoint at EP = 1 (10 slots on one rank): re-planned
    from the recorded load, every logical expert and its optimizer state from the logical part."""
    _, metrics, _, resumed, log = launched
    assert len(resumed["placement"][0]) == 10 and sorted(set(resumed["placement"][0])) == list(range(8))
    assert all(np.isfinite(resumed["losses"]))
    assert resumed["losses"][0] < metrics["losses"][0] - 0.5  # it continues from the trained weights


# ============================================================================ Megatron-DeepSpeed's order


def _client_optimizer_flow(stream):
    """Megatron-DeepSpeed builds its optimizer before ``deepspeed.initialize``: ``apply`` first, then the
    optimizer over the patched model, then ``initialize(optimizer=..., handle=...)``; against the unpatched
    model with the same client optimizer."""
    import deepspeed
    import train_deepspeed_moe as ex
    from megatron_eplb.patches import deepspeed_moe as eplb_dsmoe

    from megatron_eplb.config import EPLBConfig

    eplb = EPLBConfig.from_dict(DYN)
    extra = ["--moe-top-k", "2", "--capacity-factor", "0.5"]
    cfg = {k: v for k, v in _ds_config(0).items() if k != "optimizer"}
    losses = []
    for with_eplb in (False, True):
        model = ex.build_model(_args(extra), 2)
        handle = eplb_dsmoe.apply(model, config=eplb) if with_eplb else None
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if with_eplb:
            engine, _, _, _, manager = eplb_dsmoe.initialize(
                model=model,
                config=cfg,
                eplb=eplb,
                handle=handle,
                optimizer=optimizer,
                policy_fn=_shift_policy,
            )
        else:
            engine, *_ = deepspeed.initialize(model=model, config=cfg, optimizer=optimizer)
        losses.append(_run(engine, 6, stream)[0])
    manager.close()
    return {
        "loss_rel": _rel(losses[1], losses[0]),
        "moved": sum(r.outcome == "committed" for r in manager.history),
    }


@pytest.mark.slow
def test_megatron_deepspeed_order_apply_then_optimizer_then_initialize(ep2):
    c = ep2["client_optimizer"]
    assert c["moved"] >= 2 and c["loss_rel"] <= 1e-5, c


# ============================================================================ refusals


def test_example_checks_its_outputs_before_deepspeed_starts(tmp_path, monkeypatch):
    """``--save`` / ``--metrics-out`` that cannot be written: one line, before the process group or model."""
    import train_deepspeed_moe as ex

    monkeypatch.setattr(ex, "init_distributed", lambda: (_ for _ in ()).throw(AssertionError("too late")))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = [*SMALL, "--no-wandb", "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        ex.main([*argv, "--save", str(blocker / "ckpt"), "--metrics-out", str(tmp_path)])
    text = str(exc.value.code)
    assert (
        text.startswith("train_deepspeed_moe.py: error: ") and "--save" in text and "is not writable" in text
    ), text
    assert f"--metrics-out {str(tmp_path)!r} is a directory" in text, text


def _pitfalls() -> dict:
    import train_deepspeed_moe as ex
    from megatron_eplb.patches import deepspeed_moe as eplb_dsmoe

    def error(fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            return f"{type(exc).__name__}: {exc}"
        return None

    out = {}
    tutel = ex.build_model(_args(), 2)
    tutel.blocks[0].moe.deepspeed_moe.use_tutel = True
    out["tutel"] = error(lambda: eplb_dsmoe.apply(tutel))
    out["zero3"] = error(lambda: _engine([], 3, {}))
    out["capacity"] = error(lambda: _engine([], 0, {"eplb_capacity": "slots"}))
    out["dispatch"] = error(lambda: eplb_dsmoe.apply(ex.build_model(_args(), 2), replica_dispatch="lp"))
    twice = ex.build_model(_args(), 2)
    eplb_dsmoe.apply(twice)
    out["twice"] = error(lambda: eplb_dsmoe.apply(twice))
    return out


@pytest.mark.slow
def test_unsupported_setups_are_clear_errors(ep2):
    c = ep2["pitfalls"]
    assert "use_tutel=True is not supported" in c["tutel"]
    assert "zero_optimization.stage=3 is not supported" in c["zero3"]
    assert "supported stages: 0, 1, 2" in c["zero3"]
    assert "eplb_capacity" in c["capacity"] and "per_slot" in c["capacity"]
    assert "replica_dispatch='lp' is not supported" in c["dispatch"]
    assert "supported: balanced, even, local_first" in c["dispatch"]
    assert "already called" in c["twice"]
