"""megatron_eplb/slot_routing_triton.py: the fused routing onto slots is bitwise ``route_to_slots_torch``
(physical probs and map, and the gradient of ``probs``).

Runs on CUDA, or on CPU through triton's interpreter::

    TRITON_INTERPRET=1 PYTHONPATH=$PWD:/path/to/triton DS_ACCELERATOR=cpu python -m pytest -q \\
        tests/test_slot_routing_triton.py

Skipped where triton does not import (CPU CI) or where there is neither CUDA nor the interpreter.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from megatron_eplb import slot_routing
from megatron_eplb import slot_routing_triton as fused
from megatron_eplb.placement import build_log2phy
from megatron_eplb.replica_split import balanced_shares, copy_bounds, replica_tables, source_offsets
from megatron_eplb.slot_routing import route_to_slots_torch, slot_tables

if not fused.available():
    pytest.skip(
        "triton is not importable here (CPU CI): the fused routing is not built", allow_module_level=True
    )
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not torch.cuda.is_available() and not _INTERPRET:
    pytest.skip("the fused routing needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not _INTERPRET else "cpu")


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (``torch.equal`` takes ``-0.0 == 0.0`` and ``nan != nan``)."""
    return x.contiguous().view({4: torch.int32, 2: torch.int16}[x.element_size()])


def _placement(rng, experts: int, ranks: int, slots_per_rank: int, most: int = 4) -> np.ndarray:
    """A ``phy2log`` row ``[ranks * slots_per_rank]``: every expert once, then extra copies (2 to ``most`` per
    replicated expert) of a few experts, the rest empty (``-1``), shuffled."""
    slots = ranks * slots_per_rank
    room = slots - experts - (slots - experts > 2)  # an empty slot where there is room for one
    extra = []
    for e in rng.permutation(experts):
        more = min(int(rng.integers(1, most)), room - len(extra))
        if more <= 0:
            break
        extra += [int(e)] * more
    empty = slots - experts - len(extra)
    row = np.array(list(range(experts)) + extra + [-1] * empty, dtype=np.int64)
    return row[rng.permutation(slots)]


def _routings(rng, tokens: int, experts: int, topk: int, sources: int) -> list[torch.Tensor]:
    """One bool ``[T, E]`` routing per source rank: top-k of random scores, two experts never routed, some
    tokens routed nowhere."""
    idle = rng.choice(experts, size=min(2, experts - topk), replace=False)
    maps = []
    for _ in range(sources):
        scores = torch.from_numpy(rng.random((tokens, experts)))
        scores[:, idle] = -1.0
        routing_map = torch.zeros(tokens, experts, dtype=torch.bool)
        routing_map.scatter_(1, scores.topk(topk, dim=1).indices, True)
        routing_map[torch.from_numpy(rng.random(tokens) < 0.1)] = False
        maps.append(routing_map)
    return maps


def _cases(rng, tokens: int, experts: int, ranks: int, slots_per_rank: int, topk: int):
    """``(routing_map, tables, kwargs, P)`` for the first three EP ranks: round-robin (the default tables, ``local_slot``
    tables, every expert spread) and the split over source ranks (default tables, every expert spread); the
    ``local_slot`` and the last tables carry their routing table."""
    row = _placement(rng, experts, ranks, slots_per_rank)
    log2phy, count = build_log2phy(row[None, :], experts)
    log2phy, count = torch.from_numpy(log2phy[0]), torch.from_numpy(count[0])
    num_slots = ranks * slots_per_rank
    maps = _routings(rng, tokens, experts, topk, ranks)
    counts = torch.stack([m.sum(0) for m in maps])
    bounds = copy_bounds(balanced_shares(counts.sum(0), replica_tables(row, ranks, experts)))
    first = source_offsets(counts)
    every = torch.arange(experts)
    default = slot_tables(log2phy, count)
    assert default.spread.numel() >= 1
    for rank, routing_map in enumerate(maps[:3]):  # the first three EP ranks (the interpreter is slow)
        local = torch.full((experts,), -1, dtype=torch.int64)
        for slot in reversed(range(rank * slots_per_rank, (rank + 1) * slots_per_rank)):
            if row[slot] >= 0:
                local[row[slot]] = slot
        split = (first[rank], bounds)
        yield routing_map, default, dict(offset=rank), num_slots
        yield (
            routing_map,
            slot_tables(log2phy, count, local, num_slots=num_slots),
            dict(offset=rank + 5),
            num_slots,
        )
        yield routing_map, slot_tables(log2phy, count, spread=every), dict(offset=rank), num_slots
        yield routing_map, default, dict(split=split), num_slots
        # the routing table made with the tables (the count kernel makes the others')
        yield (
            routing_map,
            slot_tables(log2phy, count, spread=every, num_slots=num_slots),
            dict(split=split),
            num_slots,
        )


def _on(x):
    if isinstance(x, torch.Tensor):
        return x.to(DEVICE)
    if isinstance(x, tuple):
        return type(x)(*[_on(v) for v in x]) if hasattr(x, "_fields") else tuple(_on(v) for v in x)
    if isinstance(x, dict):
        return {k: _on(v) for k, v in x.items()}
    return x


def _run(route, probs, upstream, routing_map, tables, num_slots, kwargs):
    """``(physical map, physical probs, gradient of probs)`` backpropagating ``upstream`` (a tensor, or
    ``"sum"``: ``phys_probs.sum().backward()``, an expanded gradient)."""
    probs = probs.clone().requires_grad_()
    phys_probs, phys_map = route(probs, routing_map, tables, num_slots, **kwargs)
    if isinstance(upstream, str):
        phys_probs.float().sum().backward()
    else:
        phys_probs.backward(upstream)
    return phys_map, phys_probs.detach(), probs.grad


def _check(routing_map, tables, kwargs, num_slots, dtype, gen, upstream=None):
    routing_map, tables, kwargs = _on(routing_map), _on(tables), _on(kwargs)
    tokens, experts = routing_map.shape
    probs = torch.randn(tokens, experts, generator=gen).to(dtype).to(DEVICE)  # unrouted pairs' probs too
    probs[torch.rand(tokens, experts, generator=gen).to(DEVICE) < 0.05] = -0.0
    if upstream is None:
        upstream = torch.randn(tokens, num_slots, generator=gen).to(dtype)
        upstream[upstream.abs() < 0.3] = -0.0
        upstream = upstream.to(DEVICE)
    want = _run(route_to_slots_torch, probs, upstream, routing_map, tables, num_slots, kwargs)
    got = _run(fused.route_to_slots, probs, upstream, routing_map, tables, num_slots, kwargs)
    what = f"T={tokens} E={experts} P={num_slots} K={tables.spread.numel()} {dtype} {sorted(kwargs)}"
    assert got[0].dtype == torch.bool and got[0].shape == (tokens, num_slots), what
    assert got[1].dtype == dtype and got[1].shape == (tokens, num_slots), what
    assert torch.equal(got[0], want[0]), what
    assert torch.equal(_bits(got[1]), _bits(want[1])), what
    assert got[2].dtype == dtype, what
    assert torch.equal(_bits(got[2]), _bits(want[2])), what


# (tokens, experts, ranks, slots per rank, top-k): P > E, 2 to 4 copies of a few experts, empty slots
SHAPES = [
    (1, 4, 2, 4, 2),
    (7, 4, 3, 2, 1),
    (7, 16, 4, 6, 4),
    (256, 16, 4, 5, 4),
    (256, 64, 8, 9, 8),
    (1000, 4, 2, 3, 2),
    (1000, 16, 2, 10, 4),
    (1000, 64, 4, 18, 8),
    (100, 80, 4, 40, 6),  # E > 64, P > 128, K > 16: several tiles of experts, slots and spread experts
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,experts,ranks,slots_per_rank,topk", SHAPES)
def test_fused_routing_equals_the_torch_routing_bitwise(tokens, experts, ranks, slots_per_rank, topk, dtype):
    rng = np.random.default_rng(tokens * 100 + experts)
    gen = torch.Generator().manual_seed(tokens + experts)
    checked = 0
    for routing_map, tables, kwargs, num_slots in _cases(rng, tokens, experts, ranks, slots_per_rank, topk):
        _check(routing_map, tables, kwargs, num_slots, dtype, gen)
        checked += 1
    assert checked == 5 * min(ranks, 3)


def test_fused_routing_with_an_expanded_gradient_and_without_grad():
    rng = np.random.default_rng(5)
    gen = torch.Generator().manual_seed(5)
    for routing_map, tables, kwargs, num_slots in _cases(rng, 300, 16, 4, 6, 4):
        _check(routing_map, tables, kwargs, num_slots, torch.float32, gen, upstream="sum")
    routing_map, tables, kwargs = _on(routing_map), _on(tables), _on(kwargs)
    probs = torch.rand(300, 16, generator=gen).to(DEVICE)
    with torch.no_grad():
        got = fused.route_to_slots(probs.requires_grad_(), routing_map, tables, num_slots, **kwargs)
    want = route_to_slots_torch(probs.detach(), routing_map, tables, num_slots, **kwargs)
    assert not got[0].requires_grad and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_the_torch_gather_backward_equals_the_kernel(monkeypatch):
    """The backward's torch gather (inside a capture before the kernel ran, or after it failed): bitwise too."""
    monkeypatch.setattr(fused, "_BACKWARD_FAILED", True)
    rng = np.random.default_rng(8)
    gen = torch.Generator().manual_seed(8)
    for routing_map, tables, kwargs, num_slots in _cases(rng, 120, 16, 2, 12, 4):
        _check(routing_map, tables, kwargs, num_slots, torch.bfloat16, gen)
    log2phy = torch.tensor([[3], [0], [5], [1]])  # K = 0
    tables = slot_tables(log2phy, torch.ones(4, dtype=torch.int64))
    _check(torch.rand(9, 4, generator=gen) < 0.5, tables, dict(offset=1), 6, torch.float32, gen)


def test_fused_routing_without_spread_experts_and_without_tokens():
    gen = torch.Generator().manual_seed(2)
    # one copy each, two empty slots: K = 0
    log2phy = torch.tensor([[3], [0], [5], [1]])
    tables = slot_tables(log2phy, torch.ones(4, dtype=torch.int64))
    assert tables.spread.numel() == 0
    routing_map = torch.rand(9, 4, generator=gen) < 0.5
    for kwargs in (dict(offset=3), dict(split=(torch.zeros(4, dtype=torch.int64), torch.zeros(4, 0)))):
        split = kwargs.get("split")
        if split is not None:
            kwargs = dict(split=(split[0], split[1].to(torch.int64)))
        _check(routing_map, tables, kwargs, 6, torch.float32, gen)
    # no tokens at all
    log2phy = torch.tensor([[0, 2], [1, -1]])
    tables = _on(slot_tables(log2phy, torch.tensor([2, 1])))
    probs = torch.zeros(0, 2, device=DEVICE, requires_grad=True)
    phys_probs, phys_map = fused.route_to_slots(
        probs, torch.zeros(0, 2, dtype=torch.bool, device=DEVICE), tables, 3
    )
    assert phys_probs.shape == (0, 3) and phys_map.shape == (0, 3)
    phys_probs.sum().backward()
    assert probs.grad.shape == (0, 2)


def test_fused_routing_of_long_scans_and_large_offsets():
    """More tokens than one scan step (the running carry), a round-robin offset past the copies."""
    rng = np.random.default_rng(9)
    gen = torch.Generator().manual_seed(9)
    row = np.array([0, 1, 2, 0, 3, 0, 1, 0])  # expert 0: 4 copies, expert 1: 2
    log2phy, count = build_log2phy(row[None, :], 4)
    tables = slot_tables(torch.from_numpy(log2phy[0]), torch.from_numpy(count[0]))
    (routing_map,) = _routings(rng, 2500, 4, 2, 1)
    for offset in (0, 1, 3, 7, 1001):
        _check(routing_map, tables, dict(offset=offset), 8, torch.bfloat16, gen)
    counts = routing_map.sum(0, keepdim=True)
    bounds = copy_bounds(balanced_shares(counts.sum(0), replica_tables(row, 2, 4)))
    _check(
        routing_map, tables, dict(split=(torch.zeros(4, dtype=torch.int64), bounds)), 8, torch.float32, gen
    )


def test_route_to_slots_takes_the_fused_path_on_cuda(caplog):
    """The public ``route_to_slots``: the fused kernels on CUDA (logged once), the torch functions on CPU; a
    failing launch falls back to torch for good (logged)."""
    rng = np.random.default_rng(4)
    gen = torch.Generator().manual_seed(4)
    routing_map, tables, kwargs, num_slots = next(_cases(rng, 64, 16, 4, 5, 4))
    routing_map, tables, kwargs = _on(routing_map), _on(tables), _on(kwargs)
    probs = torch.rand(64, 16, generator=gen).to(DEVICE)
    want = route_to_slots_torch(probs, routing_map, tables, num_slots, **kwargs)
    calls = []
    real = fused.route_to_slots

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    fused.route_to_slots = counting
    try:
        with caplog.at_level(logging.INFO, logger="megatron_eplb"):
            got = slot_routing.route_to_slots(probs, routing_map, tables, num_slots, **kwargs)
    finally:
        fused.route_to_slots = real
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(calls) == (1 if DEVICE.type == "cuda" else 0)
    if DEVICE.type != "cuda":
        return
    assert any("route_to_slots: fused Triton kernels" in r.getMessage() for r in caplog.records) or any(
        "fused Triton kernels" in line for line in slot_routing._logged
    )

    def failing(*args, **kw):
        raise RuntimeError("no kernel here")

    fused.route_to_slots = failing
    try:
        got = slot_routing.route_to_slots(probs, routing_map, tables, num_slots, **kwargs)
        assert slot_routing._FUSED_FAILED
    finally:
        fused.route_to_slots = real
        slot_routing._FUSED_FAILED = False
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_fused_routing_in_a_cuda_graph():
    """Captured after a first launch, replayed on new routings: bitwise the torch routing, gradient too."""
    if DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    rng = np.random.default_rng(6)
    gen = torch.Generator().manual_seed(6)
    cases = list(_cases(rng, 512, 64, 8, 9, 8))
    routing_map, tables, kwargs, num_slots = cases[3]  # the split
    routing_map, tables, kwargs = _on(routing_map), _on(tables), _on(kwargs)
    static_map = routing_map.clone()
    static_probs = torch.rand(512, 64, generator=gen).to(DEVICE).requires_grad_()
    upstream = torch.randn(512, num_slots, generator=gen).to(DEVICE)

    def step():
        static_probs.grad = None
        phys_probs, phys_map = slot_routing.route_to_slots(
            static_probs, static_map, tables, num_slots, **kwargs
        )
        phys_probs.backward(upstream)
        return phys_probs.detach(), phys_map, static_probs.grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles and loads the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for other, _, _, _ in cases[8:11]:
        static_map.copy_(other.to(DEVICE))
        with torch.no_grad():
            static_probs.copy_(torch.rand(512, 64, generator=gen).to(DEVICE))
        graph.replay()
        want = _run(
            route_to_slots_torch, static_probs.detach(), upstream, static_map, tables, num_slots, kwargs
        )
        assert torch.equal(out[1], want[0])
        assert torch.equal(_bits(out[0]), _bits(want[1])) and torch.equal(_bits(out[2]), _bits(want[2]))


def test_unfit_shapes_name_the_reason():
    tables = slot_tables(torch.tensor([[0, 2], [1, -1]]), torch.tensor([2, 1]))
    probs = torch.rand(4, 2)
    assert fused.unfit(probs, probs > 0.5, tables, 3) is None
    assert "float / bool" in fused.unfit(probs, probs, tables, 3)
    assert "[T, E]" in fused.unfit(probs, (probs > 0.5)[:3], tables, 3)
    if DEVICE.type == "cuda":
        assert "tables" in fused.unfit(probs.to(DEVICE), (probs > 0.5).to(DEVICE), tables, 3)


def test_the_count_is_the_maps_and_feeds_the_routing():
    """``count_pairs``: the counts are the map's column sums (added into ``record`` too), the blocks its sums
    per block of tokens; the routing handed them is the same as the one that counts itself."""
    rng = np.random.default_rng(11)
    gen = torch.Generator().manual_seed(11)
    routing_map, tables, kwargs, num_slots = list(_cases(rng, 700, 16, 4, 6, 4))[3]  # the split
    routing_map, tables, kwargs = _on(routing_map), _on(tables), _on(kwargs)
    record = torch.full((16,), 5, dtype=torch.int64, device=DEVICE)
    counts, blocks, table = fused.count_pairs(routing_map, tables, num_slots, record)
    step = fused.block_tokens(700)
    want = routing_map.sum(0)
    assert counts.dtype == torch.int64 and torch.equal(counts, want) and torch.equal(record, want + 5)
    assert blocks.shape == (16, -(-700 // step))
    for b in range(blocks.shape[1]):
        assert torch.equal(blocks[:, b].long(), routing_map[b * step : (b + 1) * step].sum(0))
    probs = torch.rand(700, 16, generator=gen).to(DEVICE)
    given = slot_routing.PairCounts(counts, blocks, table)
    got = fused.route_to_slots(probs, routing_map, tables, num_slots, counted=given, **kwargs)
    want = route_to_slots_torch(probs, routing_map, tables, num_slots, **kwargs)
    assert torch.equal(got[1], want[1]) and torch.equal(_bits(got[0]), _bits(want[0]))
    # the public count: the same counts on either path, the record added once
    record.zero_()
    assert torch.equal(slot_routing.count_pairs(routing_map, tables, num_slots, record=record).counts, counts)
    assert torch.equal(record, counts)


def test_the_routing_table_made_with_the_tables_is_the_count_kernels():
    """``slot_tables(..., num_slots=P)``'s table (torch, once per placement) equals the one the count kernel
    writes, for every kind of tables; the count then writes none (the tables' own is handed on)."""
    rng = np.random.default_rng(12)
    for routing_map, tables, _, num_slots in _cases(rng, 300, 16, 4, 6, 4):
        routing_map, tables = _on(routing_map), _on(tables)
        bare = tables._replace(table=None)
        made = slot_routing.routing_table(bare, num_slots)
        assert made.dtype == torch.int32 and made.shape == (2 * num_slots + 16,)
        assert torch.equal(fused.count_pairs(routing_map, bare, num_slots)[2], made)
        carried = tables._replace(table=made)
        assert fused.count_pairs(routing_map, carried, num_slots)[2] is made


def test_blocks_of_several_scan_steps(monkeypatch):
    """Fewer blocks than scan steps (a long batch): each program scans its block in steps with a carry."""
    monkeypatch.setattr(fused, "_MAX_BLOCKS", 2)
    rng = np.random.default_rng(12)
    gen = torch.Generator().manual_seed(12)
    steps = -(-1000 // fused._SCAN_T)
    assert fused.block_tokens(1000) == fused._SCAN_T * -(-steps // 2) > fused._SCAN_T
    for routing_map, tables, kwargs, num_slots in list(_cases(rng, 1000, 16, 2, 12, 4))[:5]:
        _check(routing_map, tables, kwargs, num_slots, torch.float32, gen)
