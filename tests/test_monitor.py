"""megatron_eplb/monitor.py: one rebalance written to every sink (wandb offline images and tables, the heat
map PNG, TensorBoard events), in process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron_eplb.manager import RebalanceRecord
from megatron_eplb.monitor import Monitor, log_realized
from megatron_eplb.placement import ExpertPlacement


def test_monitor_writes_wandb_images_tables_and_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
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


def test_log_realized_writes_the_line_and_the_eplb_metrics(caplog):
    logged = []

    class Sink:
        def log(self, step, scalars):
            logged.append((step, scalars))

    entry = {"first_step": 3, "last_step": 4, "eplb/balancedness_realized": 0.9,
             "eplb/balancedness_realized_min": 0.8, "eplb/balancedness_default_placement": 0.7, "steps": 2}  # fmt: skip
    with caplog.at_level("INFO", logger="megatron_eplb"):
        log_realized(entry, Sink())
    assert caplog.messages == [
        "EPLB steps 3-4: realized balancedness per step 0.900 (worst 0.800), Megatron's default placement on "
        "the same steps 0.700"
    ]
    assert logged == [(4, {k: v for k, v in entry.items() if k.startswith("eplb/")})]
