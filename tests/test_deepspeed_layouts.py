"""DeepSpeed layouts beyond EP x DP at ZeRO 0/1: ZeRO 2 (fp32 and bf16) on EP2 x DP2, TP2 x EP2 with sequence
parallelism, a logical checkpoint carried across layouts (TP2 x EP2 -> EP2 x DP2 -> TP2 x EP2), and serving
that checkpoint with TP 2 without sequence parallelism (examples/generate.py) against the unpatched model.

One 4-process launch (gloo, CPU) runs every check; each check trains the tiny GPT MoE of test_deepspeed.py
for a few steps under ``eplb_ds.initialize``, without EPLB and with EPLB moving slots every 3 steps, and
compares.  ZeRO 2 gets a small ``reduce_bucket_size`` so that DeepSpeed reduce-scatters buckets inside
backward (with one bucket everything would wait for the end of backward and hide a late replica sum).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "examples"))

from models import copies_identical, engine_train_step  # noqa: E402
from test_deepspeed import (  # noqa: E402
    BF16_REPLICA_RTOL,
    ENV,
    SMALL,
    _logical_state,
    _rel,
    _shift_policy,
    _state_diff,
)

# Three MoE layers: ZeRO's expert-DP partitions then split a layer's slots between two ranks, so the copies of
# an expert can have their partition pieces on different ranks (with two layers each partition is one layer)
LAYERS = 3
MODEL = ["--num-layers", str(LAYERS), *SMALL[2:]]
GEN_MODEL = MODEL[: MODEL.index("--micro-batch-size")]  # examples/generate.py's model flags
STEPS = 8
B, T = 2, 32  # micro-batch and sequence length of SMALL
TOPK = 2
# eplb_max_plan_wait: the due step waits for the plan (a policy worker starting on a loaded 2-core machine can
# miss the default 1 s, and these tests count the rebalances of 8 steps)
DYN = {"dynamic_eplb": True, "num_iterations_eplb_update": 3, "num_wait_worker_iterations": 0,
       "init_redundancy_expert": 2, "eplb_layers_per_step": 2, "eplb_max_plan_wait": 25.0}  # fmt: skip


def _move_policy(load, num_slots, num_ranks, previous=None, **kwargs):
    """A test policy that always moves experts: roll every layer's slots by one rank's worth plus one, then
    reverse rank 0's slots, so the copies of an expert do not keep one local slot index on every rank (their
    ZeRO partition pieces then live on different data-parallel ranks)."""
    phy2log = _shift_policy(load, num_slots, num_ranks, previous)
    per_rank = num_slots // num_ranks
    phy2log[:, :per_rank] = phy2log[:, :per_rank][:, ::-1].copy()
    return phy2log


def _ds_config(tmp: Path, stage: int, bf16: bool) -> str:
    cfg = json.loads((REPO / "configs" / "ds_config.json").read_text())
    cfg.pop("eplb")
    cfg["zero_optimization"] = {"stage": stage, "reduce_bucket_size": 4096, "allgather_bucket_size": 4096}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    path = tmp / f"ds_z{stage}{'_bf16' if bf16 else ''}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _layout(tp: int, ep: int) -> None:
    """Megatron's parallel state for TP ``tp`` x EP ``ep`` (expert TP 1) on the 4 ranks."""
    import train
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    train.init_parallel(ep, 1234, tp)


def _engine(tp: int, ep: int, ds: str, eplb, policy_fn=None):
    import train
    from megatron_eplb.patches import deepspeed as eplb_ds

    _layout(tp, ep)
    argv = [*MODEL, "--tensor-model-parallel-size", str(tp), "--expert-model-parallel-size", str(ep),
            "--deepspeed_config", ds, "--gradient-clipping", "0.5", "--no-wandb"]  # fmt: skip
    if tp > 1:
        argv.append("--sequence-parallel")
    args = train.parse_args(argv)
    net = train.build_model(args, ep)
    engine, _, _, _, manager = eplb_ds.initialize(
        model=net, config=train.ds_config_for(args), eplb=eplb, args=args, policy_fn=policy_fn
    )
    return engine, manager


def _train(tp: int, ep: int, ds: str, eplb, policy_fn=None, steps: int = STEPS, half: bool = False):
    """Train ``steps`` steps on random tokens, the same global batch in every layout: data-parallel replica
    ``d`` reads rows seeded by ``d`` (its TP ranks read the same rows); ``half``: TP 1 reference in which
    ranks ``2d`` and ``2d + 1`` each read one half of replica ``d``'s rows of the TP 2 layout."""
    import torch
    import torch.distributed as dist
    import train
    from megatron.core import parallel_state as ps

    engine, manager = _engine(tp, ep, ds, eplb, policy_fn)
    replica = dist.get_rank() // 2 if half else ps.get_data_parallel_rank()
    gen = torch.Generator().manual_seed(1000 + replica)
    rows = slice((dist.get_rank() % 2) * B // 2, (dist.get_rank() % 2 + 1) * B // 2) if half else slice(0, B)
    b = rows.stop - rows.start
    pos = torch.arange(T)[None].expand(b, -1)
    losses, records, loads = [], 0, []
    for _ in range(steps):
        tok = torch.randint(0, 256, (B, T + 1), generator=gen)[rows]
        loss, recorded = engine_train_step(engine, tok, pos, train.causal_mask(T))
        losses.append(loss)
        records += recorded
        if manager is not None:
            logical, _ = manager.window.gather_steps(1)
            loads.append(logical[0].sum(axis=1).tolist())  # tokens x top-k routed per MoE layer this step
    # the outputs at evaluation (eval mode, no grad, load recording paused) on a batch of its own
    engine.eval()
    if manager is not None:
        manager.handle.recording = False
    tok = torch.randint(0, 256, (B, T + 1), generator=torch.Generator().manual_seed(99 + replica))[rows]
    with torch.no_grad():
        value = engine(tok[:, :-1], pos, train.causal_mask(T), labels=tok[:, 1:]).float().mean()
    dist.all_reduce(value)
    engine.train()
    if manager is not None:
        manager.handle.recording = True
    out = {"losses": losses, "records": records, "loads": loads, "eval": float(value) / dist.get_world_size()}
    return engine, manager, out


def _logical(engine, manager) -> dict:
    """``{logical param name: {"weight", "fp32", "exp_avg", ...}}`` of the logical model (collective)."""
    from megatron_eplb.patches import deepspeed as eplb_ds

    from megatron_eplb.checkpoint import logical_optimizer_state

    weights = manager.handle.logical_state_dict()
    optim = logical_optimizer_state(engine.module, manager.handle, eplb_ds.DeepSpeedSlotState(engine))
    return {k: {"weight": weights[k].detach().float().cpu(), **v} for k, v in optim.items()}


def _copies_identical(engine, manager) -> bool:
    """Every copy of a logical expert holds bitwise the same weights and optimizer state (DeepSpeed's fp32
    master and Adam moments, whole: under ZeRO assembled from the expert-DP ranks' partition pieces), and every
    expert-DP replica holds the same slots (EP2 x DP2 and TP2 x EP2 on 4 ranks: expert-DP 2).  Collective over
    the EP and expert-DP groups."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron_eplb.patches import deepspeed as eplb_ds

    handle = manager.handle
    if not copies_identical(handle, eplb_ds.DeepSpeedSlotState(engine)):
        return False
    local = torch.cat(
        [
            t.detach().reshape(-1).float().cpu()
            for layer in range(handle.num_layers)
            for k in range(handle.slots_per_rank)
            for t in handle.slot_tensors(layer, k)
        ]
    )
    edp = ps.get_expert_data_parallel_group()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(edp))]
    dist.all_gather(parts, local, group=edp)
    return len(parts) >= 2 and all(
        torch.equal(parts[0], q) for q in parts
    )  # expert-DP 2 in every layout here


def _same_everywhere(value) -> bool:
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return all(p == parts[0] for p in parts)


def _tp_replicas_identical(engine) -> bool:
    """Parameters kept whole on every TP rank (layernorms, router) hold the same values on every TP rank."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    for p in engine.module.parameters():
        if getattr(p, "tensor_model_parallel", False) or getattr(p, "allreduce", True) is False:
            continue
        parts = [torch.empty_like(p.data) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, p.data.contiguous(), group=group)
        if not all(torch.equal(parts[0], q) for q in parts):
            return False
    return True


def _zero2_checks(tmp: Path) -> dict:
    out = {}
    for dtype in ("fp32", "bf16"):
        ds = _ds_config(tmp, 2, dtype == "bf16")
        engine, manager, base = _train(1, 2, ds, False)
        out[dtype] = {"base": base, "optimizer": type(engine.optimizer).__name__}
        ref = _logical_state(engine, None) if dtype == "fp32" else None
        runs = {"moves_r2": DYN} if dtype == "fp32" else {"moves_r0": {**DYN, "init_redundancy_expert": 0},
                                                             "moves_r2": DYN}  # fmt: skip
        for name, cfg in runs.items():
            engine, manager, run = _train(1, 2, ds, cfg, _move_policy)
            run["copies_identical"] = _copies_identical(engine, manager)
            run["replicas"] = int((manager.handle.placement.replica_count > 1).sum())
            if (
                ref is not None
            ):  # every logical expert's weights, fp32 master and Adam moments vs the run without
                run["state_diff"] = _state_diff(_logical(engine, manager), ref)
            manager.close()
            out[dtype][name] = run
    return out


def _tp_checks(tmp: Path) -> dict:
    import torch.distributed as dist

    ds = _ds_config(tmp, 2, False)
    out = {}
    _, _, out["reference"] = _train(
        1, 2, _ds_config(tmp, 1, False), False, half=True
    )  # TP 1, DP 4, same batch
    _, _, out["base"] = _train(2, 2, ds, False)
    engine, manager, run = _train(2, 2, ds, DYN, _move_policy)
    run["copies_identical"] = _copies_identical(engine, manager)
    run["tp_replicas_identical"] = _tp_replicas_identical(engine)
    run["placement_everywhere"] = _same_everywhere(manager.handle.placement.phy2log.tolist())
    run["replicas"] = int((manager.handle.placement.replica_count > 1).sum())
    run["groups"] = {
        "ep": dist.get_process_group_ranks(manager.handle.ep_group),
        "load": dist.get_world_size(manager.load_group),
    }
    out["eplb"] = run
    out["ckpt"] = _checkpoint_checks(tmp, engine, manager)
    manager.close()
    out["generate"] = _generate_tp_checks(tmp)
    return out


def _generate_tp_checks(tmp: Path) -> dict:
    """Serving with attention TP 2 and no sequence parallelism (examples/generate.py's functions): the TP2 x
    EP2 checkpoint (slots moved, replicas) with its map against Megatron's own layout of the same checkpoint;
    every routed token counted once, not once per TP rank (the TP ranks route the same tokens)."""
    import generate
    import torch
    import torch.distributed as dist
    import train
    from megatron.core import parallel_state as ps

    _layout(2, 2)
    flags = ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"]
    args = generate.parse_args([*GEN_MODEL, *flags, "--load", str(tmp / "ckpt_tp2"), "--tag", "t"])
    ckpt = tmp / "ckpt_tp2" / "t"
    placement, _ = generate.resolve_placement(args, ckpt)
    gen = torch.Generator().manual_seed(7 + ps.get_data_parallel_rank())  # the same prompts on both TP ranks
    prompts = torch.randint(0, 256, (B, 16), generator=gen)
    out, tokens, logits = {}, {}, {}
    for name, where in (("eplb", placement), ("unpatched", None)):
        model, handle, _ = generate.load_model(args, 2, ckpt, where)
        if handle is not None:
            handle.reset_loads()
        tokens[name], _ = generate.greedy_generate(model, prompts, 4, T)
        if handle is not None:
            routed = handle.loads().sum(dim=1)  # [L]: (token, expert) pairs this rank counted
            dist.all_reduce(routed)
            out["routed"] = routed.tolist()
            out["replicas"] = int((placement.replica_count > 1).sum())
        with torch.no_grad():
            logits[name] = model(prompts, torch.arange(16)[None].expand(B, -1), train.causal_mask(16),
                                 runtime_gather_output=True)  # fmt: skip
    out["tokens_equal"] = bool(torch.equal(tokens["eplb"], tokens["unpatched"]))
    out["logits_rel"] = float(
        (logits["eplb"] - logits["unpatched"]).abs().max() / logits["unpatched"].abs().max()
    )
    return out


def _checkpoint_checks(tmp: Path, engine, manager) -> dict:
    """TP2 x EP2 (trained, slots moved, replicas) -> EP2 x DP2 (another placement) -> TP2 x EP2 again."""
    import torch
    from megatron_eplb.patches import deepspeed as eplb_ds

    def equal(a: dict, b: dict) -> bool:
        return set(a) == set(b) and all(
            set(a[k]) == set(b[k]) and all(torch.equal(a[k][s], b[k][s]) for s in b[k]) for k in b
        )

    out = {}
    saved = _logical(engine, manager)
    eplb_ds.save_checkpoint(engine, manager, tmp / "ckpt_tp2", tag="t")
    ds = _ds_config(tmp, 2, False)
    engine1, manager1 = _engine(1, 2, ds, {"init_redundancy_expert": 0})
    out["tp1_info"] = eplb_ds.load_checkpoint(engine1, manager1, tmp / "ckpt_tp2", tag="t")["placement"][
        "action"
    ]
    out["tp1_equal"] = equal(_logical(engine1, manager1), saved)
    eplb_ds.save_checkpoint(engine1, manager1, tmp / "ckpt_tp1", tag="t")
    manager1.close()
    engine2, manager2 = _engine(2, 2, ds, {"init_redundancy_expert": 2})
    out["tp2_info"] = eplb_ds.load_checkpoint(engine2, manager2, tmp / "ckpt_tp1", tag="t")["placement"][
        "action"
    ]
    out["tp2_equal"] = equal(_logical(engine2, manager2), saved)
    out["keys"] = len(saved)
    manager2.close()
    return out


def _refusals() -> dict:
    """The layouts the DeepSpeed wiring refuses, with their messages (no model needed)."""
    from megatron.core import parallel_state as ps
    from megatron_eplb.patches.deepspeed import groups

    out = {}
    layouts = {
        "pp": dict(pipeline_model_parallel_size=2, expert_model_parallel_size=2),
        "expert_tp": dict(
            tensor_model_parallel_size=2, expert_tensor_parallel_size=2, expert_model_parallel_size=2
        ),
    }
    for name, kwargs in layouts.items():
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(**kwargs)
        try:
            groups.megatron_groups()
            out[name] = None
        except Exception as exc:  # noqa: BLE001
            out[name] = f"{type(exc).__name__}: {exc}"
    ps.destroy_model_parallel()
    import train

    try:  # examples/train.py: PP 2 with EP 4 on 4 ranks (a stage has 2)
        train.init_parallel(4, 1234, 1, 2)
        out["train_pp_fit"] = None
    except Exception as exc:  # noqa: BLE001
        out["train_pp_fit"] = f"{type(exc).__name__}: {exc}"
    return out


def _all_checks(rank, world, tmp):
    os.environ.update(ENV)
    tmp = Path(tmp)
    return {"zero2": _zero2_checks(tmp), "tp": _tp_checks(tmp), "refused": _refusals()}


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    from dist import run_distributed

    tmp = tmp_path_factory.mktemp("layouts")
    return run_distributed(_all_checks, 4, str(tmp), timeout=900, env=ENV)[0]


def test_unsupported_zero_stage_3_names_the_supported_stages():
    from megatron_eplb.patches.deepspeed import SUPPORTED_ZERO_STAGES, DeepSpeedEPLBError, check_ds_config

    assert SUPPORTED_ZERO_STAGES == (0, 1, 2)
    assert check_ds_config({"zero_optimization": {"stage": 2}}) == 2
    with pytest.raises(DeepSpeedEPLBError, match="supported stages: 0, 1, 2"):
        check_ds_config({"zero_optimization": {"stage": 3}})


@pytest.mark.slow
def test_zero2_fp32_losses_equal_with_moves_and_replicas(checks):
    c = checks["zero2"]["fp32"]
    assert c["optimizer"] == "DeepSpeedZeroOptimizer"
    run = c["moves_r2"]
    assert run["records"] >= 2 and run["replicas"] > 0
    assert _rel(run["losses"], c["base"]["losses"]) <= 1e-5, (run["losses"], c["base"]["losses"])
    assert _rel([run["eval"]], [c["base"]["eval"]]) <= 1e-5  # outputs at evaluation after the moves
    assert run["copies_identical"]
    # the state after 8 steps (fp32 sums in another order: Adam's first steps amplify 1e-7 differences)
    assert max(run["state_diff"].values()) <= 1e-3, run["state_diff"]


@pytest.mark.slow
def test_zero2_bf16_moves_exact_and_replicas_within_bf16_rounding(checks):
    c = checks["zero2"]["bf16"]
    moved, replicas = c["moves_r0"], c["moves_r2"]
    assert moved["records"] >= 2 and replicas["records"] >= 2 and replicas["replicas"] > 0
    assert moved["losses"] == c["base"]["losses"]  # moves alone: bit-identical to the run without EPLB
    assert moved["eval"] == c["base"]["eval"]
    assert _rel(replicas["losses"], c["base"]["losses"]) <= BF16_REPLICA_RTOL
    assert _rel([replicas["eval"]], [c["base"]["eval"]]) <= BF16_REPLICA_RTOL
    assert moved["copies_identical"] and replicas["copies_identical"]


@pytest.mark.slow
def test_tp2_ep2_sequence_parallel_matches_tp1_and_the_unpatched_model(checks):
    c = checks["tp"]
    reference, base, run = c["reference"]["losses"], c["base"]["losses"], c["eplb"]
    assert _rel(base, reference) <= 1e-5, (base, reference)  # TP 2 + SP under DeepSpeed = TP 1, same batch
    assert run["records"] >= 2 and run["replicas"] > 0
    assert _rel(run["losses"], base) <= 1e-5, (run["losses"], base)
    assert _rel([run["eval"]], [c["base"]["eval"]]) <= 1e-5  # outputs at evaluation after the moves
    assert run["copies_identical"] and run["tp_replicas_identical"] and run["placement_everywhere"]
    assert run["groups"] == {"ep": [0, 1], "load": 4} or run["groups"]["load"] == 4
    # each routed token counted once: (DP 2 x B x T tokens) x top-k per MoE layer and step, not once per TP rank
    assert run["loads"] and all(v == [2 * B * T * TOPK] * LAYERS for v in run["loads"]), run["loads"]


@pytest.mark.slow
def test_checkpoint_across_tp_layouts(checks):
    c = checks["tp"]["ckpt"]
    assert c["keys"] > 0
    assert c["tp1_info"] == "replanned" and c["tp1_equal"]  # TP2 x EP2 (10 slots) -> EP2 x DP2 (8 slots)
    assert c["tp2_info"] == "replanned" and c["tp2_equal"]  # and back, 10 slots again
    assert np.isfinite(checks["tp"]["eplb"]["losses"]).all()


@pytest.mark.slow
def test_generate_with_tp2_without_sequence_parallel_matches_the_unpatched_model(checks):
    c = checks["tp"]["generate"]
    assert c["replicas"] > 0 and c["tokens_equal"], c
    assert c["logits_rel"] <= 1e-5, c  # measured 0.0
    # prompts of 16 tokens, 4 new: forwards over 16..19 tokens, B rows, 2 data-parallel replicas, top-k
    assert c["routed"] == [2 * B * sum(range(16, 20)) * TOPK] * LAYERS, c["routed"]


def test_generate_takes_the_training_ds_config(tmp_path):
    """examples/generate.py --deepspeed_config: the ZeRO 2 ds_config of training, its "eplb" section and bf16."""
    import generate

    from megatron_eplb.config import EPLBConfig

    cfg = json.loads((REPO / "configs" / "ds_config_zero2.json").read_text())
    cfg["eplb"] = {"eplb_policy": "greedy"}
    cfg["bf16"] = {"enabled": True}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    args = generate.parse_args([*GEN_MODEL, "--load", "x", "--deepspeed_config", str(tmp_path / "ds.json")])
    assert args.bf16 and EPLBConfig.from_args(args, args.ds_config).eplb_policy == "greedy"
    args = generate.parse_args(
        [*GEN_MODEL, "--load", "x", "--deepspeed-config", str(REPO / "configs" / "ds_config_zero2.json")]
    )
    assert args.ds_config["zero_optimization"]["stage"] == 2 and not args.bf16
    with pytest.raises(SystemExit):
        generate.parse_args([*GEN_MODEL, "--load", "x", "--deepspeed_config", str(tmp_path / "missing.json")])


def test_generate_refuses_pipeline_stages_and_sequence_parallelism_with_what_is_supported():
    import generate

    from megatron_eplb.errors import EPLBConfigError

    for flag in (["--pipeline-model-parallel-size", "2"], ["--sequence-parallel"]):
        args = generate.parse_args([*GEN_MODEL, *flag, "--load", "unused"])
        with pytest.raises(EPLBConfigError, match="supported: --tensor-model-parallel-size N with any EP"):
            generate.generate(args)


@pytest.mark.slow
def test_pipeline_and_expert_tensor_parallel_are_refused_with_what_is_supported(checks):
    c = checks["refused"]
    assert "DeepSpeedEPLBError" in c["pp"] and "pipeline parallel size 2" in c["pp"] and "PP = 1" in c["pp"]
    assert "examples/train_pipeline.py" in c["pp"] and "megatron_eplb.pipeline" in c["pp"]
    assert "expert tensor parallel size 2" in c["expert_tp"] and "supported: 1" in c["expert_tp"]
    assert c["train_pp_fit"].startswith(
        "DeepSpeedEPLBError: --pipeline-model-parallel-size 2 with TP 1 and EP 4"
    )
    assert "world must be a multiple of TP x PP and of EP x PP" in c["train_pp_fit"]
