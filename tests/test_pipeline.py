"""Pipeline parallelism: PP2 x EP2 through Megatron-core's 1F1B schedule (``get_forward_backward_func``), a
plain torch Adam and the EPLB manager, 4 micro-batches per step.

One 4-process launch (gloo, CPU) runs most checks: a GPT of 4 layers (dense, MoE | MoE, MoE: stage 0 holds MoE
layer 0, stage 1 MoE layers 1 and 2) trained without EPLB and with dynamic EPLB moving slots every 2 steps;
the record map; a logical checkpoint saved under PP2 x EP2 and loaded under PP1 x EP2 (= EP2 x DP2); a static
map of all stages sliced per stage.  One 8-process launch runs PP2 x EP2 with expert data parallelism 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist import run_distributed  # noqa: E402

H, E, V, SEQ, B = 16, 8, 32, 8, 2
MICRO = 4  # micro-batches per step (>= 4: 1F1B has a steady phase with 2 stages)
STEPS = 7
EDP_STEPS = 10  # the expert-DP launch: its first round waits for the second stage's gated plan
# every due step waits for its plan (a plan late on one stage would hold every stage's round a step longer)
DYN = {"dynamic_eplb": True, "num_iterations_eplb_update": 2, "num_wait_worker_iterations": 0,
       "init_redundancy_expert": 2, "eplb_layers_per_step": 1, "eplb_log_interval": 100,
       "eplb_max_plan_wait": 60.0}  # fmt: skip


def _move_policy(load, num_slots, num_ranks, previous=None, **kwargs):
    """Always moves experts: rotate every layer's slots by one rank's worth plus one (a picklable policy)."""
    phy2log = np.asarray(previous.phy2log if hasattr(previous, "phy2log") else previous)
    return np.roll(phy2log, num_slots // num_ranks + 1, axis=1)


def _gated_policy(load, num_slots, num_ranks, previous=None, gate: str = "", **kwargs):
    """:func:`_move_policy`, but a stage of 2 MoE layers plans only once the file ``gate`` exists (at most 20
    s): its plan comes steps after the other stage's."""
    import time

    deadline = time.monotonic() + 20
    while len(load) == 2 and not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return _move_policy(load, num_slots, num_ranks, previous)


def _init(pp: int, ep: int) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron_eplb.patches import megatron as eplb_mcore

    eplb_mcore.enable_cpu()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, pp, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(1234)


def _model(pp: int, bf16: bool = False):
    """The stage's part of the 4-layer GPT (seeded the same on every layout: each layer from its global id;
    ``bf16``: every parameter in bf16, as ``examples/train.py --bf16`` builds it)."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=4,
        hidden_size=H,
        num_attention_heads=2,
        num_moe_experts=E,
        moe_layer_freq=[0, 1, 1, 1],
        moe_router_topk=2,
        moe_ffn_hidden_size=8,
        ffn_hidden_size=16,
        moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=2,
        pipeline_model_parallel_size=pp,
        use_cpu_initialization=True,
        add_bias_linear=False,
        moe_aux_loss_coeff=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        batch_p2p_sync=False,
    )
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False)
    model = GPTModel(
        cfg,
        spec,
        vocab_size=V,
        max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=True,  # the last stage holds a copy of the word embedding
    )
    # the same weights whatever the layout: every tensor from (its global name, the EP rank for experts)
    from megatron_eplb.patches.megatron.pipeline import state_to_global

    names = {
        local: name
        for name, local in state_to_global(model, {n: n for n, _ in model.named_parameters()}).items()
    }
    ep_rank = ps.get_expert_model_parallel_rank()
    with torch.no_grad():
        for local, p in model.named_parameters():
            name = names.get(local, "embedding.word_embeddings.weight")  # the last stage's tied copy
            key = name + (f"@{ep_rank}" if not getattr(p, "allreduce", True) else "")
            g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(key)) % (2**31))
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if bf16:  # every parameter (Megatron keeps the position embedding fp32), as examples/train.py
                p.data = p.data.to(torch.bfloat16)
    return model


def _batches(step: int):
    """This data-parallel rank's micro-batches of ``step`` (every stage reads them: the last needs labels)."""
    import torch
    from megatron.core import parallel_state as ps

    g = torch.Generator().manual_seed(1000 * step + ps.get_data_parallel_rank())
    return [torch.randint(0, V, (B, SEQ + 1), generator=g) for _ in range(MICRO)]


def _train(
    model, optimizer, manager=None, steps: int = STEPS, first: int = 0, forward_only: bool = False, after=None
):
    """``steps`` optimizer steps of 1F1B over ``MICRO`` micro-batches; the global mean loss of each
    (``forward_only``: the schedule's evaluation, no backward, no step; ``after()`` runs after each step)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron_eplb.patches.megatron.pipeline import finalize_grads

    mask = torch.triu(torch.ones(SEQ, SEQ), 1).bool()[None, None]
    pos = torch.arange(SEQ)[None].expand(B, -1)

    def forward_step(data, model):
        tok = next(data)
        out = model(tok[:, :-1], pos, mask, labels=tok[:, 1:])

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

        return out, loss_func

    losses, moved, layers = [], 0, set()
    maps = []  # the placement each step ran with (a commit happens in the step's first forward)
    for step in range(first, first + steps):
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=False)
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(_batches(step)),
            model=model,
            num_microbatches=MICRO,
            seq_length=SEQ,
            micro_batch_size=B,
            forward_only=forward_only,
        )
        if forward_only:
            optimizer = manager = None
        else:
            finalize_grads(model)
        if manager is not None:
            manager.before_optimizer_step()
        if optimizer is not None:
            optimizer.step()
        if manager is not None:
            maps.append(manager.handle.placement.phy2log.tolist())
            record = manager.step()
            if record is not None and record.outcome == "committed":
                moved += record.moved_slots
                layers.update(record.layers_committed)
        loss = torch.zeros(1)
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:  # once per replica
            loss += sum(float(o["loss"]) for o in out) / MICRO
        dist.all_reduce(loss)
        losses.append(float(loss) / ps.get_data_parallel_world_size())
        if after is not None:
            after()
    return losses, (moved, sorted(layers), maps)


def _adam(model):
    import torch

    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def _checks(rank: int, world: int, tmp: str) -> dict:
    import torch
    from megatron.core import dist_checkpointing
    from megatron_eplb.patches import megatron as eplb_mcore

    from megatron_eplb import EPLBConfig
    from megatron_eplb.checkpoint import read_logical_checkpoint
    from megatron_eplb.manager import EPLBManager

    out: dict = {}
    tmp = Path(tmp)
    # --- PP2 x EP2 without EPLB: the reference
    _init(2, 2)
    ref = _model(2)
    out["ref"], _ = _train(ref, _adam(ref))
    # --- the same with dynamic EPLB moving slots
    model = _model(2)
    record = tmp / "record_map.json"
    trace = tmp / "trace.npz"
    cfg = EPLBConfig.from_dict(
        {**DYN, "expert_map_record_path": str(record), "eplb_trace_path": str(trace), "eplb_log_interval": 3}
    )
    handle = eplb_mcore.apply(model, config=cfg)
    out["stage"] = (handle.stage.layer_offset, handle.stage.num_layers, handle.stage.total_layers)
    optimizer = _adam(model)
    manager = EPLBManager(handle, cfg, optimizer, policy_fn=_move_policy)
    out["eplb"], (out["moved"], out["returned_layers"], out["maps"]) = _train(model, optimizer, manager)
    handle.recording = False  # evaluation does not steer the placement
    out["eval"] = [_train(m, None, steps=2, first=100, forward_only=True)[0] for m in (ref, model)]
    out["committed"] = [r.layers_committed for r in manager.history if r.outcome == "committed"]
    out["started"] = [r.started_step for r in manager.history]
    out["realized"] = manager.realized
    tied = (
        model.shared_embedding_or_output_weight()
    )  # the first stage's word embedding, the last stage's copy
    out["tied"] = None if tied is None else tied.detach().clone()
    manager.save_checkpoint(tmp / "ckpt")
    (tmp / "dist").mkdir(exist_ok=True)  # and a Megatron dist checkpoint (torch_dist) of the same state
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "dist"), sharded_strategy=("torch_dist", 1))
    out["placement_rows"] = handle.placement.phy2log.tolist()
    manager.close()  # writes the trace
    if rank == 0:
        from megatron_eplb.trace import read_trace

        t = read_trace(trace)
        out["trace"] = (t.counts.shape, t.meta["num_layers"], t.meta["layer_names"])
    # --- a static map of every stage's layers: each stage starts from its rows
    _init(2, 2)
    static_map = str(tmp / "ckpt" / "expert_map.json")  # the placement of every stage's layers at the save
    static = eplb_mcore.apply(_model(2), config=EPLBConfig.from_dict({"expert_map_path": static_map}))
    out["static_rows"] = static.placement.phy2log.tolist()
    # --- load the PP2 x EP2 checkpoint under PP1 x EP2 (EP2 x DP2), save it again
    _init(1, 2)
    model = _model(1)
    handle = eplb_mcore.apply(model, config=EPLBConfig.from_dict({"init_redundancy_expert": 2}))
    optimizer = _adam(model)
    manager = EPLBManager(handle, EPLBConfig.from_dict({"init_redundancy_expert": 2}), optimizer)
    out["load_action"] = manager.load_checkpoint(tmp / "ckpt")["placement"]["action"]
    manager.save_checkpoint(tmp / "ckpt_pp1")
    manager.close()
    logical = handle.logical_state_dict()
    other = _model(
        1
    )  # the dist checkpoint of PP2 x EP2 into PP1 x EP2 (Megatron's loader, global layer keys)
    other_handle = eplb_mcore.apply(other, config=EPLBConfig.from_dict({"init_redundancy_expert": 2}))
    other.load_state_dict(dist_checkpointing.load(other.sharded_state_dict(), str(tmp / "dist")))
    from_dist = other_handle.logical_state_dict()
    tensors = sorted(k for k in logical if torch.is_tensor(logical[k]))
    out["dist_diff"] = (
        tensors == sorted(k for k in from_dist if torch.is_tensor(from_dist[k])),
        max(float((logical[k] - from_dist[k]).abs().max()) for k in tensors),
    )
    # --- and back: the PP1 x EP2 save into PP2 x EP2 (each stage takes its layers; the tied copy filled)
    _init(2, 2)
    model = _model(2)
    handle = eplb_mcore.apply(model, config=EPLBConfig.from_dict({"init_redundancy_expert": 2}))
    manager = EPLBManager(handle, EPLBConfig.from_dict({"init_redundancy_expert": 2}), _adam(model))
    manager.load_checkpoint(tmp / "ckpt_pp1")
    manager.save_checkpoint(tmp / "ckpt_pp2_again")
    manager.close()
    # --- bf16 (every parameter, torch Adam on them): without EPLB, moves alone, moves with replicas
    _init(2, 2)
    ref = _model(2, bf16=True)
    out["bf16"] = {"ref": _train(ref, _adam(ref))[0]}
    out["bf16_eval"] = {"ref": _train(ref, None, steps=2, first=100, forward_only=True)[0]}
    for name, redundant in (("moves_r0", 0), ("moves_r2", 2)):
        model = _model(2, bf16=True)
        cfg = EPLBConfig.from_dict({**DYN, "init_redundancy_expert": redundant})
        handle = eplb_mcore.apply(model, config=cfg)
        optimizer = _adam(model)
        manager = EPLBManager(handle, cfg, optimizer, policy_fn=_move_policy)
        out["bf16"][name], (moved, _, _) = _train(model, optimizer, manager)
        handle.recording = False
        out["bf16_eval"][name] = _train(model, None, steps=2, first=100, forward_only=True)[0]
        out[f"bf16_{name}"] = (moved, _copies_identical(handle, optimizer)["replicas"])
        manager.close()
    # --- virtual pipeline stages (interleaved 1F1B) are refused, naming what is supported
    from megatron.core import parallel_state as ps
    from megatron_eplb.patches.megatron.pipeline import pipeline_stage

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 2, virtual_pipeline_model_parallel_size=2, expert_model_parallel_size=2)
    try:
        pipeline_stage(1)
        out["virtual"] = None
    except eplb_mcore.EPLBPatchError as exc:
        out["virtual"] = str(exc)
    ps.destroy_model_parallel()
    if rank == 0:
        a, b = read_logical_checkpoint(tmp / "ckpt"), read_logical_checkpoint(tmp / "ckpt_pp1")
        c = read_logical_checkpoint(tmp / "ckpt_pp2_again")
        out["back_diff"] = max(
            float((a["model"][k] - c["model"][k]).abs().max())
            for k in a["model"]
            if torch.is_tensor(a["model"][k])
        ) + max(
            float((a["optimizer"][n][k] - c["optimizer"][n][k]).abs().max())
            for n in a["optimizer"]
            for k in a["optimizer"][n]
        )
        out["model_keys"] = (sorted(a["model"]) == sorted(b["model"]), len(a["model"]))
        out["model_diff"] = max(
            float((a["model"][k] - b["model"][k]).abs().max())
            for k in a["model"]
            if torch.is_tensor(a["model"][k])
        )
        out["opt_keys"] = (sorted(a["optimizer"]) == sorted(b["optimizer"]), len(a["optimizer"]))
        out["opt_diff"] = max(
            float((a["optimizer"][n][k] - b["optimizer"][n][k]).abs().max())
            for n in a["optimizer"]
            for k in a["optimizer"][n]
        )
        out["opt_step"] = (a["optimizer_step"], b["optimizer_step"])
        out["record"] = json.loads(record.read_text())["moe_layer_count"]
    return out


def _copies_identical(handle, optimizer) -> dict:
    """Whether every copy of each expert holds bitwise the same weights and Adam moments: the copies of an
    expert on the EP ranks of one expert-DP replica (``"replicas"``) and each slot over the expert-DP ranks
    (``"expert_dp"``).  Collective over the EP and expert-DP groups."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_eplb.optimizer_state import OptimizerSlotState

    slots = OptimizerSlotState(optimizer)
    edp = ps.get_expert_data_parallel_group()
    out = {"replicas": True, "expert_dp": True}
    for layer in range(handle.num_layers):
        local = []
        for k in range(handle.slots_per_rank):
            params = handle.slot_params(layer, k)
            tensors = [sp.data for sp in params] + slots.tensors(params)
            local.append(torch.cat([t.detach().reshape(-1).float() for t in tensors]))
        local = torch.stack(local)  # [S, n]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(edp))]
        dist.all_gather(parts, local, group=edp)
        out["expert_dp"] &= all(torch.equal(parts[0], q) for q in parts)
        parts = [torch.empty_like(local) for _ in range(handle.ep_size)]
        dist.all_gather(parts, local, group=handle.ep_group)
        every = torch.cat(parts)  # [P, n]
        for e in range(handle.num_experts):
            copies = every[torch.as_tensor(handle.placement.phy2log[layer] == e)]
            out["replicas"] &= torch.equal(copies, copies[:1].expand_as(copies))
    return out


def _expert_dp_checks(rank: int, world: int, tmp: str) -> dict:
    """PP2 x EP2 on 8 ranks (data parallel 4 per stage, expert-DP 2): without EPLB and with slots moved; the
    second stage's first plan comes only after the first stage's has arrived (it must be kept meanwhile)."""
    import functools

    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron_eplb.patches import megatron as eplb_mcore

    from megatron_eplb import EPLBConfig
    from megatron_eplb.manager import EPLBManager

    out: dict = {}
    _init(2, 2)
    out["groups"] = (
        ps.get_data_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
        ps.get_expert_data_parallel_world_size(),
    )
    ref = _model(2)
    out["ref"], _ = _train(ref, _adam(ref), steps=EDP_STEPS)
    model = _model(2)
    # The first stage's due step waits for its plan (however slow the worker's start), the second's does not
    # and its plan is gated until the first's has come: at step 2 one stage has its plan and the other not
    cfg = EPLBConfig.from_dict({**DYN, "eplb_max_plan_wait": 60.0 if ps.is_pipeline_first_stage() else 0.0})
    handle = eplb_mcore.apply(model, config=cfg)
    optimizer = _adam(model)
    gate = Path(tmp) / "gate"
    manager = EPLBManager(handle, cfg, optimizer, policy_fn=functools.partial(_gated_policy, gate=str(gate)))

    def release():  # the first stage's planning rank opens the gate once its first plan has come
        worker = manager._worker
        if rank == 0 and worker.last_seconds is not None and not gate.exists():
            gate.touch()

    out["load_group"] = dist.get_world_size(manager.load_group)
    out["eplb"], (out["moved"], out["returned_layers"], out["maps"]) = _train(
        model, optimizer, manager, steps=EDP_STEPS, after=release
    )
    out["committed"] = [r.layers_committed for r in manager.history if r.outcome == "committed"]
    out["rounds"] = [(r.started_step, r.completed_step, r.outcome) for r in manager.history]
    logical, _ = manager.window.gather_steps(1)  # the last step's routed (token, expert) pairs per layer
    out["routed"] = logical[0].sum(axis=1).tolist()
    out["copies"] = _copies_identical(handle, optimizer)
    out["replicas"] = int((handle.placement.replica_count > 1).sum())
    handle.recording = False
    out["eval"] = [_train(m, None, steps=2, first=100, forward_only=True)[0] for m in (ref, model)]
    manager.close()
    ps.destroy_model_parallel()
    return out


def test_virtual_pipeline_stages_are_refused_with_what_is_supported(pp):
    assert "virtual pipeline parallel size 2" in pp[0]["virtual"] and "supported: PP >= 1" in pp[0]["virtual"]


def test_stage_rows_and_merged_records_are_pure_functions():
    from megatron_eplb.pipeline import PipelineStage, merge_stage_records, stage_placement
    from megatron_eplb.placement import ExpertPlacement

    whole = ExpertPlacement.default(3, E, 2, 2).with_load(np.arange(3 * E).reshape(3, E))
    stage = PipelineStage(None, 1, 2, (1, 2))
    rows = stage_placement(whole, stage)
    assert rows.phy2log.tolist() == whole.phy2log[1:].tolist()
    assert rows.expert_load.tolist() == whole.expert_load[1:].tolist()
    assert stage_placement(rows, stage) is rows  # a map of this stage alone
    merged = merge_stage_records(
        [
            {"outcome": "no_change", "layers_committed": [], "moved_slots": 0, "balancedness_after": 0.9},
            {"outcome": "committed", "layers_committed": [0, 1], "moved_slots": 5, "balancedness_after": 0.6},
        ],
        (1, 2),
    )
    assert merged["outcome"] == "committed" and merged["layers_committed"] == [1, 2]
    assert merged["moved_slots"] == 5 and merged["balancedness_after"] == pytest.approx((0.9 + 2 * 0.6) / 3)


@pytest.fixture(scope="module")
def pp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp")
    return run_distributed(_checks, 4, str(tmp), timeout=600, env={"DS_ACCELERATOR": "cpu"})


def test_stages_hold_global_layer_ids(pp):
    assert [r["stage"] for r in pp] == [(0, 1, 3), (0, 1, 3), (1, 2, 3), (1, 2, 3)]


def test_rebalances_move_slots_and_losses_equal_the_unpatched_model(pp):
    r = pp[0]
    assert r["moved"] > 0 and r["committed"], r
    assert sum(map(len, pp[2]["committed"])) > 0  # the second stage moved its layers too
    assert all(p["returned_layers"] == [0, 1, 2] for p in pp)  # step()'s records: the whole model, global ids
    # every rank of a stage ran every step with the same map of its layers, and the maps did change
    assert pp[0]["maps"] == pp[1]["maps"] and pp[2]["maps"] == pp[3]["maps"]
    assert len({str(m) for m in pp[0]["maps"]}) > 1 and len({str(m) for m in pp[2]["maps"]}) > 1
    rel = [abs(a - b) / abs(b) for a, b in zip(r["eplb"], r["ref"])]
    assert max(rel) <= 1e-5, (r["eplb"], r["ref"])
    assert all(p["eplb"] == r["eplb"] for p in pp)
    ref_eval, eplb_eval = r["eval"]  # outputs at evaluation (forward-only schedule) after the moves
    assert max(abs(a - b) / abs(b) for a, b in zip(eplb_eval, ref_eval)) <= 1e-5, r["eval"]
    # the stages plan in lockstep (stage 1 moves 2 layers, one per step: its rebalances take a step longer, so
    # its third, started at step 6 as stage 0's, is still moving when the run ends)
    assert (pp[0]["started"], pp[2]["started"]) == ([2, 4, 6], [2, 4])


def test_bf16_moves_exact_and_replicas_within_bf16_rounding(pp):
    """bf16 through the 1F1B schedule: moves alone give bit-identical losses and evaluation outputs; with
    replicas (their gradients summed once more) within the bf16 tolerance of the DeepSpeed tests."""
    from test_deepspeed import BF16_REPLICA_RTOL

    r = pp[0]
    base, moved, replicas = (r["bf16"][k] for k in ("ref", "moves_r0", "moves_r2"))
    assert all(p[k][0] > 0 and p[k][1] for p in pp for k in ("bf16_moves_r0", "bf16_moves_r2")), r
    assert moved == base and r["bf16_eval"]["moves_r0"] == r["bf16_eval"]["ref"], (moved, base)
    rel = max(
        abs(a - b) / abs(b)
        for a, b in zip(replicas + r["bf16_eval"]["moves_r2"], base + r["bf16_eval"]["ref"])
    )
    # measured: 2.6e-5 (losses and outputs), inside the unpatched bf16 run's own distance to fp32 (4.8e-5)
    assert rel <= BF16_REPLICA_RTOL, (replicas, base)


def test_tied_word_embedding_stays_equal_on_first_and_last_stage(pp):
    import torch

    assert pp[0]["tied"] is not None and torch.equal(pp[0]["tied"], pp[2]["tied"])


def test_record_and_static_maps_trace_and_metrics_cover_every_stage(pp):
    assert pp[0]["record"] == 3
    shape, layers, names = pp[0]["trace"]
    assert layers == 3 and shape[0] == STEPS and shape[2:] == (3, E), pp[0]["trace"]  # [steps, ranks, L, E]
    assert names == ["decoder.layers.1.mlp", "decoder.layers.2.mlp", "decoder.layers.3.mlp"]
    assert (
        len(pp[0]["realized"]) == 2 and pp[0]["realized"] == pp[2]["realized"]
    )  # steps 1-3, 4-6, all layers
    assert pp[0]["static_rows"] == pp[0]["placement_rows"]  # stage 0: MoE layer 0
    assert pp[2]["static_rows"] == pp[2]["placement_rows"]  # stage 1: MoE layers 1, 2


def test_checkpoint_pp2_loads_under_pp1_with_weights_and_optimizer_state(pp):
    r = pp[0]
    assert r["load_action"] == "restored"
    assert r["model_keys"][0] and r["opt_keys"][0], r
    assert r["model_diff"] == 0.0 and r["opt_diff"] == 0.0
    assert r["opt_step"][0] == r["opt_step"][1] == STEPS
    assert r["back_diff"] == 0.0  # PP1 x EP2 -> PP2 x EP2 gives back the same checkpoint


def test_megatron_dist_checkpoint_pp2_loads_under_pp1(pp):
    assert all(p["dist_diff"] == (True, 0.0) for p in pp), [p["dist_diff"] for p in pp]


@pytest.mark.slow
def test_example_trains_with_pipeline_stages(tmp_path):
    """``examples/train.py --pipeline-model-parallel-size 2`` (torchrun, 4 CPU ranks): rebalances commit, the
    record map and the checkpoint's map cover the MoE layers of both stages."""
    import os
    import subprocess

    from dist import free_port

    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
           str(free_port()), str(repo / "examples" / "train.py"), "--pipeline-model-parallel-size", "2",
           "--expert-model-parallel-size", "2", "--num-layers", "4", "--hidden-size", "32", "--num-experts", "8",
           "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "6", "--dynamic-eplb",
           "--num-iterations-eplb-update", "2", "--num-wait-worker-iterations", "0", "--init-redundancy-expert",
           "2", "--no-wandb", "--output-dir", str(tmp_path), "--save", str(tmp_path / "ckpt"),
           "--metrics-out", str(tmp_path / "m.json")]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=repo)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert any(r["outcome"] == "committed" for r in metrics["rebalances"]), metrics["rebalances"]
    assert json.loads((tmp_path / "expert_map.json").read_text())["moe_layer_count"] == 4
    ckpt_map = json.loads((tmp_path / "ckpt" / "iter_0000006" / "expert_map.json").read_text())
    assert ckpt_map["moe_layer_count"] == 4


@pytest.fixture(scope="module")
def pp_edp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp_edp")
    return run_distributed(_expert_dp_checks, 8, str(tmp), timeout=600, env={"DS_ACCELERATOR": "cpu"})


def test_expert_data_parallel_under_pipeline_stages(pp_edp):
    """PP2 x EP2 x expert-DP 2 (8 ranks): slots move, losses and evaluation outputs equal the unpatched
    model's, every expert-DP replica and every copy of an expert holds the same weights and Adam moments."""
    r = pp_edp[0]
    assert all(p["groups"] == (4, 2, 2) and p["load_group"] == 4 for p in pp_edp), [
        p["groups"] for p in pp_edp
    ]
    assert r["moved"] > 0 and r["replicas"] > 0 and sum(map(len, pp_edp[4]["committed"])) > 0, r
    assert all(p["returned_layers"] == [0, 1, 2] for p in pp_edp)
    stages = (range(0, 4), range(4, 8))  # ranks of stage 0 and stage 1
    for ranks in stages:
        assert all(pp_edp[i]["maps"] == pp_edp[ranks[0]]["maps"] for i in ranks)
        assert len({str(m) for m in pp_edp[ranks[0]]["maps"]}) > 1
    # the first stage's first plan came at step 2, the second's a step later: kept, and committed together
    assert r["rounds"][0][0] == 2 and r["rounds"][0][1] >= 3, r["rounds"]
    assert all(o == "committed" for p in pp_edp for *_, o in p["rounds"]), [p["rounds"] for p in pp_edp]
    rel = [abs(a - b) / abs(b) for a, b in zip(r["eplb"], r["ref"])]
    assert max(rel) <= 1e-5, (r["eplb"], r["ref"])
    assert all(p["eplb"] == r["eplb"] for p in pp_edp)
    ref_eval, eplb_eval = r["eval"]
    assert max(abs(a - b) / abs(b) for a, b in zip(eplb_eval, ref_eval)) <= 1e-5, r["eval"]
    assert all(p["copies"] == {"replicas": True, "expert_dp": True} for p in pp_edp), [
        p["copies"] for p in pp_edp
    ]
    # every routed pair counted once over the stage's 4 data-parallel ranks: DP x micro-batches x B x SEQ x top-k
    routed = 4 * MICRO * B * SEQ * 2
    assert pp_edp[0]["routed"] == [routed] and pp_edp[4]["routed"] == [routed] * 2, (
        r["routed"],
        pp_edp[4]["routed"],
    )
