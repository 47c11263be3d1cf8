"""DeepSpeed engine wiring (patches/deepspeed.py), the training example through the launcher, the monitor.

Launches are shared: one `deepspeed` launcher run (config sources + training + checkpoint + wandb), one
2-rank in-process run for the engine checks (losses with/without EPLB under ZeRO 0 and 1, checkpoint
round trip, pitfalls at initialize).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "examples"))

pytestmark = pytest.mark.slow
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
SMALL = ["--num-layers", "2", "--hidden-size", "32", "--num-experts", "8", "--ffn-hidden-size", "64",
         "--seq-length", "32", "--micro-batch-size", "2"]  # fmt: skip


# ============================================================================ pure checks


def test_unsupported_zero_stage_names_supported_stages():
    from megatron_eplb.patches.deepspeed import DeepSpeedEPLBError, _check_ds_config

    assert _check_ds_config({"zero_optimization": {"stage": 1}}) == 1
    for stage in (2, 3):
        with pytest.raises(DeepSpeedEPLBError, match="supported stages: 0, 1"):
            _check_ds_config({"zero_optimization": {"stage": stage}})


def test_config_pitfalls_are_clear_errors(tmp_path):
    from megatron_eplb.config import EPLBConfig, EPLBConfigError

    with pytest.raises(EPLBConfigError, match="expert_map_record_path"):
        EPLBConfig(expert_map_path=str(tmp_path / "missing.json"))
    with pytest.raises(EPLBConfigError, match="do not divide over EP size 2"):
        EPLBConfig(init_redundancy_expert=1).validate_for(4, 16, 2)


def test_monitor_writes_wandb_images_tables_and_tensorboard(tmp_path):
    from megatron_eplb.manager import RebalanceRecord
    from megatron_eplb.monitor import Monitor
    from megatron_eplb.placement import ExpertPlacement

    os.environ["WANDB_MODE"] = "offline"
    mon = Monitor(tmp_path, "t", rank=0)
    placement = ExpertPlacement.default(2, 4, 2, 2)
    load = np.array([[10, 1, 1, 1], [1, 1, 1, 9]])
    record = RebalanceRecord(started_step=5, layers_planned=[0, 1], completed_step=6, outcome="committed",
                             balancedness_before=0.6, balancedness_after=0.9, moved_slots=2, moved_bytes=64,
                             seconds={"gather": 0.001, "plan_wait": 0.01, "transfer": 0.002})  # fmt: skip
    mon.log(1, {"loss": 2.0})
    mon.rebalance(6, record, placement, load)
    run_dir = Path(mon.wandb_dir)
    mon.close()
    media = run_dir / "files" / "media"
    assert list(media.glob("images/**/*.png")), f"no wandb image under {media}"
    assert list(media.glob("table/**/*.table.json")), f"no wandb table under {media}"
    table = json.loads(next(media.glob("table/**/*.table.json")).read_text())
    assert table["columns"] == ["step", "layer", "expert", "tokens"] and len(table["data"]) == 8
    assert (tmp_path / "expert_load.png").is_file()
    assert list((tmp_path / "tensorboard").glob("events.*"))


# ============================================================================ the launcher


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One `deepspeed --num_gpus 2 examples/train.py` run with every config source (quick demo settings)."""
    out = tmp_path_factory.mktemp("launch")
    ds = json.loads((REPO / "configs" / "ds_config.json").read_text())
    ds["eplb"] = {"init_redundancy_expert": 2, "eplb_churn_weight": 0.05, "eplb_window_size": 3}
    (out / "ds.json").write_text(json.dumps(ds))
    (out / "eplb.yaml").write_text(
        "eplb:\n  dynamic_eplb: true\n  num_iterations_eplb_update: 8\n  num_wait_worker_iterations: 1\n"
        "  eplb_window_size: 5\n  eplb_worker_timeout: 20\n  eplb_layers_per_step: 2\n"
    )
    exe = str(Path(sys.executable).with_name("deepspeed"))
    cmd = [
        exe, "--num_gpus", "2", "examples/train.py", "--deepspeed_config", str(out / "ds.json"),
        "--eplb-config", str(out / "eplb.yaml"),
        "--additional-config", json.dumps({"eplb_window_size": 7, "eplb_worker_timeout": 11.0}),
        "--eplb-window-size", "8", *SMALL, "--train-iters", "30", "--log-interval", "5",
        "--expert-map-record-path", str(out / "map.json"), "--output-dir", str(out / "run"),
        "--save", str(out / "ckpt"), "--metrics-out", str(out / "metrics.json"),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, json.loads((out / "metrics.json").read_text()), proc.stdout + proc.stderr


def test_launcher_config_precedence(launched):
    _, metrics, _ = launched
    cfg = metrics["eplb"]
    assert cfg["eplb_window_size"] == 8  # flag > --additional-config > YAML > ds_config
    assert cfg["eplb_worker_timeout"] == 11.0  # --additional-config > YAML
    assert cfg["num_iterations_eplb_update"] == 8 and cfg["dynamic_eplb"] is True  # YAML
    assert cfg["eplb_churn_weight"] == 0.05 and cfg["init_redundancy_expert"] == 2  # ds_config "eplb"


def test_launcher_trains_rebalances_and_records(launched):
    out, metrics, log = launched
    losses = metrics["losses"]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert metrics["rebalances"], f"no rebalance completed:\n{log[-3000:]}"
    assert (out / "map.json").is_file()
    assert (out / "ckpt" / "final" / "model_logical.pt").is_file()
    assert (out / "ckpt" / "final" / "expert_map.json").is_file()
    assert list((out / "run" / "wandb").glob("offline-run-*/files/media/images/**/*.png"))


# ============================================================================ the engine, in process


def _shift_policy(load, num_slots, num_ranks, previous=None, **kwargs):
    """A test policy that always moves experts: rotate every layer's slots by one rank's worth plus one."""
    phy2log = np.asarray(previous.phy2log if hasattr(previous, "phy2log") else previous)
    return np.roll(phy2log, num_slots // num_ranks + 1, axis=1)


def _train(stage: int, eplb, steps: int, extra=(), policy_fn=None, save=None):
    import torch
    import torch.distributed as dist
    import train
    from megatron_eplb.patches import deepspeed as eplb_ds

    args = train.parse_args(
        [*SMALL, "--zero-stage", str(stage), "--gradient-clipping", "0.5", "--no-wandb", *extra]
    )
    ep = train.init_parallel(None, args.seed)
    model = train.build_model(args, ep)
    engine, _, _, _, manager = eplb_ds.initialize(
        model=model, config=train.ds_config_for(args), eplb=eplb, args=args, policy_fn=policy_fn
    )
    gen = torch.Generator().manual_seed(dist.get_rank())
    pos = torch.arange(32)[None].expand(2, -1)
    losses, records = [], 0
    for _ in range(steps):
        tok = torch.randint(0, 256, (2, 33), generator=gen)
        loss = engine(tok[:, :-1], pos, train.causal_mask(32), labels=tok[:, 1:]).float().mean()
        engine.backward(loss)
        engine.step()
        value = loss.detach().clone()
        dist.all_reduce(value)
        losses.append(float(value) / 2)
        records += engine.eplb_last_record is not None
    return engine, manager, losses, records


def _engine_checks(rank, world):
    os.environ.update(ENV)
    import torch
    from megatron_eplb.patches import deepspeed as eplb_ds

    out: dict = {}
    dyn = {"dynamic_eplb": True, "num_iterations_eplb_update": 3, "num_wait_worker_iterations": 0,
           "init_redundancy_expert": 2, "eplb_layers_per_step": 2}  # fmt: skip
    for stage in (0, 1):
        _, _, base, _ = _train(stage, False, 10)
        engine, manager, eplb, records = _train(stage, dyn, 10, policy_fn=_shift_policy)
        out[f"z{stage}"] = (base, eplb, records)
    # checkpoint: save under one placement, load into another; every logical expert and its state survive
    import tempfile

    tmp = Path(tempfile.gettempdir()) / f"eplb_ds_ckpt_{os.environ['MASTER_PORT']}"
    eplb_ds.save_checkpoint(engine, manager, tmp, tag="t")
    before = manager.handle.logical_state_dict()
    state = eplb_ds.DeepSpeedSlotState(engine)
    opt_before = eplb_ds._logical_optimizer_state(engine, manager.handle, state)
    engine2, manager2, _, _ = _train(1, {"init_redundancy_expert": 4}, 0)
    eplb_ds.load_checkpoint(engine2, manager2, tmp, tag="t")
    after = manager2.handle.logical_state_dict()
    opt_after = eplb_ds._logical_optimizer_state(
        engine2, manager2.handle, eplb_ds.DeepSpeedSlotState(engine2)
    )
    expert_keys = [k for k in before if ".local_experts." in k and k.endswith("weight")]
    out["ckpt_experts"] = len(expert_keys)
    out["ckpt_weights_equal"] = all(
        torch.equal(before[k].float(), after[k].float()) for k in before if torch.is_tensor(before[k])
    )
    out["ckpt_optim_equal"] = all(
        torch.allclose(opt_before[k][s], opt_after[k][s])
        for k in opt_before
        for s in opt_before[k]
        if k in opt_after
    ) and set(opt_before) == set(opt_after)
    out["ckpt_optim_experts"] = len(
        [k for k in opt_before if ".local_experts." in k and k.endswith("weight")]
    )
    # pitfalls at initialize
    try:
        _train(0, {"init_redundancy_expert": 1}, 0)
        out["redundancy_error"] = None
    except Exception as exc:  # noqa: BLE001
        out["redundancy_error"] = str(exc)
    return out


@pytest.fixture(scope="module")
def engine_checks():
    from dist import run_distributed

    return run_distributed(_engine_checks, 2, timeout=420, env=ENV)[0]


@pytest.mark.parametrize("stage", [0, 1])
def test_losses_same_as_without_eplb(engine_checks, stage):
    base, eplb, records = engine_checks[f"z{stage}"]
    assert records >= 2, "no rebalance completed"
    rel = max(abs(a - b) / abs(b) for a, b in zip(eplb, base))
    assert rel <= 1e-5, (rel, base, eplb)


def test_checkpoint_keeps_every_expert(engine_checks):
    assert engine_checks["ckpt_experts"] == 2 * 8 * 2  # layers x experts x (fc1, fc2)
    assert engine_checks["ckpt_optim_experts"] == 2 * 8 * 2
    assert engine_checks["ckpt_weights_equal"]
    assert engine_checks["ckpt_optim_equal"]


def test_redundancy_that_does_not_fit_is_a_clear_error(engine_checks):
    assert (
        engine_checks["redundancy_error"]
        and "do not divide over EP size 2" in engine_checks["redundancy_error"]
    )
