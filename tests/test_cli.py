"""`megatron-eplb validate-map` and `inspect`."""

import json
from pathlib import Path

import pytest

from megatron_eplb.cli import main
from megatron_eplb.placement import ExpertPlacement

REAL = Path(__file__).resolve().parents[2] / "shared/data/real_traces/sglang_deepseek_v3"


@pytest.fixture
def map_file(tmp_path):
    path = tmp_path / "map.json"
    ExpertPlacement.default(3, 8, 2, 2).to_json(path)
    return path


def test_validate_map_ok_and_mismatch(map_file, capsys):
    assert (
        main(["validate-map", str(map_file), "--num-layers", "3", "--num-experts", "8", "--ep-size", "2"])
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("OK") and "2 redundant" in out[0]
    assert main(["validate-map", str(map_file), "--ep-size", "4"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("INVALID") and "expert-parallel size is 4" in out[0]


def test_validate_map_names_the_first_problem(tmp_path, capsys):
    data = json.loads(ExpertPlacement.default(2, 4, 2, 2).to_json())
    data["layer_list"][1]["device_list"][1]["device_expert"] = [3, 3, 1]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    assert main(["validate-map", str(path)]) == 1
    assert "layer 1 rank 1 slot 1: a second copy of expert 3" in capsys.readouterr().out
    assert main(["validate-map", str(tmp_path / "missing.json")]) == 1
    assert "does not exist" in capsys.readouterr().out


def test_inspect_with_load(map_file, tmp_path, capsys):
    load = tmp_path / "load.json"
    load.write_text(json.dumps({"logical_count": [[0] * 8] + [list(range(1, 9))] * 3}))
    assert main(["inspect", str(map_file), "--load", str(load)]) == 0
    out = capsys.readouterr().out
    assert "0x2, 1x2" in out and "balancedness: mean over layers" in out
    bad = tmp_path / "bad_load.json"
    bad.write_text(json.dumps({"logical_count": [list(range(1, 9))] * 2}))
    assert main(["inspect", str(map_file), "--load", str(bad)]) == 2
    assert "load has shape [2, 8] but the map has 3 MoE layers" in capsys.readouterr().err


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/real_traces not present")
def test_inspect_real_trace(tmp_path, capsys):
    path = tmp_path / "map.json"
    ExpertPlacement.default(58, 256, 32, 32).to_json(path)
    assert main(["inspect", str(path), "--load", str(REAL / "prefill_in512.json")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    mean = float(line.split("mean over layers ")[1].split(",")[0])
    assert 0.2 < mean < 0.8  # the default contiguous layout is badly balanced on real loads


@pytest.mark.slow
def test_python_dash_m_reports_errors_as_one_line(tmp_path):
    """`python -m megatron_eplb.cli`: a command module's CLIError is caught by the running main (one line,
    exit code 2), also for the policy commands (no `__main__` look-up any more)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-m", "megatron_eplb.cli", "evaluate", "--load", str(tmp_path / "nope.json")]
        + ["--map", str(tmp_path / "nope.json")],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("megatron-eplb evaluate: error: ") and len(run.stderr.splitlines()) == 1


def test_command_modules_do_not_import_cli():
    """One direction: cli imports the command modules, never the other way round."""
    import ast

    pkg = Path(__file__).resolve().parents[1] / "megatron_eplb"
    for name in ("cli_common.py", "cli_map.py", "cli_policy.py"):
        tree = ast.parse((pkg / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {"cli", "megatron_eplb.cli"} & imported, name
        assert "sys.modules" not in (pkg / name).read_text(), name


def test_nan_load_in_a_map_is_invalid_not_perfect_balance(tmp_path, capsys):
    data = json.loads(ExpertPlacement.default(1, 4, 2, 0).to_json())
    data["expert_load"] = [[1.0, float("nan"), 2.0, 3.0]]
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(data))  # json writes NaN, as a map recorded from a broken run could hold
    assert main(["validate-map", str(path)]) == 1
    assert "INVALID" in capsys.readouterr().out
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "expert_load[0, 1] = nan: loads must be finite and >= 0" in err and "1.0000" not in err


def test_inspect_into_a_closed_pipe_is_not_an_error(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "map.json"
    ExpertPlacement.default(4096, 8, 2, 2).to_json(path)  # more lines than a pipe holds
    code = f"import sys; from megatron_eplb.cli import main; sys.exit(main(['inspect', {str(path)!r}]))"
    proc = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {sys.executable} -c {code!r} | head -1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("ExpertPlacement(")
    assert "BrokenPipeError" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
