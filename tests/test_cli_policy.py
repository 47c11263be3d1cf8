"""`megatron-eplb plan | evaluate | simulate` (megatron_eplb/cli_policy.py)."""

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_eplb.cli import main
from megatron_eplb.placement import ExpertPlacement
from megatron_eplb.stats import moved_slots

REAL = Path(__file__).resolve().parents[2] / "shared/data/real_traces/sglang_deepseek_v3"


def _write_load(path: Path, load: np.ndarray, dense_rows: int = 1) -> Path:
    rows = [[0] * load.shape[1]] * dense_rows + load.tolist()
    path.write_text(json.dumps({"logical_count": rows}))
    return path


def _plan(load, *extra) -> list[str]:
    """``megatron-eplb plan`` argv on ``load``: EP 4, 40 slots, then ``extra``."""
    return ["plan", "--load", str(load), "--ep-size", "4", "--num-slots", "40", *map(str, extra)]


@pytest.fixture
def loads(tmp_path):
    rng = np.random.default_rng(0)
    a = _write_load(tmp_path / "a.json", np.round(rng.pareto(1.2, (4, 32)) * 100))
    b = _write_load(tmp_path / "b.json", np.round(rng.pareto(1.2, (4, 32)) * 100))
    return a, b


def test_plan_then_low_churn_then_evaluate(loads, tmp_path, capsys):
    a, b = loads
    first = tmp_path / "first.json"
    assert main(_plan(a, "--out", first)) == 0
    out = capsys.readouterr().out
    assert "policy greedy" in out and "before (default placement): balancedness" in out
    assert "after: balancedness" in out and "moved slots:" in out and " ms" in out
    placement = ExpertPlacement.from_json(first)
    assert placement.num_slots == 40 and placement.expert_load is not None
    assert placement.expert_load.shape == (4, 32)  # the dense row was dropped

    second = tmp_path / "second.json"
    assert main(_plan(b, "--previous", first, "--out", second)) == 0
    out = capsys.readouterr().out
    assert "policy low_churn" in out and f"before (previous map {first})" in out
    moved = moved_slots(placement, ExpertPlacement.from_json(second)).sum()
    assert f"moved slots: {moved} of 160" in out

    assert main(["evaluate", "--load", str(b), "--map", str(second), "--previous", str(first)]) == 0
    out = capsys.readouterr().out
    assert "balancedness" in out and "slowdown" in out and f"moved slots vs {first}: {moved}" in out


def test_plan_node_aware_and_policies(loads, tmp_path, capsys):
    a, _ = loads
    out_map = tmp_path / "m.json"
    base = _plan(a, "--num-nodes", 2, "--num-groups", 4)
    assert main(base + ["--out", str(out_map)]) == 0
    out = capsys.readouterr().out
    assert "policy hierarchical (locality relaxed)" in out and "cross-node load" in out
    assert main(base + ["--node-locality", "strict", "--out", str(out_map)]) == 0
    assert "copies off their home node 0" in capsys.readouterr().out.split("after:")[1]
    assert main(base + ["--policy", "deepseek", "--out", str(out_map)]) == 0
    wide = base[:]
    wide[wide.index("--num-slots") + 1] = "64"
    assert main(wide + ["--exclude-ranks", "3", "--out", str(out_map)]) == 0
    assert ExpertPlacement.from_json(out_map).excluded_ranks == (3,)
    capsys.readouterr()
    wide[wide.index("--num-slots") + 1] = "48"
    assert main(wide + ["--exclude-ranks", "3", "--out", str(out_map)]) == 2
    assert "node 1 has 12 slots on its active ranks but must hold its 16 experts" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-slots", "30"], "not a multiple of num_ranks=4"),
        (["--num-slots", "28"], "fewer than the 32 logical experts"),
        (["--exclude-ranks", "x"], "--exclude-ranks must be a comma-separated list"),
        (["--exclude-ranks", "7"], "rank 7 is out of range"),
        (["--num-nodes", "3"], "num_nodes=3 does not divide num_ranks=4"),
        (
            ["--ep-size", "1000000"],
            "num_ranks=1000000 is more than num_slots=40: every rank needs at least one",
        ),
        (
            ["--ep-size", "1000000", "--num-slots", "1000000"],
            "num_ranks=1,000,000 is larger than any expert-parallel",
        ),
        (["--num-slots", "100000000"], "layer-slots, more than a planner run takes (16,777,216;"),
        (["--ep-size", "64"], "num_ranks=64 is more than num_slots=40"),
        (["--ep-size", "16", "--num-slots", "20"], "number of slots; use 32 (or"),
    ],
)
def test_plan_user_errors(loads, tmp_path, capsys, argv, message):
    a, _ = loads
    args = _plan(a, "--out", tmp_path / "x.json")
    for flag, value in zip(argv[::2], argv[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-eplb plan: error:") and message.split(" (or")[0] in err
    assert "use 32 or 32" not in err
    assert not (tmp_path / "x.json").exists()


def test_huge_sizes_are_refused_before_any_plan(loads, tmp_path, capsys):
    """``--ep-size 1000000`` (and its kin): one line up front, not a process killed for memory."""
    a, _ = loads
    args = ["simulate", "--load", str(a), "--ep-sizes", "4,1000000", "--plot", "", "--no-progress"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert "--ep-sizes 1000000: num_ranks=1,000,000 is larger than any expert-parallel group" in err
    assert "policy" not in out  # nothing planned, no table


def test_plan_missing_files_and_mismatched_previous(loads, tmp_path, capsys):
    a, _ = loads
    out_map = str(tmp_path / "x.json")
    assert main(_plan(tmp_path / "nope.json", "--out", out_map)) == 2
    assert "does not exist" in capsys.readouterr().err
    other = tmp_path / "other.json"
    ExpertPlacement.default(4, 32, 8, 8).to_json(other)
    assert main(_plan(a, "--previous", other, "--out", out_map)) == 2
    assert "previous placement has 4 layers x 40 slots on 8 ranks" in capsys.readouterr().err
    assert main(["evaluate", "--load", str(a), "--map", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_evaluate_shape_mismatch(loads, tmp_path, capsys):
    a, _ = loads
    path = tmp_path / "m.json"
    ExpertPlacement.default(3, 32, 4, 8).to_json(path)
    assert main(["evaluate", "--load", str(a), "--map", str(path)]) == 2
    assert "load has shape [4, 32] but the map has 3 MoE layers" in capsys.readouterr().err


def test_simulate_table_json_and_plot(loads, tmp_path, capsys):
    a, _ = loads
    out_json, png = tmp_path / "sim.json", tmp_path / "sim.png"
    args = ["simulate", "--load", str(a), "--ep-sizes", "2,4,8", "--redundancy", "ep,8"]
    args += ["--out", str(out_json), "--plot", str(png)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "slowdown" in out and "greedy" in out and "deepseek" in out and "none" in out
    rows = json.loads(out_json.read_text())["rows"]
    assert {r["ep_size"] for r in rows} == {2, 4, 8}
    assert all(r["num_slots"] % r["ep_size"] == 0 for r in rows)
    greedy = {(r["ep_size"], r["redundancy"]): r for r in rows if r["policy"] == "greedy"}
    none = {r["ep_size"]: r for r in rows if r["policy"] == "none"}
    assert all(g["slowdown"] <= none[ep]["slowdown"] + 1e-12 for (ep, _), g in greedy.items())
    # one "none" row per EP size (it has no redundancy); R is the number of redundant slots of the row
    assert sorted(r["ep_size"] for r in rows if r["policy"] == "none") == [2, 4, 8]
    assert sorted(greedy) == [(2, 2), (2, 8), (4, 4), (4, 8), (8, 8)] and len(greedy) == 5
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["simulate", "--load", str(a), "--policies", "greedy,fast", "--plot", ""]) == 2
    assert "unknown policy 'fast'" in capsys.readouterr().err


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/real_traces not present")
def test_plan_real_trace(tmp_path, capsys):
    out_map = tmp_path / "m.json"
    args = ["plan", "--load", str(REAL / "prefill_in512.json"), "--ep-size", "32", "--num-slots", "288"]
    assert main(args + ["--out", str(out_map)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("after:")][0]
    assert float(line.split("balancedness ")[1].split()[0]) >= 0.993


def test_plan_out_directory_is_one_clear_error_before_planning(loads, tmp_path, capsys):
    a, _ = loads
    out_dir = tmp_path / "maps"
    out_dir.mkdir()
    assert main(_plan(a, "--out", out_dir)) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-eplb plan: error: --out") and "is a directory; give a file name" in err
    assert "IsADirectoryError" not in err and "plan:" not in capsys.readouterr().out  # nothing planned
    assert list(out_dir.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.json",
        "b.json",
        "maps",
    ]
    assert main(["simulate", "--load", str(a), "--ep-sizes", "4", "--out", str(out_dir), "--plot", ""]) == 2
    assert "--out" in capsys.readouterr().err
    # --out under a parent that cannot be created (a file in the way): one line, before planning
    blocker = tmp_path / "a.json"
    assert main(_plan(a, "--out", blocker / "sub" / "map.json")) == 2
    err = capsys.readouterr().err
    assert f"--out '{blocker / 'sub' / 'map.json'}': '{blocker}' is not a directory" in err, err
    assert not list(tmp_path.glob("**/*.tmp"))


def test_evaluate_worst_layer_slowdown_is_that_layers(loads, tmp_path, capsys):
    a, _ = loads
    out_map = tmp_path / "m.json"
    assert main(_plan(a, "--out", out_map)) == 0
    capsys.readouterr()
    assert main(["evaluate", "--load", str(a), "--map", str(out_map)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("worst layer"))
    balancedness = float(line.split("balancedness ")[1].split(",")[0])
    slowdown = float(line.split("perfect balance x")[1].split(";")[0])
    assert slowdown == pytest.approx(1 / balancedness, rel=1e-3) and "mean over layers x" in line
