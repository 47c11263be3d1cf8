"""DeepSpeed engine wiring (patches/deepspeed/) and examples/train.py through the `deepspeed` launcher.

Launches are shared: one ``deepspeed --num_gpus 2 examples/train.py`` run (the demo's training command, with
every EPLB config source added: config precedence, rebalances, the recorded map, a checkpoint), one 2-rank
in-process run for the engine checks (fp32 and bf16 under ZeRO 0 and 1, expert bias, gradient accumulation,
checkpoint round trip, generation from the launched run's checkpoint equal to generation without EPLB,
pitfalls at initialize) and one 1-process run that resumes that EP=2 checkpoint at EP=1.  The demo itself
(training + serving through the launcher) is tests/test_demo.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the checkout (megatron_eplb.patches from patches/), as examples/ do
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "examples"))

from demo import MODEL, launcher  # noqa: E402  (the demo's model and launcher command; no demo run)
from models import engine_train_step  # noqa: E402

ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
SMALL = ["--num-layers", "2", "--hidden-size", "32", "--num-experts", "8", "--ffn-hidden-size", "64",
         "--seq-length", "32", "--micro-batch-size", "2"]  # fmt: skip
TRAIN_ITERS = 60  # the launched run: as many steps as the quick demo, a rebalance attempt every 10
# bf16 tolerance of a run with replicas against the run without EPLB: the copies' gradients are bf16 and
# their sum rounds once more than the single expert's gradient (bf16 ulp = 2^-8 = 3.9e-3 relative);
# measured max relative loss difference over 10 steps: 2.1e-4 (ZeRO 0), 3.8e-4 (ZeRO 1).
BF16_REPLICA_RTOL = 2e-3


# ============================================================================ pure checks


def test_unsupported_zero_stage_names_supported_stages():
    from megatron_eplb.patches.deepspeed import DeepSpeedEPLBError, _check_ds_config

    assert _check_ds_config({"zero_optimization": {"stage": 1}}) == 1
    with pytest.raises(DeepSpeedEPLBError, match="supported stages: 0, 1, 2"):
        _check_ds_config({"zero_optimization": {"stage": 3}})
    with pytest.raises(DeepSpeedEPLBError, match="grad_accum_dtype"):
        _check_ds_config({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}})


def test_train_script_missing_expert_map_is_a_clear_error(tmp_path):
    """examples/train.py (what the launcher runs) resolves every config source before training."""
    import train

    from megatron_eplb.config import EPLBConfigError

    args = train.parse_args(["--print-config", "--expert-map-path", str(tmp_path / "nothing.json")])
    with pytest.raises(EPLBConfigError, match="expert_map_record_path"):
        train.train(args)


def test_model_dependent_config_errors_come_before_the_heavy_start_as_one_line(capsys, monkeypatch):
    """Redundancy that does not divide: one line on rank 0, exit code 2, before any process group or model."""
    import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(train, "init_parallel", lambda *a: (_ for _ in ()).throw(AssertionError("too late")))
    for argv in (["--print-config"], []):
        with pytest.raises(SystemExit) as exc:
            train.main([*argv, "--num-experts", "16", "--init-redundancy-expert", "3"])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            "train.py: error: EPLBConfigError: init_redundancy_expert=3: 16 experts + 3 redundant = 19 slots do "
            "not divide over EP size 2; use one of [2, 4]"
        ], err


def test_unwritable_outputs_are_one_line_before_the_process_group_deepspeed_or_the_model(
    tmp_path, capsys, monkeypatch
):
    """--save / --metrics-out that cannot be written, or a --save holding later checkpoints: exit code 1 on
    every rank within a second, before DeepSpeed and Megatron are even imported by train.py."""
    import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(train, "init_parallel", lambda *a: (_ for _ in ()).throw(AssertionError("too late")))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    held = tmp_path / "held"
    (held / "iter_0000040").mkdir(parents=True)
    (held / "iter_0000040" / "model_logical.pt").write_bytes(b"x")
    for argv, message in (
        (
            ["--save", str(blocker / "ckpt")],
            f"--save {str(blocker / 'ckpt')!r} is not writable (NotADirectoryError",
        ),
        (
            ["--metrics-out", str(tmp_path)],
            f"--metrics-out {str(tmp_path)!r} is a directory; give a file name",
        ),
        (["--save", str(held)], f"--save {held} already holds checkpoints past iteration 0 (iter_0000040)"),
    ):
        t0 = time.monotonic()
        with pytest.raises(SystemExit) as exc:
            train.main([*argv, "--output-dir", str(tmp_path / "out"), "--no-wandb"])
        assert exc.value.code == 1 and time.monotonic() - t0 < 5
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("train.py: error: ") and message in err[0], err


def test_train_script_flags_and_outputs_checked_before_step_1(tmp_path, capsys):
    import train

    for argv, message in (
        (["--save-interval", "10"], "--save-interval 10 needs --save"),
        (["--save", "x", "--save-interval", "0"], "needs --save and a value >= 1"),
        (["--tag", "iter_0000010"], "--tag names the checkpoint to load: it needs --load"),
        (["--train-iters", "0"], "--train-iters 0 must be >= 1"),
        (["--load", "x", "--no-eplb"], "--load reads a logical EPLB checkpoint"),
    ):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert message in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = train.parse_args(["--save", str(blocker / "ckpt"), "--metrics-out", str(tmp_path), "--output-dir",
                             str(tmp_path / "out")])  # fmt: skip
    problems = train.output_problems(args, str(blocker / "map.json"))
    assert any(p.startswith("--save") and "is not writable (NotADirectoryError" in p for p in problems), (
        problems
    )
    assert any(p.startswith("--metrics-out") and "is a directory; give a file name" in p for p in problems)
    assert any(p.startswith("expert_map_record_path") for p in problems) and len(problems) == 3
    assert train.output_problems(train.parse_args(["--save", str(tmp_path / "ok")]), None) == []
    for tag in ("iter_0000020", "iter_0000040", "best"):
        (tmp_path / "ok" / tag).mkdir()
        (tmp_path / "ok" / tag / "model_logical.pt").write_bytes(b"x")
    assert train.later_tags(str(tmp_path / "ok"), 20) == ["iter_0000040"]
    assert train.later_tags(str(tmp_path / "ok"), 40) == []
    # dynamic EPLB records under the run's own output directory unless told otherwise
    from megatron_eplb.config import EPLBConfig

    args = train.parse_args(["--output-dir", str(tmp_path / "run")])
    assert train.record_path_for(args, EPLBConfig(dynamic_eplb=True)) == str(
        tmp_path / "run" / "expert_map.json"
    )
    assert (
        train.record_path_for(args, EPLBConfig(dynamic_eplb=True, expert_map_record_path="m.json"))
        == "m.json"
    )
    assert train.record_path_for(args, EPLBConfig()) is None
    # gradient accumulation: EPLB counts optimizer steps; a run too short to rebalance is said up front
    dyn = EPLBConfig(dynamic_eplb=True, num_iterations_eplb_update=40)
    assert train.no_rebalance_ahead(dyn, 45 // 2) and not train.no_rebalance_ahead(dyn, 40)
    assert not train.no_rebalance_ahead(dyn.replace(eplb_update_interval=60.0), 22)


# ============================================================================ examples/train.py, launched


def _train_command(out: Path, *extra: str) -> tuple[list[str], dict]:
    """``deepspeed --num_gpus 2 examples/train.py`` as the demo launches it (its model, EP=2, dynamic EPLB),
    with every EPLB config source added (files under ``out``), then ``extra``; and its environment."""
    from dist import free_port

    ds = json.loads((REPO / "configs" / "ds_config.json").read_text())
    ds["eplb"] = {"init_redundancy_expert": 2, "eplb_churn_weight": 0.05, "eplb_window_size": 3}
    (out / "ds.json").write_text(json.dumps(ds))
    (out / "eplb.yaml").write_text(
        "eplb:\n  dynamic_eplb: true\n  num_wait_worker_iterations: 1\n  eplb_window_size: 5\n"
        "  eplb_worker_timeout: 20\n  eplb_max_plan_wait: 20\n  eplb_layers_per_step: 2\n"
    )
    cmd = launcher()
    if "--master_port" not in cmd:
        cmd += ["--master_port", str(free_port())]
    cmd += [
        "--num_gpus", "2", "examples/train.py",
        "--deepspeed_config", str(out / "ds.json"), "--eplb-config", str(out / "eplb.yaml"),
        *MODEL, "--expert-model-parallel-size", "2",
        "--train-iters", str(TRAIN_ITERS), "--log-interval", "5",
        "--num-iterations-eplb-update", "10", "--eplb-window-size", "10",
        "--output-dir", str(out), "--no-wandb",
        "--additional-config", json.dumps({"eplb_window_size": 7, "eplb_worker_timeout": 11.0}),
        "--eplb-window-size", "8", *extra,
    ]  # fmt: skip
    env = {
        **os.environ,
        **ENV,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return cmd, env


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The demo's training command with every EPLB config source, the recorded map and a checkpoint every
    20 iterations."""
    out = tmp_path_factory.mktemp("launched")
    cmd, env = _train_command(
        out, "--expert-map-record-path", str(out / "expert_map.json"), "--save", str(out / "checkpoint"),
        "--save-interval", "20", "--metrics-out", str(out / "train_metrics.json"),
    )  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, json.loads((out / "train_metrics.json").read_text()), proc.stdout + proc.stderr


@pytest.mark.slow
def test_launcher_config_precedence(launched):
    _, metrics, _ = launched
    cfg = metrics["eplb"]
    assert cfg["eplb_window_size"] == 8  # flag > --additional-config > YAML > ds_config
    assert cfg["eplb_worker_timeout"] == 11.0  # --additional-config > YAML
    assert cfg["num_wait_worker_iterations"] == 1 and cfg["dynamic_eplb"] is True  # YAML
    assert cfg["eplb_churn_weight"] == 0.05 and cfg["init_redundancy_expert"] == 2  # ds_config "eplb"


@pytest.mark.slow
def test_launcher_trains_rebalances_records_and_saves(launched):
    out, metrics, log = launched
    losses = metrics["losses"]
    assert len(losses) == TRAIN_ITERS and all(np.isfinite(losses))
    assert len(metrics["rebalances"]) >= 3, f"too few rebalances:\n{log[-3000:]}"
    assert losses[-1] < losses[0]
    assert (out / "expert_map.json").is_file()
    # tagged by iteration like Megatron, every --save-interval and at the end; latest names the last
    tags = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert tags == ["iter_0000020", "iter_0000040", "iter_0000060", "latest"], tags
    assert (out / "checkpoint" / "latest").read_text().strip() == "iter_0000060"
    saved = json.loads((out / "checkpoint" / "iter_0000060" / "expert_map.json").read_text())
    assert np.asarray(saved["expert_load"]).shape == (4, 16)  # the recorded load travels with the map
    assert metrics["completed"] and metrics["last_step"] == TRAIN_ITERS and metrics["stopped_by"] is None
    # one step number for one rebalance: the manager's log line and train.py's
    manager_steps = re.findall(r"EPLB rebalance at step (\d+): committed", log)
    train_steps = re.findall(r"rebalance at step (\d+) \(the manager's count[^)]*\): committed", log)
    assert manager_steps and manager_steps == train_steps, (manager_steps, train_steps)
    # ... and TensorBoard's: every rebalance's scalars at the step its record says (the manager's count)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tb_steps = [e.step for e in events.Scalars("eplb/moved_slots")]
    assert tb_steps == [r["completed_step"] for r in metrics["rebalances"]], tb_steps
    assert {int(s) for s in manager_steps} <= set(tb_steps)
    # the console says what the start is doing, without the upstream warnings known to be harmless
    assert "building the model" in log and "starting DeepSpeed" in log
    assert "Apex is not installed" not in log and "all_gather_into_tensor` is deprecated" not in log


@pytest.fixture(scope="module")
def stopped(launched):
    """The launched command again, SIGTERM to rank 1 while a rebalance moves experts; then a run that
    continues from the checkpoint it saved (``--load``) to the same total ``--train-iters``."""
    import signal
    import time

    import psutil

    out = launched[0] / "stopped"
    out.mkdir()
    save = out / "checkpoint"
    cmd, env = _train_command(out, "--save", str(save), "--metrics-out", str(out / "m.json"))
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines, signalled, deadline = [], None, time.monotonic() + 400
    for line in proc.stdout:
        lines.append(line)
        moving = re.search(r"EPLB step (\d+): planning -> transferring", line)
        if (
            signalled is None and moving and int(moving[1]) >= 20
        ):  # the stop comes a few steps before the switch
            for child in psutil.Process(proc.pid).children(recursive=True):
                if "--local_rank=1" in child.cmdline():
                    child.send_signal(signal.SIGTERM)
                    signalled = line
        if time.monotonic() > deadline:
            proc.kill()
    code = proc.wait(timeout=60)
    log = "".join(lines)
    assert signalled, log[-4000:]
    first = {"code": code, "metrics": json.loads((out / "m.json").read_text()), "log": log}
    first["latest"] = (save / "latest").read_text().strip()
    cmd, env = _train_command(
        out, "--load", str(save), "--save", str(save), "--metrics-out", str(out / "m2.json")
    )
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    second = {"metrics": json.loads((out / "m2.json").read_text()), "log": proc.stdout + proc.stderr}
    return out, first, second


@pytest.mark.slow
def test_sigterm_on_one_rank_saves_checkpoint_metrics_and_map(stopped):
    out, first, _ = stopped
    m = first["metrics"]
    step = m["last_step"]
    assert first["code"] == 128 + 15, first["log"][-3000:]
    assert not m["completed"] and m["stopped_by"] == "SIGTERM" and 20 < step < TRAIN_ITERS // 2
    assert len(m["losses"]) == step and first["latest"] == f"iter_{step:07d}"
    assert m["checkpoint"] == str(out / "checkpoint" / f"iter_{step:07d}")
    assert (out / "expert_map.json").is_file()  # the map, recorded under the run's own --output-dir


@pytest.mark.slow
def test_load_continues_at_the_saved_iteration_with_the_same_losses(stopped, launched):
    out, first, second = stopped
    step = first["metrics"]["last_step"]
    m = second["metrics"]
    assert m["start_iteration"] == step and m["completed"] and len(m["losses"]) == TRAIN_ITERS - step
    assert f"at iteration {step} of {TRAIN_ITERS}" in second["log"]
    assert m["switch_step"] == launched[1]["switch_step"] == TRAIN_ITERS // 2
    # step counter, data position and domain switch continue: the uninterrupted run's losses, step for step,
    # across the switch (a wrong batch or domain is ~10 % off at once).  Not bitwise: the rebalance in flight
    # at the stop is not redone, so replica-gradient sums round differently, and training amplifies rounding
    # (measured: 1e-7 at the first differing step, ~1e-5 ten steps later, 4 % after 40 steps).
    assert step + 10 > TRAIN_ITERS // 2
    assert _rel(m["losses"][:10], launched[1]["losses"][step : step + 10]) <= 1e-4
    assert (out / "checkpoint" / "latest").read_text().strip() == f"iter_{TRAIN_ITERS:07d}"


# ============================================================================ the engine, in process


def _shift_policy(load, num_slots, num_ranks, previous=None, **kwargs):
    """A test policy that always moves experts: rotate every layer's slots by one rank's worth plus one."""
    phy2log = np.asarray(previous.phy2log if hasattr(previous, "phy2log") else previous)
    return np.roll(phy2log, num_slots // num_ranks + 1, axis=1)


def _train(stage: int, eplb, steps: int, extra=(), policy_fn=None, model=SMALL, step_counts=None):
    import torch
    import torch.distributed as dist
    import train
    from megatron_eplb.patches import deepspeed as eplb_ds

    args = train.parse_args(
        [*model, "--zero-stage", str(stage), "--gradient-clipping", "0.5", "--no-wandb", *extra]
    )
    ep = train.init_parallel(None, args.seed)
    net = train.build_model(args, ep)
    engine, _, _, _, manager = eplb_ds.initialize(
        model=net, config=train.ds_config_for(args), eplb=eplb, args=args, policy_fn=policy_fn
    )
    gen = torch.Generator().manual_seed(dist.get_rank())
    b, t = args.micro_batch_size, args.seq_length
    pos = torch.arange(t)[None].expand(b, -1)
    losses, records = [], 0
    for _ in range(steps):
        tok = torch.randint(0, 256, (b, t + 1), generator=gen)
        loss, recorded = engine_train_step(engine, tok, pos, train.causal_mask(t))
        losses.append(loss)
        records += recorded
        if step_counts is not None:
            step_counts.append(manager.step_count if manager is not None else None)
    return engine, manager, losses, records


def _logical_state(engine, manager) -> dict:
    """``{logical param name: {"weight", "fp32", "exp_avg", ...}}`` of a trained engine (collective), with
    or without EPLB (without: Megatron's layout, expert ``e`` on EP rank ``e // (E / EP)``; GroupedMLP's
    stacked weights gathered over the EP group into the stack of all ``E`` experts)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron_eplb.patches import deepspeed as eplb_ds

    from megatron_eplb.checkpoint import logical_optimizer_state

    state = eplb_ds.DeepSpeedSlotState(engine)
    if manager is not None:
        weights = manager.handle.logical_state_dict()
        optim = logical_optimizer_state(engine.module, manager.handle, state)
        return {k: {"weight": weights[k].detach().float(), **v} for k, v in optim.items()}
    num_local = engine.module.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
    first = ps.get_expert_model_parallel_rank() * num_local
    local, stacked = {}, {}
    for name, p in engine.module.named_parameters():
        entry = {"weight": p.detach().float().clone(), **state.full_state(p)}
        if name.endswith(("experts.weight1", "experts.weight2")):  # GroupedMLP: the local experts stacked
            stacked[name] = entry
            continue
        m = re.match(r"(.*local_experts\.)(\d+)(\..*)", name)
        local[f"{m[1]}{first + int(m[2])}{m[3]}" if m else name] = entry
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    out = {k: {s: torch.as_tensor(v) for s, v in d.items()} for part in parts for k, d in part.items()}
    ep_group = ps.get_expert_model_parallel_group()
    for name, entry in stacked.items():
        out[name] = {}
        for key, t in entry.items():  # [H, S * F'] / [S * F, H] hold expert k in the k-th of S memory blocks
            blocks = [torch.empty_like(t) for _ in range(dist.get_world_size(ep_group))]
            dist.all_gather(blocks, t.contiguous(), group=ep_group)
            flat = torch.cat([b.reshape(-1) for b in blocks])
            out[name][key] = (
                flat.view(t.shape[0], -1) if name.endswith("weight1") else flat.view(-1, t.shape[1])
            )
    return out


def _step_counts(engine) -> list[int]:
    """Adam's ``step`` of every state of the torch optimizer inside the engine's (one count expected)."""
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sorted({int(float(s["step"])) for s in opt.state.values() if "step" in s})


def _state_diff(a: dict, b: dict) -> dict[str, float]:
    """Largest |a - b| / max|b| per state key over all parameters (``step`` ignored)."""
    assert set(a) == set(b), set(a) ^ set(b)
    worst: dict[str, float] = {}
    for name in b:
        for key, y in b[name].items():
            if key == "step":
                continue
            x = a[name][key].detach().float()
            d = float((x - y.detach().float()).abs().max() / (y.detach().float().abs().max() + 1e-30))
            worst[key] = max(worst.get(key, 0.0), d)
    return worst


def _rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _bf16_checks(stage: int, dyn: dict, experts: tuple[str, ...] = ()) -> dict:
    """bf16: the run without EPLB, static replicas (no moves), moves without and with replicas (``experts``:
    ``("--moe-grouped-gemm",)`` for GroupedMLP experts)."""
    extra = ["--bf16", *experts]
    engine, manager, base, _ = _train(stage, False, 10, extra=extra)
    out = {"optimizer": type(engine.optimizer).__name__}
    ref = _logical_state(engine, manager)
    # The even split: a copy's share of its expert's tokens depends on its copy index only, so moving the
    # copies leaves the math of the static-replica run bit for bit (the balanced split's shares follow where
    # the copies are, so there it rounds differently).
    even = {"eplb_replica_dispatch": "even"}
    runs = {
        "static_r2": ({"init_redundancy_expert": 2, **even}, None),
        "moves_r0": ({**dyn, "init_redundancy_expert": 0}, _shift_policy),
        "moves_r2": ({**dyn, **even}, _shift_policy),
    }
    states = {}
    for name, (cfg, policy) in runs.items():
        engine, manager, losses, records = _train(stage, cfg, 10, extra=extra, policy_fn=policy)
        states[name] = _logical_state(engine, manager)
        expert = "weight1" if experts else "local_experts.0.linear_fc1.weight"
        out[name] = {
            "losses": losses,
            "records": records,
            "loss_rel": _rel(losses, base),
            "state_diff": _state_diff(states[name], ref),
            "keys": sorted(states[name][f"decoder.layers.0.mlp.experts.{expert}"]),
            "experts": type(engine.module.decoder.layers[0].mlp.experts).__name__,
        }
    out["moves_r2_vs_static_r2"] = _state_diff(states["moves_r2"], states["static_r2"])
    out["base"] = base
    return out


def _expert_bias_checks(dyn: dict) -> dict:
    from megatron_eplb.patches.megatron import find_moe_layers

    out = {}
    for name, eplb in (("base", False), ("eplb", dyn)):
        engine, _, losses, records = _train(
            0, eplb, 6, extra=["--moe-router-enable-expert-bias"], policy_fn=_shift_policy
        )
        routers = [layer.router for _, layer in find_moe_layers(engine.module)]
        out[name] = {
            "losses": losses,
            "records": records,
            "bias": [r.expert_bias.detach().clone() for r in routers],
            "score": routers[0].config.moe_router_score_function,
        }
    return out


def _accumulation_checks(dyn: dict) -> dict:
    out = {}
    for name, eplb in (("base", False), ("eplb", {**dyn, "num_iterations_eplb_update": 2})):
        counts: list = []
        engine, _, losses, records = _train(
            1,
            eplb,
            12,
            extra=["--gradient-accumulation-steps", "2"],
            policy_fn=_shift_policy,
            step_counts=counts,
        )
        out[name] = {
            "losses": losses,
            "records": records,
            "step_counts": counts,
            "gas": engine.gradient_accumulation_steps(),
        }
    return out


def _generation_checks(ckpt_dir: str) -> dict:
    """Greedy generation through examples/generate.py's functions: static EPLB map vs no EPLB."""
    import generate
    import torch
    import torch.distributed as dist
    from data import ByteBatches, load_domain

    args = generate.parse_args([*MODEL, "--load", ckpt_dir])
    ckpt = Path(ckpt_dir) / (Path(ckpt_dir) / "latest").read_text().strip()
    ep = generate.init_parallel(args.expert_model_parallel_size, args.seed)
    placement, _ = generate.resolve_placement(args, ckpt)
    prompts, _ = ByteBatches(load_domain("wikipedia"), 2, 64, seed=99, rank=dist.get_rank()).next()
    model, handle, _ = generate.load_model(args, ep, ckpt, placement)
    with_eplb, _ = generate.greedy_generate(model, prompts, 12, args.seq_length)
    replica_slots = [
        k
        for k, slot in enumerate(handle.local_slots())
        if placement.replica_count[0, placement.phy2log[0, slot]] > 1
    ]
    replica_tokens = int(handle.slot_loads()[0, replica_slots].sum()) if replica_slots else 0
    # dynamic EPLB while serving: the manager steps once per forward and re-places experts mid-generation
    from megatron_eplb.config import EPLBConfig
    from megatron_eplb.manager import EPLBManager

    model, handle, _ = generate.load_model(args, ep, ckpt, placement)
    cfg = EPLBConfig(
        dynamic_eplb=True,
        init_redundancy_expert=placement.num_redundant,
        num_iterations_eplb_update=3,
        num_wait_worker_iterations=1,
        eplb_max_plan_wait=60.0,
        eplb_window_size=3,
        eplb_policy="greedy",
    )
    manager = EPLBManager(handle, cfg)
    dynamic, _ = generate.greedy_generate(model, prompts, 12, args.seq_length, manager.step)
    committed = sum(r.outcome == "committed" for r in manager.history)
    manager.close()
    model, none, _ = generate.load_model(args, ep, ckpt, None)
    without, _ = generate.greedy_generate(model, prompts, 12, args.seq_length)
    assert none is None
    total = torch.tensor([replica_tokens])
    dist.all_reduce(total)
    return {
        "equal": bool(torch.equal(with_eplb, without)),
        "dynamic_equal": bool(torch.equal(dynamic, without)),
        "dynamic_rebalances": committed,
        "dynamic_outcomes": sorted({r.outcome for r in manager.history}),
        "new_tokens": int(with_eplb.shape[1] - prompts.shape[1]),
        "num_slots": placement.num_slots,
        "replica_tokens": int(total),
    }


def _pitfalls(tmp: Path, launched_ckpt: str) -> dict:
    import train
    from megatron_eplb.patches import deepspeed as eplb_ds

    from megatron_eplb.placement import ExpertPlacement

    out = {}

    def error(fn):
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - train.py's SetupError is a SystemExit
            return f"{type(exc).__name__}: {exc}"
        return None

    out["redundancy"] = error(lambda: _train(0, {"init_redundancy_expert": 1}, 0))
    out["ep_vs_world"] = error(lambda: train.init_parallel(3))
    out["missing_map"] = error(lambda: _train(0, {"expert_map_path": str(tmp / "never_recorded.json")}, 0))
    wrong = tmp / f"map_ep4_{os.getpid()}.json"
    ExpertPlacement.default(2, 8, 4, 0).to_json(wrong)
    out["map_for_other_ep"] = error(lambda: _train(0, {"expert_map_path": str(wrong)}, 0))
    out["error_type"] = eplb_ds.DeepSpeedEPLBError.__mro__[1].__name__
    # outputs that cannot be written: one error on every rank before the model is built
    blocker = tmp / f"a_file_{os.getpid()}"
    blocker.write_text("x")
    build = train.build_model
    train.build_model = lambda *a, **k: (_ for _ in ()).throw(AssertionError("the model was built"))
    try:
        args = train.parse_args(
            [*SMALL, "--no-wandb", "--save", str(blocker / "ckpt"), "--metrics-out", str(tmp),
             "--output-dir", str(tmp / "out")]
        )  # fmt: skip
        out["unwritable"] = error(lambda: train.train(args))
        args = train.parse_args([*SMALL, "--no-wandb", "--save", str(tmp / "s"), "--save-interval", "3",
                                 "--gradient-accumulation-steps", "2"])  # fmt: skip
        out["interval_vs_accumulation"] = error(lambda: train.train(args))
    finally:
        train.build_model = build
    # resuming: a checkpoint at the end has nothing left to train; continuing from an earlier tag into the
    # same --save would write over the later tags
    resume = [*MODEL, "--no-wandb", "--output-dir", str(tmp / "out"), "--load", launched_ckpt]
    args = train.parse_args([*resume, "--train-iters", str(TRAIN_ITERS)])
    out["nothing_to_train"] = error(lambda: train.train(args))
    args = train.parse_args([*resume, "--tag", "iter_0000020", "--save", launched_ckpt])
    out["later_tags"] = error(lambda: train.train(args))
    return out


def _error_of(fn) -> str | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test looks at the type and the message
        return f"{type(exc).__name__}: {exc}"
    return None


def _engine_checks(rank, world, launched_ckpt):
    os.environ.update(ENV)
    import tempfile

    import torch
    from megatron_eplb.patches import deepspeed as eplb_ds

    from megatron_eplb.checkpoint import logical_optimizer_state

    out: dict = {}
    dyn = {"dynamic_eplb": True, "num_iterations_eplb_update": 3, "num_wait_worker_iterations": 0,
           "eplb_max_plan_wait": 60.0, "init_redundancy_expert": 2, "eplb_layers_per_step": 2}  # fmt: skip
    for stage in (0, 1):
        _, _, base, _ = _train(stage, False, 10)
        engine, manager, eplb, records = _train(stage, dyn, 10, policy_fn=_shift_policy)
        out[f"z{stage}"] = (base, eplb, records)
        out[f"bf16_z{stage}"] = _bf16_checks(stage, dyn)
        out[f"grouped_bf16_z{stage}"] = _bf16_checks(stage, dyn, ("--moe-grouped-gemm",))
    # checkpoint: save under one placement, load into another; every logical expert and its state survive
    tmp = Path(tempfile.gettempdir()) / f"eplb_ds_ckpt_{os.environ['MASTER_PORT']}"
    eplb_ds.save_checkpoint(engine, manager, tmp, tag="t")
    before = manager.handle.logical_state_dict()
    opt_before = logical_optimizer_state(engine.module, manager.handle, eplb_ds.DeepSpeedSlotState(engine))
    engine2, manager2, _, _ = _train(1, {"init_redundancy_expert": 4}, 0)
    out["ckpt_again"] = _error_of(lambda: eplb_ds.save_checkpoint(engine, manager, tmp, tag="t"))
    default = eplb_ds.save_checkpoint(engine, manager, tmp)  # the tag by step, then latest
    out["ckpt_default_tag"] = (default.name, (tmp / "latest").read_text().strip())
    info = eplb_ds.load_checkpoint(engine2, manager2, tmp, tag="t")
    out["ckpt_placement"] = info["placement"]
    out["ckpt_optimizer_step"] = (info["optimizer_step"], _step_counts(engine2))
    after = manager2.handle.logical_state_dict()
    opt_after = logical_optimizer_state(engine2.module, manager2.handle, eplb_ds.DeepSpeedSlotState(engine2))
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
    out["bias"] = _expert_bias_checks(dyn)
    out["gas"] = _accumulation_checks(dyn)
    out["generation"] = _generation_checks(launched_ckpt)
    out["pitfalls"] = _pitfalls(tmp, launched_ckpt)
    torch.distributed.barrier()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@pytest.fixture(scope="module")
def engine_checks(launched):
    from dist import run_distributed

    out, _, _ = launched
    return run_distributed(_engine_checks, 2, str(out / "checkpoint"), timeout=480, env=ENV)[0]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
def test_losses_same_as_without_eplb(engine_checks, stage):
    base, eplb, records = engine_checks[f"z{stage}"]
    assert records >= 2, "no rebalance completed"
    assert _rel(eplb, base) <= 1e-5, (base, eplb)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("experts", ["SequentialMLP", "GroupedMLP"])
def test_bf16_moves_are_exact_and_replicas_within_bf16_rounding(engine_checks, stage, experts):
    c = engine_checks[f"{'grouped_' if experts == 'GroupedMLP' else ''}bf16_z{stage}"]
    # the optimizer DeepSpeed builds: per-parameter fp32 masters (ZeRO 0) or flat fp32 partitions (ZeRO 1)
    assert c["optimizer"] == ("FP16_UnfusedOptimizer" if stage == 0 else "DeepSpeedZeroOptimizer")
    assert {c[run]["experts"] for run in ("static_r2", "moves_r0", "moves_r2")} == {experts}
    moved = c["moves_r0"]
    assert moved["records"] >= 2 and {"exp_avg", "exp_avg_sq", "fp32", "weight"} <= set(moved["keys"])
    # Without replicas the math is the same, in the same order: moving experts (bf16 weights, fp32 masters,
    # Adam moments) leaves the run bit-identical; a master or moment left behind would break this.
    assert moved["losses"] == c["base"]
    assert all(d == 0.0 for d in moved["state_diff"].values()), moved["state_diff"]
    # With replicas, moves add nothing to the static-replica run; both stay within bf16 rounding of the
    # replica-gradient sum against the run without EPLB.
    assert c["moves_r2"]["records"] >= 2 and c["static_r2"]["records"] == 0
    assert c["moves_r2"]["losses"] == c["static_r2"]["losses"]
    assert all(d == 0.0 for d in c["moves_r2_vs_static_r2"].values()), c["moves_r2_vs_static_r2"]
    assert c["moves_r2"]["loss_rel"] <= BF16_REPLICA_RTOL, c["moves_r2"]["loss_rel"]


@pytest.mark.slow
def test_expert_bias_updates_under_deepspeed(engine_checks):
    c = engine_checks["bias"]
    assert c["eplb"]["score"] == "sigmoid" and c["eplb"]["records"] >= 1
    for layer, (base, eplb) in enumerate(zip(c["base"]["bias"], c["eplb"]["bias"])):
        assert base.abs().sum() > 0, f"layer {layer}: expert bias never updated"
        assert (base.float().abs() <= 6 * 1e-3 + 1e-9).all()  # at most one step of the rate per step
        assert np.array_equal(base.numpy(), eplb.numpy()), (layer, base, eplb)
    assert _rel(c["eplb"]["losses"], c["base"]["losses"]) <= 1e-5


@pytest.mark.slow
def test_gradient_accumulation_steps_eplb_at_boundaries_only(engine_checks):
    c = engine_checks["gas"]
    assert c["eplb"]["gas"] == 2
    assert c["eplb"]["step_counts"] == [
        (i + 1) // 2 for i in range(12)
    ]  # manager.step() every 2nd micro-step
    assert 1 <= c["eplb"]["records"] <= 3  # a record is returned by the one step() that completed it
    assert _rel(c["eplb"]["losses"], c["base"]["losses"]) <= 1e-5


@pytest.mark.slow
def test_checkpoint_tag_by_step_and_no_overwrite(engine_checks):
    again = engine_checks["ckpt_again"]
    assert (
        again.startswith("CheckpointError")
        and "already holds a checkpoint" in again
        and "overwrite=True" in again
    )
    assert engine_checks["ckpt_default_tag"] == ("iter_0000010", "iter_0000010")


@pytest.mark.slow
def test_checkpoint_keeps_every_expert(engine_checks):
    assert engine_checks["ckpt_experts"] == 2 * 8 * 2  # layers x experts x (fc1, fc2)
    assert engine_checks["ckpt_optim_experts"] == 2 * 8 * 2
    assert engine_checks["ckpt_weights_equal"]
    assert engine_checks["ckpt_optim_equal"]
    # saved with 10 slots, loaded into 12: re-planned for the new slot count from the recorded load
    assert engine_checks["ckpt_placement"]["action"] == "replanned"
    # Adam's step is one count per optimizer: saved once (10 applied steps), written into every state
    saved_step, counts = engine_checks["ckpt_optimizer_step"]
    assert saved_step == 10 and counts and set(counts) == {10}, (saved_step, counts)


@pytest.mark.slow
def test_generation_from_checkpoint_equals_generation_without_eplb(engine_checks):
    c = engine_checks["generation"]
    assert c["num_slots"] == 18 and c["replica_tokens"] > 0  # the recorded map with replicas was used
    assert c["new_tokens"] == 12 and c["equal"]
    # experts moved mid-generation, same tokens; a rebalance either moved experts or its plan kept every slot
    assert c["dynamic_rebalances"] >= 1 and c["dynamic_equal"]
    assert set(c["dynamic_outcomes"]) <= {"committed", "no_change"}, c["dynamic_outcomes"]


@pytest.mark.slow
def test_pitfalls_at_initialize_are_clear_errors(engine_checks):
    c = engine_checks["pitfalls"]
    assert "do not divide over EP size 2" in c["redundancy"]
    assert "DeepSpeedEPLBError" in c["ep_vs_world"] and "does not divide the world size 2" in c["ep_vs_world"]
    assert "EPLBConfigError" in c["missing_map"] and "expert_map_record_path" in c["missing_map"]
    assert (
        "the map is for 4 ranks" in c["map_for_other_ep"]
        and "expert-parallel size is 2" in c["map_for_other_ep"]
    )
    bad = c["unwritable"]
    assert bad.startswith("SetupError: train.py: error:") and "the model was built" not in bad
    assert "--save" in bad and "is not writable (NotADirectoryError" in bad
    assert "--metrics-out" in bad and "is a directory" in bad
    assert (
        "--save-interval 3 is not a multiple of gradient_accumulation_steps 2"
        in c["interval_vs_accumulation"]
    )
    assert (
        f"is at iteration {TRAIN_ITERS} and --train-iters is {TRAIN_ITERS} (the total, as in Megatron): nothing "
        "to train" in c["nothing_to_train"]
    )
    assert "holds checkpoints past iteration 20 (iter_0000040, iter_0000060)" in c["later_tags"]
    assert "--overwrite-checkpoints" in c["later_tags"]


# ============================================================================ resume at another EP size


def _resume_checks(rank, world, ckpt_dir):
    """One process (world 1, EP=1) resumes the launched run's EP=2 checkpoint, restores every expert, trains on."""
    import logging

    import torch
    from megatron_eplb.patches import deepspeed as eplb_ds

    from megatron_eplb.checkpoint import logical_optimizer_state

    os.environ.update(ENV)
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("megatron_eplb").addHandler(Keep())
    logging.getLogger("megatron_eplb").setLevel(logging.INFO)
    cfg = {"init_redundancy_expert": 2, "dynamic_eplb": True, "num_iterations_eplb_update": 2,
           "num_wait_worker_iterations": 0, "eplb_max_plan_wait": 60.0}  # fmt: skip
    model = [*MODEL[:-4], "--seq-length", "128", "--micro-batch-size", "2"]  # EP from the world size (1)
    engine, manager, _, _ = _train(0, cfg, 0, model=model)
    info = eplb_ds.load_checkpoint(engine, manager, ckpt_dir)
    payload = torch.load(Path(ckpt_dir) / info["tag"] / "model_logical.pt", weights_only=False)
    weights = manager.handle.logical_state_dict()
    optim = logical_optimizer_state(engine.module, manager.handle, eplb_ds.DeepSpeedSlotState(engine))
    steps_loaded = _step_counts(engine)
    weights_equal = set(payload["model"]) <= set(weights) and all(
        torch.equal(v.float(), weights[k].float()) for k, v in payload["model"].items() if torch.is_tensor(v)
    )
    optim_equal = set(payload["optimizer"]) == set(optim) and all(
        torch.equal(v.float(), optim[k][s].float())
        for k, states in payload["optimizer"].items()
        for s, v in states.items()
    )
    experts = len([k for k in payload["optimizer"] if ".local_experts." in k])
    # continue training in the new layout: the resumed model trains on and rebalances
    import train
    from megatron_eplb.patches.megatron import find_moe_layers

    args = train.parse_args([*model, "--no-wandb"])
    b, t = args.micro_batch_size, args.seq_length
    gen = torch.Generator().manual_seed(0)
    losses, records = [], 0
    for _ in range(4):
        tok = torch.randint(0, 256, (b, t + 1), generator=gen)
        pos = torch.arange(t)[None].expand(b, -1)
        loss = engine(tok[:, :-1], pos, train.causal_mask(t), labels=tok[:, 1:]).float().mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        records += engine.eplb_last_record is not None
    manager.close()
    return {
        "info": info,
        "ep_size": manager.handle.ep_size,
        "num_layers": len(find_moe_layers(engine.module)),
        "weights_equal": weights_equal,
        "optim_equal": optim_equal,
        "experts": experts,
        "placement": manager.handle.placement.phy2log.tolist(),
        "losses": losses,
        "records": records,
        "history": len(manager.history),
        "optimizer_step": (payload["optimizer_step"], steps_loaded, _step_counts(engine)),
        "messages": messages,
    }


@pytest.fixture(scope="module")
def resumed(launched):
    from dist import run_distributed

    out, _, _ = launched
    return run_distributed(_resume_checks, 1, str(out / "checkpoint"), timeout=300, env=ENV)[0]


@pytest.mark.slow
def test_resume_on_fewer_ranks_replans_and_restores_every_expert(resumed):
    info = resumed["info"]["placement"]
    assert resumed["ep_size"] == 1
    assert info["action"] == "replanned" and info["saved_ep_size"] == 2 and info["ep_size"] == 1
    assert info["num_slots"] == 18 and 0.9 <= info["balancedness"] <= 1.0
    placement = np.asarray(resumed["placement"])
    assert placement.shape == (4, 18) and all(set(row) == set(range(16)) for row in placement)
    assert resumed["experts"] == 4 * 16 * 2  # every logical expert's fc1 + fc2 with its optimizer state
    assert resumed["weights_equal"] and resumed["optim_equal"]
    assert any("re-planned for EP=1" in m and "saved at EP=2" in m for m in resumed["messages"]), resumed[
        "messages"
    ]
    assert all(np.isfinite(resumed["losses"])) and resumed["history"] >= 1
    # the resumed optimizer continues from the saved step count (the launched run's steps), then takes 4 more
    saved, loaded, after = resumed["optimizer_step"]
    assert saved == TRAIN_ITERS and set(loaded) == {TRAIN_ITERS}, resumed["optimizer_step"]
    assert set(after) == {TRAIN_ITERS + 4}, resumed["optimizer_step"]
