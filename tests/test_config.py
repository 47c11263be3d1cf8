"""EPLBConfig: every key, every source with its precedence, and one clear error per bad input."""

import argparse
import json
from pathlib import Path

import pytest

from megatron_eplb import EPLBConfig, EPLBConfigError, ExpertPlacement, add_eplb_args

SEED_KEYS = [
    "dynamic_eplb",
    "num_iterations_eplb_update",
    "num_wait_worker_iterations",
    "gate_eplb",
    "expert_map_path",
    "expert_map_record_path",
    "init_redundancy_expert",
    "eplb_update_interval",
    "eplb_update_threshold",
]


def test_every_design_key_exists_with_documented_defaults():
    keys = EPLBConfig.keys()
    for key in SEED_KEYS + [
        "eplb_policy",
        "eplb_num_nodes",
        "eplb_num_groups",
        "eplb_window_size",
        "eplb_worker_timeout",
        "eplb_layers_per_step",
        "eplb_churn_weight",
        "eplb_replica_dispatch",
        "eplb_log_interval",
    ]:
        assert key in keys
    ours = [k for k in keys if k not in SEED_KEYS]
    assert all(k.startswith("eplb_") for k in ours)
    cfg = EPLBConfig()
    assert cfg.num_iterations_eplb_update == 400 and cfg.num_wait_worker_iterations == 30
    assert cfg.dynamic_eplb is False and cfg.eplb_policy == "auto" and cfg.eplb_replica_dispatch == "balanced"


def test_dict_and_json_round_trip():
    cfg = EPLBConfig.from_dict(
        {"dynamic_eplb": True, "init_redundancy_expert": 2, "eplb_update_interval": 30}
    )
    assert cfg.eplb_update_interval == 30.0
    assert EPLBConfig.from_json(cfg.to_json()) == cfg
    assert EPLBConfig.from_dict(cfg.to_dict()) == cfg


def test_yaml_section_and_top_level(tmp_path):
    section = tmp_path / "a.yaml"
    section.write_text("num_layers: 4\neplb:\n  dynamic_eplb: true\n  eplb_policy: low_churn\n")
    assert EPLBConfig.from_yaml(section).eplb_policy == "low_churn"
    top = tmp_path / "b.yaml"
    top.write_text("num_layers: 4\nhidden_size: 64\ndynamic_eplb: true\ngate_eplb: true\n")
    cfg = EPLBConfig.from_yaml(top)
    assert cfg.dynamic_eplb and cfg.gate_eplb
    typo = tmp_path / "c.yaml"
    typo.write_text("num_layers: 4\neplb_polcy: greedy\n")
    with pytest.raises(EPLBConfigError, match="unknown EPLB key 'eplb_polcy'; did you mean 'eplb_policy'"):
        EPLBConfig.from_yaml(typo)


def test_ds_config_section():
    cfg = EPLBConfig.from_ds_config({"train_batch_size": 8, "eplb": {"dynamic_eplb": True}})
    assert cfg.dynamic_eplb
    assert EPLBConfig.from_ds_config({"train_batch_size": 8}) == EPLBConfig()


def test_flags_are_kebab_case_and_precedence_is_ds_yaml_json_flags(tmp_path):
    parser = add_eplb_args(argparse.ArgumentParser())
    flags = {a for action in parser._actions for a in action.option_strings}
    for key in EPLBConfig.keys():
        assert "--" + key.replace("_", "-") in flags
    assert {"--eplb-config", "--additional-config", "--no-dynamic-eplb"} <= flags

    yaml_file = tmp_path / "e.yaml"
    yaml_file.write_text("eplb:\n  eplb_window_size: 7\n  eplb_log_interval: 3\n  eplb_layers_per_step: 2\n")
    ds = {
        "eplb": {
            "eplb_window_size": 5,
            "eplb_log_interval": 5,
            "eplb_layers_per_step": 5,
            "gate_eplb": True,
            "dynamic_eplb": True,
        }  # fmt: skip
    }
    args = parser.parse_args(
        [
            "--eplb-config",
            str(yaml_file),
            "--additional-config",
            json.dumps({"eplb_log_interval": 11, "eplb_layers_per_step": 11}),
            "--eplb-layers-per-step",
            "13",
        ]
    )
    cfg = EPLBConfig.from_args(args, ds_config=ds)
    assert cfg.gate_eplb is True  # ds_config only
    assert cfg.eplb_window_size == 7  # YAML beats ds_config
    assert cfg.eplb_log_interval == 11  # --additional-config beats YAML
    assert cfg.eplb_layers_per_step == 13  # a flag beats everything
    assert (
        EPLBConfig.from_args(
            parser.parse_args(["--no-dynamic-eplb"]), ds_config={"eplb": {"dynamic_eplb": True}}
        ).dynamic_eplb
        is False
    )


BAD = [
    ({"dynamic_epl": True}, r"unknown EPLB key 'dynamic_epl'; did you mean 'dynamic_eplb'\?"),
    ({"eplb_windows_size": 3}, r"did you mean 'eplb_window_size'"),
    ({"num_iterations_eplb_update": 0}, r"num_iterations_eplb_update=0 must be >= 1"),
    ({"num_iterations_eplb_update": "400"}, r"num_iterations_eplb_update must be an integer, got '400'"),
    ({"dynamic_eplb": "yes"}, r"dynamic_eplb must be true or false, got 'yes'"),
    ({"eplb_update_interval": 0}, r"eplb_update_interval=0.0 must be > 0"),
    ({"eplb_update_interval": -5}, r"eplb_update_interval=-5.0 must be > 0"),
    ({"eplb_update_threshold": 1.5}, r"eplb_update_threshold=1.5 must be <= 1"),
    ({"init_redundancy_expert": -1}, r"init_redundancy_expert=-1 must be >= 0"),
    ({"eplb_policy": "grredy"}, r"eplb_policy='grredy' is not one of .* \(did you mean 'greedy'\?\)"),
    (
        {"eplb_replica_dispatch": "nearest"},
        r"eplb_replica_dispatch='nearest' is not one of even, local_first",
    ),
    ({"eplb_worker_timeout": float("nan")}, r"eplb_worker_timeout must be finite"),
    (
        {"expert_map_path": "/nonexistent/map.json"},
        r"does not exist; record a map first .*expert_map_record_path",
    ),
]


@pytest.mark.parametrize(
    "data,message", BAD, ids=[str(next(iter(b[0]))) + "=" + repr(next(iter(b[0].values()))) for b in BAD]
)
def test_bad_keys_and_values_give_one_clear_error(data, message):
    with pytest.raises(EPLBConfigError, match=message):
        EPLBConfig.from_dict(data)


def test_additional_config_must_be_a_json_object():
    with pytest.raises(EPLBConfigError, match="not valid JSON"):
        EPLBConfig.from_json("{dynamic_eplb: true}")
    with pytest.raises(EPLBConfigError, match="must be a JSON object"):
        EPLBConfig.from_json("[1, 2]")


def test_validate_for_model(tmp_path):
    EPLBConfig(init_redundancy_expert=2).validate_for(num_layers=4, num_experts=16, ep_size=2)
    with pytest.raises(
        EPLBConfigError,
        match=r"init_redundancy_expert=1: 16 experts \+ 1 redundant = 17 slots do not divide over EP size 4; use one of \[0, 4\]",
    ):
        EPLBConfig(init_redundancy_expert=1).validate_for(num_layers=4, num_experts=16, ep_size=4)
    with pytest.raises(EPLBConfigError, match="eplb_num_nodes=3 does not divide the EP size 8"):
        EPLBConfig(eplb_num_nodes=3).validate_for(num_layers=4, num_experts=16, ep_size=8)
    with pytest.raises(EPLBConfigError, match="eplb_num_groups=3 does not divide the 16 experts"):
        EPLBConfig(eplb_num_groups=3).validate_for(num_layers=4, num_experts=16, ep_size=8)
    # DeepSeek's policy accepts what its eplb.py accepts: groups that do not divide the experts plan globally.
    EPLBConfig(eplb_num_groups=3, eplb_policy="deepseek").validate_for(
        num_layers=4, num_experts=16, ep_size=8
    )
    path = tmp_path / "map.json"
    ExpertPlacement.default(2, 16, 2, 2).to_json(path)
    cfg = EPLBConfig(expert_map_path=str(path))
    cfg.validate_for(num_layers=2, num_experts=16, ep_size=2)
    with pytest.raises(EPLBConfigError, match="the map has 2 MoE layers but the model has 4"):
        cfg.validate_for(num_layers=4, num_experts=16, ep_size=2)
    with pytest.raises(EPLBConfigError, match="the map is for 2 ranks"):
        cfg.validate_for(num_layers=2, num_experts=16, ep_size=6)


def test_config_pitfalls_are_clear_errors(tmp_path):
    with pytest.raises(EPLBConfigError, match="expert_map_record_path"):
        EPLBConfig(expert_map_path=str(tmp_path / "missing.json"))
    with pytest.raises(EPLBConfigError, match="do not divide over EP size 2"):
        EPLBConfig(init_redundancy_expert=1).validate_for(4, 16, 2)


def test_bad_input_changes_nothing():
    cfg = EPLBConfig(dynamic_eplb=True)
    before = cfg.to_dict()
    with pytest.raises(EPLBConfigError):
        cfg.replace(eplb_window_size=0)
    assert cfg.to_dict() == before


def test_choice_lists_come_from_one_place():
    from megatron_eplb import config, policy
    from megatron_eplb.policy.common import NODE_LOCALITY

    assert config.POLICIES == policy.POLICY_NAMES == policy.policy_names()
    assert policy.POLICY_NAMES == ("auto", "greedy", "hierarchical", "low_churn", "deepseek")
    assert policy.NODE_LOCALITY is NODE_LOCALITY == ("relaxed", "strict")
    assert config.REPLICA_DISPATCH == ("even", "local_first", "balanced")
    choices = {a.dest: a.choices for a in add_eplb_args(argparse.ArgumentParser())._actions}
    assert tuple(choices["eplb_policy"]) == policy.POLICY_NAMES
    assert choices["eplb_node_locality"] is NODE_LOCALITY
    assert choices["eplb_replica_dispatch"] is config.REPLICA_DISPATCH


@pytest.mark.slow
def test_eplb_manager_is_exported_lazily():
    """`import megatron_eplb` stays light (no torch.distributed); `megatron_eplb.EPLBManager` imports the
    manager on first use."""
    import subprocess
    import sys

    code = (
        "import sys, megatron_eplb\n"
        "assert 'EPLBManager' in megatron_eplb.__all__ and 'EPLBManager' in dir(megatron_eplb)\n"
        "assert 'megatron_eplb.manager' not in sys.modules and 'torch.distributed' not in sys.modules\n"
        "from megatron_eplb import EPLBManager\n"
        "from megatron_eplb.manager import EPLBManager as M\n"
        "assert EPLBManager is M\n"
        "try:\n"
        "    megatron_eplb.NoSuchThing\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def test_rebalancing_property_is_gone_and_canary_doc_is_measured():
    assert not hasattr(EPLBConfig, "rebalancing")
    doc = {f.name: f.metadata["doc"] for f in __import__("dataclasses").fields(EPLBConfig)}
    assert "1.4x" not in doc["eplb_transfer_canary"] and "1.1x" in doc["eplb_transfer_canary"]


def test_record_path_that_is_the_input_map_or_a_directory_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "map.json"
    ExpertPlacement.default(2, 16, 2, 2).to_json(path)
    before = path.read_text()
    monkeypatch.chdir(tmp_path)
    for record in (str(path), "map.json", f"{tmp_path}/./map.json"):  # the same file, however it is spelled
        with pytest.raises(
            EPLBConfigError, match="are the same file .* would overwrite the map this run starts"
        ):
            EPLBConfig(expert_map_path=str(path), expert_map_record_path=record)
    with pytest.raises(EPLBConfigError, match="map.recorded.json"):
        EPLBConfig.from_dict({"expert_map_path": "map.json", "expert_map_record_path": "map.json"})
    with pytest.raises(
        EPLBConfigError, match="expert_map_record_path=.* is a directory; give the map a file name"
    ):
        EPLBConfig(expert_map_record_path=str(tmp_path))
    assert path.read_text() == before
    EPLBConfig(
        expert_map_path=str(path), expert_map_record_path=str(tmp_path / "recorded.json")
    )  # beside it: fine


def test_shipped_configs_record_no_shared_map():
    """The dynamic and record YAMLs leave the record path to the run (its own output directory)."""
    root = Path(__file__).resolve().parent.parent / "configs"
    for name in ("eplb_dynamic.yaml", "eplb_record.yaml"):
        assert EPLBConfig.from_yaml(root / name).expert_map_record_path is None, name


def test_contradictions_get_an_error_or_a_warning_that_says_what_happens(tmp_path, caplog):
    with pytest.raises(EPLBConfigError, match="gate_eplb=true rebalances once, but dynamic_eplb is false"):
        EPLBConfig(gate_eplb=True)
    assert EPLBConfig(dynamic_eplb=True, gate_eplb=True).notes() == []
    notes = EPLBConfig(expert_map_record_path=str(tmp_path / "m.json")).notes()
    assert len(notes) == 1 and "dynamic_eplb is false: no rebalance runs" in notes[0]
    # a map fixes the redundancy: another init_redundancy_expert is an error, not silently ignored
    path = tmp_path / "map.json"
    ExpertPlacement.default(2, 16, 2, 2).to_json(path)
    EPLBConfig(expert_map_path=str(path), init_redundancy_expert=2).validate_for(2, 16, 2)
    with pytest.raises(
        EPLBConfigError, match="init_redundancy_expert=4 but the map .* has 2 redundant slots"
    ):
        EPLBConfig(expert_map_path=str(path), init_redundancy_expert=4).validate_for(2, 16, 2)
    # a flag that switches off what the YAML asks for is logged with both
    yaml_file = tmp_path / "e.yaml"
    yaml_file.write_text("eplb:\n  dynamic_eplb: true\n  eplb_window_size: 7\n")
    parser = add_eplb_args(argparse.ArgumentParser())
    args = parser.parse_args(["--eplb-config", str(yaml_file), "--no-dynamic-eplb"])
    with caplog.at_level("WARNING", logger="megatron_eplb"):
        assert EPLBConfig.from_args(args).dynamic_eplb is False
    assert f"the command line sets dynamic_eplb=False over True from {yaml_file}" in caplog.text
    assert "eplb_window_size" not in caplog.text  # only what was overridden
