"""megatron_eplb/trace.py and the manager's ``eplb_trace_path``: per-step, per-source-rank counts to an .npz."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dist import run_distributed

from megatron_eplb.placement import ExpertPlacement
from megatron_eplb.trace import LoadTrace, read_trace, read_traces, write_trace

L, E = 2, 8


def test_write_read_roundtrip(tmp_path):
    counts = np.random.default_rng(0).integers(0, 100, size=(5, 2, L, E))
    path = write_trace(tmp_path / "t.npz", LoadTrace(counts, np.arange(1, 6), {"ep_size": 2}))
    back = read_trace(path)
    assert back.counts.dtype == np.int32 and np.array_equal(back.counts, counts)
    assert back.steps.tolist() == [1, 2, 3, 4, 5]
    assert back.meta["ep_size"] == 2 and back.meta["format"] == "megatron-eplb-trace"
    assert np.array_equal(back.loads(), counts.sum(1))


def test_load_files_read_as_steps(tmp_path):
    for i in range(3):
        (tmp_path / f"l{i}.json").write_text(json.dumps({"logical_count": [[0] * E, [i + 1] * E]}))
    trace = read_traces([tmp_path / f"l{i}.json" for i in range(3)])
    assert trace.counts.shape == (3, 1, 1, E)  # the all-zero (dense) layer dropped
    assert trace.loads()[:, 0, 0].tolist() == [1, 2, 3]


def test_bad_traces_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_trace(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a megatron-eplb trace"):
        read_trace(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match=r"\[steps, sources, layers, experts\]"):
        LoadTrace(np.zeros((2, 3)), np.arange(2))


class _Handle:
    """The smallest :class:`ExpertModel` the manager's recording needs: loads set by the test."""

    def __init__(self, rank: int, world: int):
        self.num_layers, self.num_experts, self.ep_size, self.ep_rank = L, E, world, rank
        self.slots_per_rank = E // world
        self.ep_group = None
        self.layer_names = [f"layer{i}" for i in range(L)]
        self.replica_dispatch = "balanced"
        self.placement = ExpertPlacement.default(L, E, world)
        self.next = torch.zeros(L, E, dtype=torch.int64)

    def loads(self):
        return self.next

    def slot_loads(self):
        return torch.zeros(L, self.slots_per_rank, dtype=torch.int64)

    def reset_loads(self):
        self.next = torch.zeros(L, E, dtype=torch.int64)


def _record(rank: int, world: int, path: str, steps: int) -> list:
    from megatron_eplb.config import EPLBConfig
    from megatron_eplb.manager import EPLBManager

    handle = _Handle(rank, world)
    cfg = EPLBConfig(eplb_trace_path=path, eplb_log_interval=5, eplb_window_size=4)
    manager = EPLBManager(handle, cfg)
    manager.trace_meta["domains"] = ["code", "wikipedia"]
    fed = []
    for step in range(steps):
        handle.next = torch.full((L, E), 10 * rank + step, dtype=torch.int64)
        handle.next[:, 0] = rank
        fed.append(handle.next.clone().numpy())
        manager.step()
    manager.close()
    return fed


def test_manager_records_every_step_of_every_rank(tmp_path):
    path = tmp_path / "trace.npz"
    fed = run_distributed(_record, 2, str(path), 23, timeout=120)
    trace = read_trace(path)
    assert trace.counts.shape == (23, 2, L, E)
    assert trace.steps.tolist() == list(range(1, 24))
    assert np.array_equal(trace.counts[:, 0], np.stack(fed[0]))
    assert np.array_equal(trace.counts[:, 1], np.stack(fed[1]))
    assert trace.meta["ep_size"] == 2 and trace.meta["domains"] == ["code", "wikipedia"]
    assert trace.meta["layer_names"] == ["layer0", "layer1"] and trace.meta["replica_dispatch"] == "balanced"
