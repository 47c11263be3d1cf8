"""Tests for megatron_eplb.transfer's executor and transport: 1 to 4 gloo processes, failures through the
failing test transport (megatron_eplb.transfer.testing), and the p2p benchmark's CPU smoke test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist import run_distributed
from test_transfer_plan import random_placement

from megatron_eplb.placement import ExpertPlacement
from megatron_eplb.protocols import Transport
from megatron_eplb.transfer import (
    TorchP2PTransport,
    TransferError,
    TransferExecutor,
    make_transport,
    plan_transfer,
    slot_nbytes,
)
from megatron_eplb.transfer.testing import FailingTransport

pytestmark = pytest.mark.slow  # every test here starts processes (gloo ranks, the p2p benchmark)

# ------------------------------------------------------------------------------ multi-process executor
SHAPES = [((3, 4), torch.float32), ((5,), torch.bfloat16), ((2, 2), torch.int64), ((3,), torch.bool)]


def logical_tensors(layer: int, expert: int) -> list[torch.Tensor]:
    """The reference tensors of a logical expert: distinct per (layer, expert, tensor)."""
    g = torch.Generator().manual_seed(1000 * layer + expert)
    out = []
    for shape, dtype in SHAPES:
        if dtype == torch.bool:
            out.append(torch.rand(shape, generator=g) > 0.5)
        elif dtype == torch.int64:
            out.append(torch.randint(-(2**40), 2**40, shape, generator=g))
        else:
            out.append(torch.randn(shape, generator=g).to(dtype))
    return out


class Model:
    """Per-rank slot storage: ``store[layer][local_slot]`` is that slot's list of tensors."""

    def __init__(self, placement: ExpertPlacement, rank: int) -> None:
        local = placement.local_phy2log(rank)
        self.store = [
            [
                logical_tensors(layer, int(e)) if e >= 0 else [torch.zeros(s, dtype=d) for s, d in SHAPES]
                for e in local[layer]
            ]
            for layer in range(placement.num_layers)
        ]
        # A parameter-like tensor that requires grad must be writable too.
        self.store[0][0][0].requires_grad_(True)

    def slot_tensors(self, layer: int, local_slot: int) -> list[torch.Tensor]:
        return self.store[layer][local_slot]

    def snapshot(self):
        return [[[t.detach().clone() for t in slot] for slot in layer] for layer in self.store]

    def assert_holds(self, placement: ExpertPlacement, rank: int, layers=None) -> None:
        local = placement.local_phy2log(rank)
        for layer in range(placement.num_layers) if layers is None else layers:
            for k, e in enumerate(local[layer].tolist()):
                if e < 0:
                    continue
                for got, want in zip(self.store[layer][k], logical_tensors(layer, e)):
                    assert got.dtype == want.dtype and torch.equal(got.detach(), want), (
                        f"rank {rank} layer {layer} slot {k}: does not hold expert {e}"
                    )


def _scenarios(rank: int, world: int) -> None:
    import torch.distributed as dist

    spr, num_experts, num_layers = 3, 3 * world - 2, 3

    # 1. random placements, several tensors of different dtypes per slot, all layers.
    for seed in range(3):
        rng = np.random.default_rng(seed + 10 * world)
        old = random_placement(rng, num_layers, world, spr, num_experts)
        new = random_placement(rng, num_layers, world, spr, num_experts)
        new = ExpertPlacement(
            np.where(np.arange(num_layers)[:, None] == 2, old.phy2log, new.phy2log),
            world,
            num_experts,
            allow_same_rank_copies=True,
        )
        model = Model(old, rank)
        group = dist.new_group(backend="gloo")
        plan = plan_transfer(old, new)
        assert 2 not in plan.layers_changed
        ex = TransferExecutor(plan, model.slot_tensors, group)
        written = ex.run(timeout=30)
        model.assert_holds(new, rank)
        assert (
            written
            == plan.for_rank(rank).recvs_per_rank()[:, rank].sum()
            + plan.for_rank(rank).local_copy_count().sum()
        )
        assert ex.staging_bytes > 0 or written == 0

    # 2. swap chains: sources overwritten in the same layer (cross-rank cycle + local permutation);
    #    two layers in flight at once.
    num_experts = world * spr
    base = np.arange(world * spr)
    old = ExpertPlacement(np.stack([base, base]), world, num_experts)
    cyc = base.reshape(world, spr).copy()
    cyc[:, 0] = np.roll(cyc[:, 0], 1)  # slot 0 rotates around the ranks
    cyc[:, 1], cyc[:, 2] = cyc[:, 2].copy(), cyc[:, 1].copy()  # local swap on every rank
    new = ExpertPlacement(np.stack([cyc.reshape(-1), np.roll(base, spr)]), world, num_experts)
    model = Model(old, rank)
    group = dist.new_group(backend="gloo")
    plan = plan_transfer(old, new)
    assert plan.layer(0).num_local_copies == 2 * world and plan.layer(0).num_sends == world
    ex = TransferExecutor(plan, model.slot_tensors, group, checksums=True)
    h0, h1 = ex.start_layer(0), ex.start_layer(1)
    assert ex.staging_bytes == h0.staging_bytes + h1.staging_bytes
    assert h0.staging_bytes >= plan.staging_slots(rank)[0] * slot_nbytes(model.slot_tensors(0, 0)) > 0
    ex.finish_layer(h1, timeout=30)
    ex.finish_layer(h0, timeout=30)
    model.assert_holds(new, rank)
    peak = ex.peak_staging_bytes
    assert peak >= h0.staging_bytes + h1.staging_bytes

    # 3. checksum canary: clean after the transfer; a corrupted slot is found by every rank.
    assert ex.verify_layer(h0, timeout=30) == []
    assert ex.verify_layer(h1, timeout=30) == []
    victim = tuple(int(v) for v in plan.layer(1).sends[0, 2:])
    if rank == victim[0]:
        with torch.no_grad():
            model.store[1][victim[1]][1][0] += 1
    assert ex.verify_layer(h1, timeout=30) == [victim]

    # 4. clean failure (all messages posted, the failing transport refuses the layer on the last rank that
    #    posts any): every rank raises, nothing written, and the group stays usable.
    num_experts = 3 * world - 2
    rng = np.random.default_rng(99)
    old = random_placement(rng, 1, world, spr, num_experts)
    new = random_placement(rng, 1, world, spr, num_experts)
    model = Model(old, rank)
    before = model.snapshot()
    group = dist.new_group(backend="gloo")
    plan = plan_transfer(old, new)
    posting = np.nonzero(plan.sends_per_rank()[0] + plan.recvs_per_rank()[0])[0]
    failing = int(posting[-1])
    transport = FailingTransport(TorchP2PTransport(group), 10**6 if rank == failing else None)
    ex = TransferExecutor(plan, model.slot_tensors, group, transport=transport)
    with pytest.raises(TransferError) as err:
        ex.run(timeout=30)
    assert err.value.layer == 0 and err.value.rank == rank and not err.value.group_broken
    if rank == failing:
        assert "injected failure" in str(err.value) and transport.failed_rounds >= 1
    _assert_same(before, model.snapshot())
    transport.arm(None)
    ex.run(timeout=30)
    model.assert_holds(new, rank)

    # 5. half-way failure: one rank posts only its first send message; receivers time out; every rank
    #    raises TransferError and keeps its old tensors.
    model = Model(old, rank)
    before = model.snapshot()
    group = dist.new_group(backend="gloo")
    sender = int(np.argmax(plan.sends_per_rank()[0]))
    peers = sorted(set(plan.layer(0).sends_from(sender)[:, 2].tolist()))
    k = len(peers) - 1  # the last peer's message never goes out
    transport = FailingTransport(TorchP2PTransport(group), k if rank == sender else None)
    ex = TransferExecutor(plan, model.slot_tensors, group, transport=transport)
    with pytest.raises(TransferError) as err:
        ex.run(timeout=1.0)
    if rank == peers[-1]:
        assert err.value.group_broken and "receive failed" in str(err.value)
    _assert_same(before, model.snapshot())
    dist.barrier()  # the default group is unaffected
    # As the manager does after a broken group: a new group, assigned to the executor, rebinds its transport
    # (the fault goes with it until disarmed); then the same plan moves.
    ex.group = dist.new_group(backend="gloo")
    assert isinstance(ex.transport, FailingTransport) and ex.transport is not transport
    assert ex.transport.group is ex.group and ex.transport.fail_after_sends == transport.fail_after_sends
    ex.transport.arm(None)
    ex.run(timeout=30)
    model.assert_holds(new, rank)


def _assert_same(a, b) -> None:
    for la, lb in zip(a, b):
        for sa, sb in zip(la, lb):
            for ta, tb in zip(sa, sb):
                assert torch.equal(ta, tb)


@pytest.mark.parametrize("world", [2, 4])
def test_executor_gloo(world):
    run_distributed(_scenarios, world, timeout=120)


def _single(rank: int, world: int) -> None:
    import torch.distributed as dist

    rng = np.random.default_rng(5)
    old = random_placement(rng, 2, 1, 4, 3)
    new = random_placement(rng, 2, 1, 4, 3)
    model = Model(old, rank)
    plan = plan_transfer(old, new)
    assert plan.moved_slots().sum() == 0  # one rank: only local copies
    TransferExecutor(plan, model.slot_tensors, dist.group.WORLD).run()
    model.assert_holds(new, rank)
    # The transport seam: the default and the test double implement the protocol; the factory checks names;
    # a transport over another group is refused.
    ex = TransferExecutor(plan, model.slot_tensors)
    assert isinstance(ex.transport, TorchP2PTransport) and isinstance(ex.transport, Transport)
    assert isinstance(FailingTransport(ex.transport), Transport)
    assert ex.transport.post([], []).works == []
    with pytest.raises(ValueError, match="unknown transport"):
        make_transport(None, "carrier-pigeon")
    other = dist.new_group([0], backend="gloo")
    with pytest.raises(ValueError, match="transport.group"):
        TransferExecutor(plan, model.slot_tensors, other, transport=TorchP2PTransport(None))


def test_executor_single_rank():
    run_distributed(_single, 1, timeout=60)


# --------------------------------------------------------------- chunked messages, pipelined run()
def _fail_on_layer(ex: TransferExecutor, layer: int, rank: int, failing_rank: int) -> None:
    """Make ``ex``'s failing transport refuse ``layer`` (every message posted) on ``failing_rank`` only."""
    original = ex.start_layer

    def start(which: int):
        ex.transport.arm(10**6 if which == layer and rank == failing_rank else None)
        return original(which)

    ex.start_layer = start


def _chunk_scenarios(rank: int, world: int) -> dict:
    import torch.distributed as dist

    spr, num_layers = 4, 3
    num_experts = world * spr - 3
    slot_bytes = slot_nbytes(logical_tensors(0, 0))
    out = {}

    # 1. every variant moves every slot bitwise: pieces of one slot (one round per slot), pieces of 3 slots,
    #    one message per peer; pipelined and layer-by-layer run(); staged and direct local copies.
    variants = [
        (1, True, True),
        (1, False, False),
        (3 * slot_bytes, True, False),
        (0, True, True),
        (None, False, True),
    ]
    for seed, (chunk, pipeline, direct) in enumerate(variants):
        rng = np.random.default_rng(100 + seed)
        old = random_placement(rng, num_layers, world, spr, num_experts)
        new = random_placement(rng, num_layers, world, spr, num_experts)
        model = Model(old, rank)
        plan = plan_transfer(old, new)
        group = dist.new_group(backend="gloo")
        ex = TransferExecutor(
            plan, model.slot_tensors, group, chunk_bytes=chunk, pipeline=pipeline, direct_local_copies=direct
        )
        written = ex.run(timeout=30)
        model.assert_holds(new, rank)
        mine = plan.for_rank(rank)
        assert written == mine.recvs_per_rank()[:, rank].sum() + mine.local_copy_count().sum()

    # 2. pieces of one slot, two layers in flight, canary: one work per slot message (gloo: one per op).
    rng = np.random.default_rng(7)
    old = random_placement(rng, 2, world, spr, num_experts)
    new = ExpertPlacement(np.roll(old.phy2log, spr, axis=1), world, num_experts, allow_same_rank_copies=True)
    model = Model(old, rank)
    plan = plan_transfer(old, new)
    group = dist.new_group(backend="gloo")
    ex = TransferExecutor(plan, model.slot_tensors, group, chunk_bytes=1, checksums=True)
    h0, h1 = ex.start_layer(0), ex.start_layer(1)
    for h in (h0, h1):
        part = plan.layer(h.layer)
        works = sum(len(posted.works) for posted, _ in h._rounds)
        assert works == len(part.sends_from(rank)) + len(part.recvs_to(rank)) > 2
    ex.finish_layer(h0, timeout=30)
    ex.finish_layer(h1, timeout=30)
    model.assert_holds(new, rank)
    assert ex.verify_layer(h0, timeout=30) == [] and ex.verify_layer(h1, timeout=30) == []

    # 3. pipelined run() with a failure in the middle layer: layer 0 committed, layers 1 and 2 untouched on
    #    every rank, nothing of layer 2 posted; the group stays usable and the rest moves afterwards.
    rng = np.random.default_rng(11)
    old = random_placement(rng, num_layers, world, spr, num_experts)
    new = ExpertPlacement(np.roll(old.phy2log, spr, axis=1), world, num_experts, allow_same_rank_copies=True)
    model = Model(old, rank)
    before = model.snapshot()
    plan = plan_transfer(old, new)
    assert plan.layers_changed == (0, 1, 2)
    group = dist.new_group(backend="gloo")
    transport = FailingTransport(TorchP2PTransport(group), None)
    ex = TransferExecutor(plan, model.slot_tensors, group, chunk_bytes=2 * slot_bytes, transport=transport)
    posted = []
    _fail_on_layer(ex, 1, rank, world - 1)
    start = ex.start_layer
    ex.start_layer = lambda layer: posted.append(layer) or start(layer)
    with pytest.raises(TransferError) as err:
        ex.run(timeout=30)
    assert err.value.layer == 1 and not err.value.group_broken
    assert posted == [0, 1]
    model.assert_holds(new, rank, layers=[0])
    _assert_same(before[1:], model.snapshot()[1:])
    del ex.start_layer  # the class's method again
    ex.transport.arm(None)
    ex.run(layers=[1, 2], timeout=30)
    model.assert_holds(new, rank)
    out["pipeline_failure"] = True

    # 4. half-way failure inside a chunked message: the sender posts only its first piece, the receiver of
    #    the rest times out; every rank raises and keeps its old tensors.
    model = Model(old, rank)
    before = model.snapshot()
    group = dist.new_group(backend="gloo")
    plan1 = plan_transfer(old, new, layers=[0])
    transport = FailingTransport(TorchP2PTransport(group), 1 if rank == 0 else None)
    ex = TransferExecutor(plan1, model.slot_tensors, group, chunk_bytes=1, transport=transport)
    with pytest.raises(TransferError) as err:
        ex.run(timeout=1.0)
    if rank == 1:  # rank 0 sends its slots to rank 1, one piece of the spr arrived
        assert err.value.group_broken and "receive failed" in str(err.value)
    _assert_same(before, model.snapshot())
    dist.barrier()
    return out


def test_executor_chunks_and_pipeline_gloo():
    assert all(r["pipeline_failure"] for r in run_distributed(_chunk_scenarios, 3, timeout=120))


def test_p2p_bench_cpu_smoke(tmp_path):
    """benchmarks/p2p_bench.py on 2 gloo processes: every variant asked for moves the slots bitwise."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from dist import free_port

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "p2p.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(root / "benchmarks" / "p2p_bench.py"), "--small", "--reps", "1", "--warmup", "1",
           "--variants", "raw_piece,legacy_layer,default_run,default_all,vote_in_transfer_group", "--out", str(out)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["variants"]) == ["raw_layer", "raw_piece", "legacy_layer", "default_run", "default_all",
                                        "vote_in_transfer_group"]  # fmt: skip
    assert all(r["correct"] and r["bytes_per_s_per_rank"] > 0 for r in result["variants"].values())
    assert result["variants"]["raw_layer"]["ratio_to_raw_layer"] == 1.0
    assert "| default_run |" in proc.stdout


def _non_contiguous(rank: int, world: int) -> None:
    import torch.distributed as dist

    # Slots whose tensors are transposed / strided views; staged local copies go through pack and unpack.
    old = ExpertPlacement(np.array([[0, 1, 2, 3]]), 1, 4)
    new = ExpertPlacement(np.array([[3, 0, 1, 2]]), 1, 4)
    bases = [torch.randn(4, 6, generator=torch.Generator().manual_seed(e)) for e in range(4)]
    store = [[bases[e].t(), bases[e][:, ::2].bfloat16()] for e in range(4)]
    want = [[t.clone() for t in store[e]] for e in (3, 0, 1, 2)]
    plan = plan_transfer(old, new)
    ex = TransferExecutor(plan, lambda layer, k: store[k], dist.group.WORLD, direct_local_copies=False)
    assert ex.run() == 4
    for got, ref in zip(store, want):
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_executor_non_contiguous_slots():
    run_distributed(_non_contiguous, 1, timeout=60)
