"""Balancedness, imbalance ratio, churn, similarity and load files (DESIGN §5)."""

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_eplb import stats
from megatron_eplb.placement import ExpertPlacement


def test_balancedness_splits_a_replicated_expert_evenly():
    # 2 ranks x 3 slots, 4 experts; expert 0 (load 6) has copies on both ranks.
    p = ExpertPlacement(np.array([[0, 1, 2, 0, 3, 3]]), 2, 4, allow_same_rank_copies=True)
    load = np.array([[6.0, 1.0, 2.0, 4.0]])
    np.testing.assert_allclose(stats.slot_loads_from_logical(p.phy2log, load), [[3, 1, 2, 3, 2, 2]])
    rl = stats.rank_loads(p, load)
    np.testing.assert_allclose(rl, [[6.0, 7.0]])
    np.testing.assert_allclose(stats.balancedness(rl), [6.5 / 7.0])
    np.testing.assert_allclose(stats.expert_load_balance_ratio(rl), [7.0 / 6.5])


def test_aggregates_are_reduced_over_the_right_axis():
    p = ExpertPlacement.default(2, 4, 2)
    load = np.array([[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 1.0, 1.0]])  # layer 0 perfect, layer 1 6 vs 2
    s = stats.balance_summary(p, load)
    np.testing.assert_allclose(s["per_layer"], [1.0, 4.0 / 6.0])
    assert s["mean"] == pytest.approx((1.0 + 4.0 / 6.0) / 2)
    assert s["sum_ratio"] == pytest.approx((2.0 + 4.0) / (2.0 + 6.0))
    assert s["max_over_mean"] == pytest.approx((1.0 + 1.5) / 2)


def test_measured_per_slot_loads():
    p = ExpertPlacement(np.array([[0, 1, 0, 2]]), 2, 3)
    s = stats.balance_summary(p, np.array([[5.0, 1.0, 2.0, 2.0]]), per_slot=True)
    assert s["mean"] == pytest.approx(5.0 / 6.0)


def test_excluded_ranks_do_not_count_in_the_mean():
    p = ExpertPlacement(np.array([[0, 1, 2, 3, -1, -1]]), 3, 4)
    assert stats.balance_summary(p, np.ones((1, 4)))["mean"] == pytest.approx(1.0)


def test_moved_slots_ignore_moves_within_a_rank():
    old = ExpertPlacement(np.array([[0, 1, 2, 3], [0, 1, 2, 3]]), 2, 4)
    new = ExpertPlacement(np.array([[1, 0, 3, 2], [0, 2, 1, 3]]), 2, 4)
    assert stats.moved_slots(old, new).tolist() == [0, 2]
    assert stats.moved_bytes(old, new, 100) == 200
    assert stats.moved_slots(old, old).tolist() == [0, 0]


def test_similarity():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[0.0, 1.0], [2.0, 2.0], [1.0, 1.0]])
    np.testing.assert_allclose(stats.load_similarity(a, b), [0.0, 1.0, 1.0])


def test_read_load_file_drops_dense_rows(tmp_path):
    path = tmp_path / "load.json"
    path.write_text(json.dumps({"logical_count": [[0, 0, 0], [1, 2, 3], [0, 0, 0], [4, 5, 6]]}))
    np.testing.assert_array_equal(stats.read_load_file(path), [[1, 2, 3], [4, 5, 6]])
    path.write_text(json.dumps({"logical_count": [[1, -2, 3]]}))
    with pytest.raises(ValueError, match="negative or non-finite"):
        stats.read_load_file(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        stats.read_load_file(tmp_path / "none.json")


@pytest.mark.parametrize(
    "content, message",
    [
        ("3", "expected a JSON object with a 'logical_count'"),
        ('{"logical_count": [[1, 2], [3]]}', r"is ragged: its rows have \[1, 2\] entries"),
        ('{"logical_count": [[1, "2"]]}', r"logical_count\[0\]\[1\] = '2' is not a number"),
        ('{"logical_count": [[1, true]]}', r"logical_count\[0\]\[1\] = True is not a number"),
        ('{"logical_count": [1, 2]}', "must be a list of rows"),
        ('{"logical_count": [[1, NaN]]}', "negative or non-finite"),
    ],
)
def test_bad_load_files_name_the_file_and_the_cause(tmp_path, content, message):
    path = tmp_path / "load.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as exc:
        stats.read_load_file(path)
    assert str(path) in str(exc.value)


def test_read_one_load_of_a_file_of_several_models(tmp_path):
    """The OLMoE/Mixtral counts file (real_traces/olmoe_routing_output): FILE#MODEL/DOMAIN[/top1]."""
    data = {"models": {"olmoe": {"num_experts": 4, "counts": {"arxiv": [[1, 2, 3, 4], [4, 3, 2, 1]]},
                                  "counts_top1": {"arxiv": [[1, 0, 0, 1], [0, 1, 1, 0]]}},
                       "mistral": {"num_experts": 2, "counts": {"c4": [[5, 6]]}}}}  # fmt: skip
    path = tmp_path / "counts.json"
    path.write_text(json.dumps(data))
    np.testing.assert_array_equal(stats.read_load_file(f"{path}#olmoe/arxiv"), [[1, 2, 3, 4], [4, 3, 2, 1]])
    np.testing.assert_array_equal(
        stats.read_load_file(f"{path}#olmoe/arxiv/top1"), [[1, 0, 0, 1], [0, 1, 1, 0]]
    )
    np.testing.assert_array_equal(stats.read_load_file(f"{path}#mistral/c4"), [[5, 6]])
    with pytest.raises(
        ValueError, match="holds the loads of several models .* there: olmoe/arxiv, mistral/c4"
    ):
        stats.read_load_file(path)
    with pytest.raises(ValueError, match="no load 'olmoe/c4'"):
        stats.read_load_file(f"{path}#olmoe/c4")
    with pytest.raises(
        ValueError, match="no load 'mistral/c4/top1'; there: .*; top-1 counts: olmoe/arxiv/top1$"
    ):
        stats.read_load_file(f"{path}#mistral/c4/top1")
    pickle = tmp_path / "arxiv.pkl"
    pickle.write_bytes(b"\x80\x04\x95\x00")
    with pytest.raises(
        ValueError, match="is a Python pickle; .*olmoe_mixtral_domain_expert_counts.json#MODEL/DOMAIN"
    ):
        stats.read_load_file(pickle)
    real = Path(__file__).resolve().parents[2] / "shared/data/real_traces/olmoe_routing_output"
    real = real / "olmoe_mixtral_domain_expert_counts.json"
    if real.is_file():
        assert stats.read_load_file(f"{real}#olmoe/arxiv").shape == (3, 64)
        assert stats.read_load_file(f"{real}#mistral/github").shape == (3, 8)


REAL_TRACES = Path(__file__).resolve().parents[2] / "shared/data/real_traces"


@pytest.mark.skipif(not REAL_TRACES.is_dir(), reason="../shared/data/real_traces not present")
def test_every_real_trace_works_with_the_cli(capsys):
    """Every load in ../shared/data/real_traces, through ``megatron-eplb evaluate`` and ``simulate``: each
    DeepSeek-V3 file, each model/domain (and top-1 counts) of the OLMoE/Mixtral file; the original pickles
    get one line that points at the JSON."""
    from megatron_eplb.cli import main

    olmoe = REAL_TRACES / "olmoe_routing_output" / "olmoe_mixtral_domain_expert_counts.json"
    models = json.loads(olmoe.read_text())["models"]
    loads = [str(p) for p in sorted((REAL_TRACES / "sglang_deepseek_v3").glob("*.json"))]
    loads += [f"{olmoe}#{m}/{d}" for m, v in models.items() for d in v["counts"]]
    loads += [f"{olmoe}#{m}/{d}/top1" for m, v in models.items() for d in v.get("counts_top1", {})]
    assert len(loads) >= 4 + 13 + 10
    for load in loads:
        experts = stats.read_load_file(load).shape[1]
        ep = 8 if experts >= 64 else 2
        argv = ["simulate", "--load", load, "--ep-sizes", str(ep), "--redundancy", "ep", "--plot", ""]
        assert main([*argv, "--policies", "none,greedy", "--no-progress"]) == 0, load
        out = capsys.readouterr().out
        assert "greedy" in out and "none" in out, (load, out)
    for pickle in sorted((REAL_TRACES / "olmoe_routing_output" / "original_pkl").rglob("*.pkl"))[:3]:
        assert main(["evaluate", "--load", str(pickle), "--map", "unused.json"]) == 2
        assert "is a Python pickle" in capsys.readouterr().err


def test_realized_steps_beside_the_default_placement():
    placement = ExpertPlacement(np.array([[0, 1, 2, 3, 0, 1]]), 2, 4)  # experts 0 and 1 on both ranks
    logical = np.array([[[6, 2, 1, 1]], [[0, 0, 0, 0]], [[2, 2, 2, 2]]])  # [k, L, E]
    per_slot = np.array([[[3, 1, 1, 1, 3, 1]], [[0] * 6], [[2, 1, 2, 2, 0, 1]]])  # [k, L, P]
    entry = stats.realized_steps(placement, logical, per_slot, last_step=12)
    assert (entry["first_step"], entry["last_step"], entry["steps"]) == (10, 12, 2)  # the empty step left out
    assert entry["eplb/balancedness_realized"] == pytest.approx((1.0 + 0.8) / 2)
    assert entry["eplb/balancedness_realized_min"] == pytest.approx(0.8)
    # Megatron's default (experts 0, 1 on rank 0; 2, 3 on rank 1) on the same routing: 5/8, then 1
    assert entry["eplb/balancedness_default_placement"] == pytest.approx((0.625 + 1.0) / 2)
    assert stats.realized_steps(placement, logical[1:2], per_slot[1:2], last_step=11) is None


def test_layers_to_replan_by_similarity_to_each_layers_last_update():
    load = np.array([[10.0, 0.0], [5.0, 5.0], [1.0, 1.0]])
    assert stats.layers_to_replan(load, None, 0.9) == [0, 1, 2]  # no update yet: every layer
    baseline = stats.update_baseline(None, load.astype(np.int64), [0])  # the first time: all of it
    assert baseline.dtype == np.float64 and np.array_equal(baseline, load)
    assert stats.layers_to_replan(load, baseline, None) == [0, 1, 2]  # no threshold: every layer
    new = np.array([[0.0, 10.0], [5.0, 5.0], [1.0, 0.9]])
    assert stats.layers_to_replan(new, baseline, 0.9) == [0]
    stats.update_baseline(baseline, new, [0])  # only the updated layer's row
    assert baseline[0].tolist() == [0.0, 10.0] and baseline[2].tolist() == [1.0, 1.0]
