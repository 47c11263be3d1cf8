"""ExpertPlacement: construction, derived maps, JSON round trip, validation (DESIGN §5)."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_eplb.placement import ExpertMapError, ExpertPlacement, build_log2phy

VLLM_ASCEND_EXAMPLE = {
    "moe_layer_count": 1,
    "layer_list": [
        {
            "layer_id": 0,
            "device_count": 2,
            "device_list": [
                {"device_id": 0, "device_expert": [7, 2, 0, 3, 5]},
                {"device_id": 1, "device_expert": [6, 1, 4, 7, 2]},
            ],
        }
    ],
}


def test_vllm_ascend_example_loads_with_two_redundant_copies():
    p = ExpertPlacement.from_json(json.dumps(VLLM_ASCEND_EXAMPLE))
    assert (p.num_layers, p.num_experts, p.num_ranks, p.slots_per_rank) == (1, 8, 2, 5)
    assert p.num_redundant == 2
    assert p.replica_count[0].tolist() == [1, 1, 2, 1, 1, 1, 1, 2]
    assert p.log2phy[0, 7].tolist() == [0, 8] and p.log2phy[0, 2].tolist() == [1, 9]
    assert p.log2phy[0, 0].tolist() == [2, -1]


def test_plain_format_round_trips_exactly(tmp_path):
    p = ExpertPlacement.from_json(json.dumps(VLLM_ASCEND_EXAMPLE))
    out = json.loads(p.to_json(tmp_path / "map.json"))
    assert {k: out[k] for k in VLLM_ASCEND_EXAMPLE} == VLLM_ASCEND_EXAMPLE
    assert out["num_logical_experts"] == 8
    again = ExpertPlacement.from_json(tmp_path / "map.json")
    assert again == p and again.to_json() == p.to_json()


def test_expert_load_and_num_logical_experts_round_trip():
    load = np.arange(16, dtype=float).reshape(2, 8) + 0.5
    p = ExpertPlacement.default(2, 8, 2, 2).with_load(load)
    q = ExpertPlacement.from_json(p.to_json())
    np.testing.assert_array_equal(q.expert_load, load)
    assert q == p


def test_default_layout_is_vllm_ascend():
    p = ExpertPlacement.default(3, 16, 2, 2)
    assert p.phy2log.shape == (3, 18)
    assert p.phy2log[1].tolist() == list(range(16)) + [0, 1]
    assert p.local_phy2log(1)[0].tolist() == [9, 10, 11, 12, 13, 14, 15, 0, 1]


def test_default_redundancy_that_does_not_divide_names_valid_values():
    with pytest.raises(ExpertMapError, match=r"do not divide over 4 ranks; choose num_redundant in \[0, 4\]"):
        ExpertPlacement.default(1, 16, 4, 1)


def test_log2phy_inverts_phy2log():
    rng = np.random.default_rng(0)
    phy2log = np.stack([rng.permutation(np.r_[np.arange(6), [0, 0, 3, 5]]) for _ in range(4)])
    log2phy, counts = build_log2phy(phy2log, 6)
    for layer in range(4):
        for e in range(6):
            slots = [s for s in log2phy[layer, e] if s >= 0]
            assert slots == sorted(np.nonzero(phy2log[layer] == e)[0].tolist())
            assert counts[layer, e] == len(slots)


def test_excluded_rank_may_hold_only_empty_slots():
    p = ExpertPlacement(np.array([[0, 1, 2, 3, -1, -1]]), 3, 4)
    assert p.excluded_ranks == (2,)
    with pytest.raises(ExpertMapError, match=r"layer 0 rank 2 slot 1: empty slot"):
        ExpertPlacement(np.array([[0, 1, 2, 3, 1, -1]]), 3, 4)


def _corrupt(data, fn):
    data = json.loads(json.dumps(data))
    fn(data)
    return json.dumps(data)


BAD_MAPS = [
    (
        "id out of range",
        lambda d: d["layer_list"][0]["device_list"][1]["device_expert"].__setitem__(0, -5),
        r"layer 0 rank 1 slot 0: expert id -5 is out of range",
    ),
    (
        "missing expert",
        lambda d: d["layer_list"][0]["device_list"][0]["device_expert"].__setitem__(2, 4),
        r"layer 0: logical expert 0 has no copy",
    ),
    (
        "unequal slots",
        lambda d: d["layer_list"][0]["device_list"][1]["device_expert"].pop(),
        r"layer 0 rank 1 has 4 slots, rank 0 has 5",
    ),
    (
        "same-rank copy",
        lambda d: d["layer_list"][0]["device_list"][1]["device_expert"].__setitem__(4, 6),
        r"layer 0 rank 1 slot 4: a second copy of expert 6",
    ),
    (
        "layer count",
        lambda d: d.__setitem__("moe_layer_count", 2),
        r"moe_layer_count is 2 but layer_list has 1",
    ),
    ("device count", lambda d: d["layer_list"][0].__setitem__("device_count", 3), r"device_count is 3"),
    (
        "not integers",
        lambda d: d["layer_list"][0]["device_list"][0]["device_expert"].__setitem__(0, "7"),
        r"layer 0 rank 0: 'device_expert' must be a list of integers",
    ),
    ("missing key", lambda d: d.pop("layer_list"), r"missing key 'layer_list'"),
]


@pytest.mark.parametrize("name,corrupt,message", BAD_MAPS, ids=[b[0] for b in BAD_MAPS])
def test_malformed_maps_give_one_clear_error(name, corrupt, message):
    with pytest.raises(ExpertMapError, match=message):
        ExpertPlacement.from_json(_corrupt(VLLM_ASCEND_EXAMPLE, corrupt))


def test_malformed_json_and_missing_file(tmp_path):
    with pytest.raises(ExpertMapError, match="malformed JSON"):
        ExpertPlacement.from_json('{"moe_layer_count": 1,')
    with pytest.raises(ExpertMapError, match="does not exist; record one first .*expert_map_record_path"):
        ExpertPlacement.from_json(tmp_path / "nope.json")


def test_mismatch_with_the_model_is_named():
    p = ExpertPlacement.from_json(json.dumps(VLLM_ASCEND_EXAMPLE))
    with pytest.raises(ExpertMapError, match="the map has 1 MoE layers but the model has 4"):
        p.validate(num_layers=4)
    with pytest.raises(ExpertMapError, match="the map is for 2 ranks .* expert-parallel size is 4"):
        p.validate(num_ranks=4)
    with pytest.raises(ExpertMapError, match="for 8 logical experts but the model has 16"):
        p.validate(num_experts=16)
    with pytest.raises(ExpertMapError, match="5 slots per rank but the model has 4"):
        p.validate(slots_per_rank=4)


def test_same_rank_copies_allowed_when_unavoidable_or_requested():
    # One rank, 6 slots, 4 experts: two copies on that rank are unavoidable.
    ExpertPlacement(np.array([[0, 1, 2, 3, 0, 1]]), 1, 4)
    with pytest.raises(ExpertMapError, match="second copy"):
        ExpertPlacement(np.array([[0, 0, 1, 2, 3, 1]]), 2, 4)
    ExpertPlacement(np.array([[0, 0, 1, 2, 3, 1]]), 2, 4, allow_same_rank_copies=True)


# ---------------------------------------------------------------- properties
@st.composite
def valid_placements(draw):
    num_ranks = draw(st.integers(1, 6))
    num_experts = draw(st.integers(1, 12))
    num_layers = draw(st.integers(1, 3))
    spr = draw(st.integers(max(1, -(-num_experts // num_ranks)), max(1, -(-num_experts // num_ranks)) + 2))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_layers):
        # Every expert once (dealt round-robin), then each rank topped up with experts it does not hold.
        slots = [[] for _ in range(num_ranks)]
        for i, e in enumerate(rng.permutation(num_experts)):
            slots[i % num_ranks].append(int(e))
        for held in slots:
            free = (
                [e for e in range(num_experts) if e not in held]
                if spr <= num_experts
                else list(range(num_experts))
            )
            extra = spr - len(held)
            held.extend(int(e) for e in rng.choice(free, extra, replace=spr > num_experts))
        rows.append([x for r in slots for x in r])
    return ExpertPlacement(np.array(rows), num_ranks, num_experts, allow_same_rank_copies=spr > num_experts)


@settings(max_examples=150, deadline=None)
@given(valid_placements())
def test_valid_placements_pass_and_round_trip(p):
    q = ExpertPlacement.from_json(p.to_json(), allow_same_rank_copies=p.allow_same_rank_copies)
    assert q == p
    assert p.replica_count.sum() == p.num_layers * p.num_slots
    assert (p.replica_count >= 1).all()


@settings(max_examples=300, deadline=None)
@given(
    valid_placements(),
    st.integers(0, 10**6),
    st.sampled_from(["range", "drop", "duplicate", "layers", "ranks"]),
)
def test_any_single_corruption_is_caught(p, pick, kind):
    phy2log = p.phy2log.copy()
    layer, slot = pick % p.num_layers, pick % p.num_slots
    spr = p.slots_per_rank
    if kind == "range":
        phy2log[layer, slot] = p.num_experts + pick % 3
        with pytest.raises(ExpertMapError, match=f"layer {layer} rank {slot // spr} slot {slot % spr}"):
            ExpertPlacement(phy2log, p.num_ranks, p.num_experts, allow_same_rank_copies=True)
    elif kind == "drop":
        # Replace every copy of one expert by another expert: that expert is missing in this layer.
        expert = phy2log[layer, slot]
        if p.num_experts == 1:
            return
        phy2log[layer][phy2log[layer] == expert] = (expert + 1) % p.num_experts
        with pytest.raises(ExpertMapError, match=f"layer {layer}: logical expert {expert} has no copy"):
            ExpertPlacement(phy2log, p.num_ranks, p.num_experts, allow_same_rank_copies=True)
    elif kind == "duplicate":
        rank = slot // spr
        local = phy2log[layer, rank * spr : (rank + 1) * spr]
        if spr < 2 or spr > p.num_experts:
            return
        local[(slot + 1) % spr] = local[slot % spr]
        with pytest.raises(ExpertMapError):  # a same-rank copy, or an expert now missing
            ExpertPlacement(phy2log, p.num_ranks, p.num_experts)
    elif kind == "layers":
        with pytest.raises(ExpertMapError, match="MoE layers but the model has"):
            p.validate(num_layers=p.num_layers + 1)
    else:
        with pytest.raises(ExpertMapError, match="ranks"):
            p.validate(num_ranks=p.num_ranks + 1)


def test_primary_slots_mark_each_experts_first_copy_once():
    p = ExpertPlacement.from_json(json.dumps(VLLM_ASCEND_EXAMPLE))
    primary = p.primary_slots()
    assert primary.shape == (1, 10) and primary.sum() == 8  # one per logical expert
    # expert 7 sits in slots 0 and 8, expert 2 in slots 1 and 9: the lower slot is the primary copy
    assert primary[0].tolist() == [True] * 8 + [False, False]
    assert sorted(p.phy2log[0][primary[0]].tolist()) == list(range(8))


def _plain(rows: list[list[int]], num_ranks: int = 2, **extra) -> dict:
    """An expert-map dict of one layer: ``rows[r]`` the experts of rank ``r``."""
    devices = [{"device_id": r, "device_expert": row} for r, row in enumerate(rows)]
    return {
        "moe_layer_count": 1,
        "layer_list": [{"layer_id": 0, "device_count": num_ranks, "device_list": devices}],
        **extra,
    }


def test_map_pitfalls_name_the_cause():
    # expert id 99 in an 8-expert map: out of range, not "expert 3 has no copy"
    with pytest.raises(ExpertMapError, match=r"expert id 99 is out of range \[0, 8\)"):
        ExpertPlacement.from_dict(_plain([[0, 1, 2, 99], [4, 5, 6, 7]], num_logical_experts=8))
    with pytest.raises(
        ExpertMapError,
        match="expert 3 has no copy .*inferred from its highest expert id 99; is that id a typo",
    ):
        ExpertPlacement.from_dict(_plain([[0, 1, 2, 99], [4, 5, 6, 7]]))
    # a map that never places its highest expert is not taken for a smaller model
    smaller = ExpertPlacement.from_dict(_plain([[0, 1, 2, 3], [4, 5, 6, 0]]))
    with pytest.raises(
        ExpertMapError,
        match=r"for 7 logical experts but the model has 8: .* highest expert id is 6, so experts 7..7 have no copy",
    ):
        smaller.validate(num_experts=8)
    load = [[1.0] * 8]
    with pytest.raises(ExpertMapError, match="logical expert 7 has no copy"):  # the load says 8 experts
        ExpertPlacement.from_dict(_plain([[0, 1, 2, 3], [4, 5, 6, 0]], expert_load=load))
    # a NaN or negative load is refused, not reported as balancedness 1.0
    for bad, shown in ((float("nan"), "nan"), (-1.0, "-1.0")):
        with pytest.raises(
            ExpertMapError, match=rf"expert_load\[0, 2\] = {shown}: loads must be finite and >= 0"
        ):
            ExpertPlacement.from_dict(
                _plain([[0, 1, 2, 3], [4, 5, 6, 7]], expert_load=[[1, 1, bad, 1, 1, 1, 1, 1]])
            )


def test_select_layers_takes_rows_without_the_load():
    placement = ExpertPlacement.default(3, 4, 2, 2).with_load(np.arange(12).reshape(3, 4))
    rows = placement.select_layers([0, 2])
    assert rows.phy2log.tolist() == placement.phy2log[[0, 2]].tolist() and rows.expert_load is None
    assert (rows.num_ranks, rows.num_experts) == (2, 4)
    assert placement.select_layers(slice(1, 2)).num_layers == 1
    back = placement.with_layers([0, 2], rows.with_load(None))
    assert back == placement and back.expert_load is None
    swapped = placement.with_layers([1], ExpertPlacement(np.array([[3, 2, 1, 0, 1, 2]]), 2, 4))
    assert swapped.phy2log[1].tolist() == [3, 2, 1, 0, 1, 2] and swapped.phy2log[0].tolist() == [
        0,
        1,
        2,
        3,
        0,
        1,
    ]
    with pytest.raises(ExpertMapError):
        placement.with_layers([1], ExpertPlacement(np.array([[0, 1, 2, 3, 4, 5]]), 2, 6))
