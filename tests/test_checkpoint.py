"""The one logical checkpoint (megatron_eplb/checkpoint.py): logical <-> physical expert names, the placement
to resume with, and a save / load round trip through ``EPLBManager`` with a torch optimizer in one 2-process
gloo run (Adam's ``step`` count travels once)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist import run_distributed  # noqa: E402
from models import SEQ, E, V, init_megatron, tiny_gpt  # noqa: E402

from megatron_eplb.checkpoint import (  # noqa: E402
    CheckpointError,
    logical_to_physical,
    physical_to_logical,
    resume_placement,
)
from megatron_eplb.config import EPLBConfig  # noqa: E402
from megatron_eplb.placement import ExpertPlacement  # noqa: E402

# ============================================================================ logical <-> physical names


def test_checkpoint_conversion_roundtrip():
    prefixes = ["a.local_experts.", "b.local_experts."]
    phy2log = np.array([[0, 1, 2, 0], [2, 1, 0, 1]])
    logical = {
        f"{p}{e}.w": torch.full((2,), float(10 * i + e)) for i, p in enumerate(prefixes) for e in range(3)
    }
    logical["other"] = torch.ones(1)
    physical = logical_to_physical(logical, phy2log, prefixes)
    assert physical["b.local_experts.3.w"][0] == 11
    assert physical_to_logical(physical, phy2log, prefixes).keys() == logical.keys()
    local = logical_to_physical(logical, phy2log, prefixes, rank=1, slots_per_rank=2)
    assert local["a.local_experts.1.w"][0] == 0 and "a.local_experts.2.w" not in local
    physical["a.local_experts.3.w"] = physical["a.local_experts.3.w"] + 1
    with pytest.raises(CheckpointError, match="differs"):
        physical_to_logical(physical, phy2log, prefixes)
    with pytest.raises(CheckpointError, match="no logical expert 2"):
        logical_to_physical(
            {k: v for k, v in logical.items() if "b.local_experts.2" not in k}, phy2log, prefixes
        )


# ============================================================================ the placement to resume with


def _handle(ep: int, redundant: int, layers: int = 2, experts: int = 8):
    placement = ExpertPlacement.default(layers, experts, ep, redundant)
    return SimpleNamespace(
        placement=placement,
        num_layers=layers,
        num_experts=experts,
        ep_size=ep,
        num_slots=placement.num_slots,
    )


def test_resume_placement_restores_replans_or_keeps(tmp_path):
    load = np.arange(16, dtype=np.int64).reshape(2, 8) ** 2
    saved = ExpertPlacement.default(2, 8, 2, 2).with_load(load)
    new, info = resume_placement(None, _handle(2, 2))
    assert new is None and info["action"] == "kept"
    new, info = resume_placement(saved, _handle(2, 2))
    assert new is saved and info["action"] == "restored"
    new, info = resume_placement(saved, _handle(1, 2))  # one GPU lost: plan for EP=1 from the load
    assert info["action"] == "replanned" and info["saved_ep_size"] == 2 and info["ep_size"] == 1
    assert new.num_ranks == 1 and new.num_slots == 10 and np.array_equal(new.expert_load, load)
    assert info["balancedness"] >= info["balancedness_default"]
    new, info = resume_placement(ExpertPlacement.default(2, 8, 2, 2), _handle(1, 2))  # no recorded load
    assert new is None and info["action"] == "kept" and "records no expert_load" in info["message"]
    path = tmp_path / "map.json"
    saved.to_json(path)
    new, info = resume_placement(saved, _handle(1, 2), EPLBConfig(expert_map_path=str(path)))
    assert new is None and "expert_map_path" in info["message"]
    with pytest.raises(CheckpointError, match="saved for another model"):
        resume_placement(saved, _handle(2, 2, experts=16))


# ============================================================================ round trip, 2 ranks


def _step(model, manager, opt, rank: int, seed: int) -> float:
    from megatron.core import parallel_state

    gen = torch.Generator().manual_seed(seed * 10 + rank)
    tokens = torch.randint(0, V, (2, SEQ), generator=gen)
    position_ids = torch.arange(SEQ).expand(2, SEQ)
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).tril().logical_not()
    opt.zero_grad(set_to_none=True)
    loss = model(tokens, position_ids, mask, labels=tokens).mean()
    loss.backward()
    manager.before_optimizer_step()
    world = torch.distributed.get_world_size()
    for p in model.parameters():  # dense gradients over data parallel, expert ones over expert-DP
        if p.grad is not None:
            dense = getattr(p, "allreduce", True)
            group = (
                parallel_state.get_data_parallel_group()
                if dense
                else parallel_state.get_expert_data_parallel_group()
            )
            torch.distributed.all_reduce(p.grad, group=group)
            p.grad /= world
    opt.step()
    manager.step()
    return float(loss.detach())


def _run(model_redundancy: int, rank: int):
    from megatron_eplb.patches import megatron as eplb_mcore

    from megatron_eplb.manager import EPLBManager

    init_megatron(2)
    model = tiny_gpt(2, seed=rank + 3)  # a different start on each run: a load that did nothing would show
    cfg = EPLBConfig(init_redundancy_expert=model_redundancy)
    handle = eplb_mcore.apply(model, config=cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, handle, opt, EPLBManager(handle, cfg, opt)


def _copy(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items() if torch.is_tensor(v)}


def _round_trip(rank: int, world: int, directory: str) -> dict:
    from megatron_eplb.checkpoint import logical_optimizer_state, read_logical_checkpoint

    model, handle, opt, manager = _run(2, 0)
    for i in range(3):
        _step(model, manager, opt, rank, i)
    manager.save_checkpoint(directory)
    payload = read_logical_checkpoint(directory)
    state_a = logical_optimizer_state(model, handle, manager.optimizer_state)
    weights_a = _copy(handle.logical_state_dict())  # dense entries are views of the live parameters
    loss_a = _step(model, manager, opt, rank, 3)
    after_a = handle.logical_state_dict()

    model_b, handle_b, opt_b, manager_b = _run(0, rank)  # 8 slots instead of 10: re-planned from the load
    meta = manager_b.load_checkpoint(directory)
    state_b = logical_optimizer_state(model_b, handle_b, manager_b.optimizer_state)
    weights_b = _copy(handle_b.logical_state_dict())
    steps_b = sorted({int(float(s["step"])) for s in opt_b.state.values()})
    manager_step = manager_b.step_count
    loss_b = _step(model_b, manager_b, opt_b, rank, 3)
    after_b = handle_b.logical_state_dict()
    manager.close()
    manager_b.close()
    experts = [k for k in payload["optimizer"] if ".local_experts." in k]
    return {
        "payload_keys": sorted(k for k in payload if k not in ("model", "optimizer")),
        "facts": payload["model_facts"],
        "experts": len(experts),
        "state_keys": sorted({k for v in payload["optimizer"].values() for k in v}),
        "optimizer_step": payload["optimizer_step"],
        "eplb_step_count": payload["eplb_step_count"],
        "placement": meta["placement"]["action"],
        "manager_step": manager_step,
        "steps_b": steps_b,
        "weights_equal": all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a),
        "state_equal": set(state_a) == set(state_b)
        and all(torch.equal(state_a[k][s], state_b[k][s]) for k in state_a for s in state_a[k]),
        "loss": (loss_a, loss_b),
        "diff_keys": [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])],
        "after_diff": max(
            float((after_a[k] - after_b[k]).abs().max()) for k in after_a if torch.is_tensor(after_a[k])
        ),
    }


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    return run_distributed(_round_trip, 2, str(tmp_path_factory.mktemp("ckpt")), timeout=300)


@pytest.mark.slow
def test_one_logical_format(round_trip):
    r = round_trip[0]
    assert r["payload_keys"] == [
        "checksums",
        "eplb_step_count",
        "expert_map_sha256",
        "format",
        "model_facts",
        "optimizer_step",
        "version",
    ]
    assert r["facts"] == {
        "num_layers": 3,
        "hidden_size": 16,
        "ffn_hidden_size": 16,
        "num_attention_heads": 2,
        "num_query_groups": 2,
        "kv_channels": 8,
        "num_experts": E,
        "moe_ffn_hidden_size": 8,
        "moe_router_topk": 2,
        "vocab_size": V,
        "max_sequence_length": SEQ,
        "num_moe_layers": 2,
    }
    assert r["experts"] == 2 * E * 2  # MoE layers x logical experts x (fc1, fc2), each once
    assert r["state_keys"] == ["exp_avg", "exp_avg_sq"]  # by logical parameter name, no step
    assert r["optimizer_step"] == 3 and r["eplb_step_count"] == 3


@pytest.mark.slow
def test_load_into_another_placement_resumes_every_expert_and_the_step_count(round_trip):
    for r in round_trip:
        assert r["placement"] == "replanned" and r["manager_step"] == 3
        assert r["weights_equal"] and r["state_equal"], r["diff_keys"]
        assert r["steps_b"] == [3]
        assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-5)
        assert r["after_diff"] <= 1e-5  # Adam's 4th step with the right bias correction


# ============================================================================ files: all or nothing, verified


def test_publish_directory_killed_half_way_leaves_the_old_checkpoint(tmp_path):
    """A save killed (SIGKILL) while it writes: the previous checkpoint is byte-for-byte intact, only a hidden
    partial directory is left, and the next save of that name removes it."""
    import signal
    import subprocess
    import textwrap

    from megatron_eplb.checkpoint_files import publish_directory

    target = tmp_path / "iter_0000040"
    publish_directory(target, {"model_logical.pt": b"old" * 1000, "expert_map.json": "{}"})
    before = (target / "model_logical.pt").read_bytes()
    marker = tmp_path / "writing"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from megatron_eplb.checkpoint_files import publish_directory

        class Slow:  # torch.save pickles it: the first file is half-written when the kill comes
            def __reduce__(self):
                Path({str(marker)!r}).write_text("x")
                time.sleep(60)
                return (int, ())

        publish_directory(Path({str(target)!r}), {{"model_logical.pt": {{"big": b"n" * 100000, "slow": Slow()}}}})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=str(Path(__file__).resolve().parent.parent))
    try:
        for _ in range(600):
            if marker.exists() or proc.poll() is not None:
                break
            import time

            time.sleep(0.05)
        assert marker.exists(), "the writer never started"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert (target / "model_logical.pt").read_bytes() == before
    partial = list(tmp_path.glob(".iter_0000040.partial-*"))
    assert len(partial) == 1
    publish_directory(
        target,
        {"model_logical.pt": b"new", "expert_map.json": "{}"},
    )
    assert (target / "model_logical.pt").read_bytes() == b"new"
    assert not list(tmp_path.glob(".iter_0000040.partial-*"))


def test_expert_map_to_a_directory_is_one_clear_error(tmp_path):
    from megatron_eplb.errors import ExpertMapError

    with pytest.raises(ExpertMapError, match="is a directory; give the map a file name"):
        ExpertPlacement.default(1, 4, 2).to_json(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_checkpoint_tags_latest_and_missing_latest(tmp_path):
    from megatron_eplb.patches.deepspeed import checkpoint_tags, resolve_tag, step_tag

    assert step_tag(40) == "iter_0000040"
    for tag in ("iter_0000100", "iter_0000040", "best"):
        (tmp_path / tag).mkdir()
        (tmp_path / tag / "model_logical.pt").write_bytes(b"x")
    (tmp_path / ".iter_0000120.partial-1-2").mkdir()
    assert checkpoint_tags(tmp_path) == ["iter_0000040", "iter_0000100", "best"]
    with pytest.raises(
        CheckpointError,
        match="no 'latest' file .tags there: iter_0000040, iter_0000100, best.; choose one with --tag",
    ):
        resolve_tag(tmp_path)
    assert resolve_tag(tmp_path, "best") == "best"
    (tmp_path / "latest").write_text("iter_0000100\n")
    assert resolve_tag(tmp_path) == "iter_0000100"
    (tmp_path / "latest").write_text("iter_0000120")
    with pytest.raises(CheckpointError, match="names tag 'iter_0000120', which holds no checkpoint"):
        resolve_tag(tmp_path)
    with pytest.raises(CheckpointError, match="is a checkpoint tag itself.*--tag iter_0000040"):
        resolve_tag(tmp_path / "iter_0000040")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_tag(tmp_path / "nothing")


def _flip_tensor_bytes(path: Path, count: int = 4096) -> None:
    """Flip ``count`` bytes in the middle of the largest tensor record of a torch.save zip file."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = (
        int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    start = info.header_offset + 30 + name_len + extra_len + max(0, (info.file_size - count) // 2)
    for i in range(start, start + min(count, info.file_size)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _snapshot(handle) -> tuple:
    """Every logical weight and the placement (collective)."""
    return _copy(handle.logical_state_dict()), handle.placement.phy2log.copy()


def _unchanged(handle, snap) -> bool:
    weights, phy2log = _snapshot(handle)
    return np.array_equal(phy2log, snap[1]) and all(torch.equal(weights[k], snap[0][k]) for k in snap[0])


def _integrity(rank: int, world: int, root: str) -> dict:
    """Save / overwrite / interrupted save / corrupt, truncated, old-format and other-model loads, one launch."""
    import logging
    import shutil

    from megatron_eplb.patches import megatron as eplb_mcore

    import megatron_eplb.checkpoint_files as files
    from megatron_eplb.checkpoint import read_logical_checkpoint
    from megatron_eplb.manager import EPLBManager

    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("megatron_eplb").addHandler(Keep())
    logging.getLogger("megatron_eplb").setLevel(logging.INFO)
    root = Path(root)
    out: dict = {}
    model, handle, opt, manager = _run(2, 0)
    for i in range(2):
        _step(model, manager, opt, rank, i)
    a = root / "a"
    manager.save_checkpoint(a)
    saved = (a / "model_logical.pt").read_bytes()

    def error_of(fn) -> str:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the test looks at the type and the message
            return f"{type(exc).__name__}: {exc}"
        return "no error"

    # saving over a checkpoint is refused, nothing written; replaced when asked
    _step(model, manager, opt, rank, 2)
    out["again"] = error_of(lambda: manager.save_checkpoint(a))
    out["again_unchanged"] = (a / "model_logical.pt").read_bytes() == saved
    torch.distributed.barrier()

    # a save that fails half-way (disk full) leaves the old checkpoint and no partial directory
    real_dump = files._dump

    def failing_dump(content, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    files._dump = failing_dump
    try:
        out["disk_full"] = error_of(lambda: manager.save_checkpoint(a, overwrite=True))
    finally:
        files._dump = real_dump
    out["disk_full_unchanged"] = (a / "model_logical.pt").read_bytes() == saved
    out["partials"] = [p.name for p in root.iterdir() if p.name.startswith(".")]
    torch.distributed.barrier()
    manager.save_checkpoint(a, overwrite=True)
    out["overwritten_step"] = read_logical_checkpoint(a)["optimizer_step"]

    # loads that must fail before anything changes, on both ranks
    def broken_copy(name: str, damage) -> Path:
        path = root / name
        if rank == 0:
            shutil.copytree(a, path)
            damage(path)
        torch.distributed.barrier()
        return path

    def old_format(path: Path) -> None:
        payload = torch.load(path / "model_logical.pt", weights_only=False)
        for key in ("checksums", "model_facts", "expert_map_sha256"):
            del payload[key]
        torch.save(payload, path / "model_logical.pt")

    def other_map(path: Path) -> None:
        placement = ExpertPlacement.from_json(path / "expert_map.json")
        placement = ExpertPlacement(
            np.roll(placement.phy2log, placement.slots_per_rank, axis=1),
            placement.num_ranks,
            placement.num_experts,
        )
        placement.to_json(path / "expert_map.json")

    cases = {
        "corrupt": broken_copy("corrupt", lambda p: _flip_tensor_bytes(p / "model_logical.pt")),
        "empty": broken_copy("empty", lambda p: (p / "model_logical.pt").write_bytes(b"")),
        "other_map": broken_copy("other_map", other_map),
    }
    snap = _snapshot(handle)
    for name, path in cases.items():
        out[name] = error_of(lambda path=path: manager.load_checkpoint(path))
        out[f"{name}_unchanged"] = _unchanged(handle, snap)

    # another model: facts name the difference; without facts (old format) the first tensor of another shape
    old = broken_copy("old", old_format)
    model_c = tiny_gpt(2, seed=5, moe_ffn_hidden_size=12)
    handle_c = eplb_mcore.apply(model_c, config=EPLBConfig(init_redundancy_expert=2))
    manager_c = EPLBManager(
        handle_c, EPLBConfig(init_redundancy_expert=2), torch.optim.Adam(model_c.parameters())
    )
    snap_c = _snapshot(handle_c)
    out["other_model"] = error_of(lambda: manager_c.load_checkpoint(a))
    out["other_model_old"] = error_of(lambda: manager_c.load_checkpoint(old))
    out["other_model_unchanged"] = _unchanged(handle_c, snap_c)
    manager_c.close()

    # a checkpoint saved before checksums still loads, with a log line
    messages.clear()
    out["old"] = error_of(lambda: manager.load_checkpoint(old))
    out["old_logged"] = any("saved without checksums" in m and "unverified" in m for m in messages)
    out["verified_load"] = error_of(lambda: manager.load_checkpoint(a))
    manager.close()
    return out


@pytest.fixture(scope="module")
def integrity(tmp_path_factory):
    return run_distributed(_integrity, 2, str(tmp_path_factory.mktemp("integrity")), timeout=300)


@pytest.mark.slow
def test_saving_over_a_checkpoint_is_refused_unless_asked(integrity):
    for r in integrity:
        assert r["again"].startswith("CheckpointError") and "already holds a checkpoint" in r["again"]
        assert "overwrite=True" in r["again"] and r["again_unchanged"]
        assert r["overwritten_step"] == 3  # replaced when asked


@pytest.mark.slow
def test_a_save_failing_half_way_keeps_the_old_checkpoint(integrity):
    for r in integrity:
        assert r["disk_full"].startswith("CheckpointError") and "No space left on device" in r["disk_full"]
        assert "is unchanged" in r["disk_full"]
        assert r["disk_full_unchanged"] and r["partials"] == []


@pytest.mark.slow
def test_corrupt_checkpoint_names_the_file_and_tensor_and_changes_nothing(integrity):
    r0, r1 = integrity
    assert (
        r0["corrupt"].startswith("CheckpointError")
        and "corrupt/model_logical.pt: tensor 'model/" in r0["corrupt"]
    )
    assert "fails its checksum" in r0["corrupt"]
    assert r0["empty"].startswith("CheckpointError") and "is empty (0 bytes)" in r0["empty"]
    assert "EOFError" not in r0["empty"]
    assert "is not the expert map saved with model_logical.pt" in r0["other_map"]
    for r in integrity:
        assert r["corrupt_unchanged"] and r["empty_unchanged"] and r["other_map_unchanged"]
    assert r1["corrupt"] == r0["corrupt"]  # every rank reads the file and raises the same error


@pytest.mark.slow
def test_loading_into_another_model_says_what_the_checkpoint_was_trained_with(integrity):
    r = integrity[0]
    assert (
        "the checkpoint was trained with moe_ffn_hidden_size=8; this model has moe_ffn_hidden_size=12"
        in r["other_model"]
    )
    assert (
        "linear_fc1.weight' has shape [8, 16] in the checkpoint but [12, 16] in this model"
        in r["other_model_old"]
    )
    assert "records no model facts" in r["other_model_old"]
    assert r["other_model_unchanged"]


@pytest.mark.slow
def test_a_checkpoint_saved_before_checksums_still_loads(integrity):
    for r in integrity:
        assert r["old"] == "no error" and r["verified_load"] == "no error"
    assert integrity[0]["old_logged"]
