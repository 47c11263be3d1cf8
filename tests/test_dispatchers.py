"""patches/megatron/dispatchers.py: the pure routing of (token, logical expert) pairs to physical slots."""

from functools import partial

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_eplb.patches.megatron.dispatchers import route_to_slots, slot_tables  # noqa: E402

from megatron_eplb.placement import ExpertPlacement, build_log2phy  # noqa: E402


def test_route_to_slots_even_split():
    placement = ExpertPlacement(np.array([[0, 1, 2, 0, 3, 0]]), 3, 4)
    routing_map = torch.zeros(7, 4, dtype=torch.bool)
    routing_map[:, 0] = True
    routing_map[::2, 2] = True
    probs = torch.rand(7, 4) * routing_map
    log2phy = torch.tensor(placement.log2phy[0])
    count = torch.tensor(placement.replica_count[0])
    phys_probs, phys_map = route_to_slots(probs, routing_map, slot_tables(log2phy, count), 6)
    assert phys_map.shape == (7, 6)
    assert phys_map[:, [0, 3, 5]].sum(0).tolist() == [3, 2, 2]  # 7 pairs of expert 0 over 3 copies
    assert phys_map[:, 2].sum() == 4 and phys_map[:, [1, 4]].sum() == 0
    # each pair lands in exactly one copy with its probability
    logical = torch.zeros(7, 4).index_add_(1, torch.as_tensor(placement.phy2log[0]), phys_probs)
    torch.testing.assert_close(logical, probs)
    # local_first: rank 1 holds slots 2, 3 -> expert 0 stays on slot 3
    local = torch.tensor([3, -1, 2, -1])
    assert slot_tables(log2phy, count).spread.tolist() == [0]  # only the replicated expert is scanned
    assert slot_tables(log2phy, count, local).spread.numel() == 0  # ... and none when it has a local copy
    _, lf_map = route_to_slots(probs, routing_map, slot_tables(log2phy, count, local), 6)
    assert lf_map[:, 3].sum() == 7


def test_routing_table_names_each_slots_expert_and_copy():
    """``routing_table`` (made with the tables, read by the fused routing): slot -> expert (``-1`` where no pair
    goes: an empty slot, or a copy a ``local_slot`` leaves out), slot -> spread index, expert -> spread index."""
    row = np.array([0, 1, 2, 0, 3, 0, -1])  # expert 0 in slots 0, 3, 5; slot 6 empty
    log2phy, count = (torch.from_numpy(a[0]) for a in build_log2phy(row[None, :], 4))
    count = count.clamp(min=1)
    table = slot_tables(log2phy, count, num_slots=7).table
    assert table.dtype == torch.int32
    assert table.tolist() == [0, 1, 2, 0, 3, 0, -1] + [0, -1, -1, 0, -1, 0, -1] + [0, -1, -1, -1]
    local = torch.tensor([3, -1, 2, -1])  # expert 0's pairs all on slot 3: slots 0 and 5 get none
    table = slot_tables(log2phy, count, local, num_slots=7).table
    assert table.tolist() == [-1, 1, 2, 0, 3, -1, -1] + [-1] * 7 + [-1] * 4
    every = slot_tables(log2phy, count, spread=torch.arange(4), num_slots=7).table  # every expert spread
    assert every.tolist() == [0, 1, 2, 0, 3, 0, -1] + [0, 1, 2, 0, 3, 0, -1] + [0, 1, 2, 3]
    assert slot_tables(log2phy, count).table is None  # without P: the count kernel makes it per forward


def test_route_to_slots_per_batch_shares_over_source_ranks():
    """``split``: each source rank routes its pairs by the shared bounds; together the copies get their shares."""
    from megatron_eplb.replica_split import balanced_shares, copy_bounds, replica_tables, source_offsets

    placement = ExpertPlacement(np.array([[0, 1, 2, 0, 3, 1, 0, 2, 3]]), 3, 4)  # 3 ranks x 3 slots
    gen = torch.Generator().manual_seed(0)
    maps = [torch.rand(11, 4, generator=gen) < torch.tensor([0.9, 0.5, 0.3, 0.2]) for _ in range(3)]
    counts = torch.stack([m.sum(0) for m in maps])  # [N_src, E]
    tables = replica_tables(placement.phy2log[0], 3, 4)
    shares = balanced_shares(counts.sum(0), tables)
    bounds, first = copy_bounds(shares), source_offsets(counts)
    log2phy = torch.tensor(placement.log2phy[0])
    count = torch.tensor(placement.replica_count[0])
    per_slot = torch.zeros(9, dtype=torch.int64)
    for src, routing_map in enumerate(maps):
        probs = torch.rand(11, 4, generator=gen) * routing_map
        phys_probs, phys_map = route_to_slots(
            probs, routing_map, slot_tables(log2phy, count), 9, split=(first[src], bounds)
        )
        logical = torch.zeros(11, 4).index_add_(1, torch.as_tensor(placement.phy2log[0]), phys_probs)
        torch.testing.assert_close(logical, probs)  # every pair in exactly one copy, with its probability
        assert torch.equal(phys_map.sum(1), routing_map.sum(1))
        per_slot += phys_map.sum(0)
    valid = log2phy >= 0
    assert torch.equal(per_slot[log2phy[valid]], shares[valid])


def test_route_to_slots_lives_in_the_core_and_runs_torch_on_cpu():
    """``dispatchers`` re-exports the core's names; on CPU the public function is the torch routing."""
    from megatron_eplb.patches.megatron import dispatchers

    from megatron_eplb import slot_routing

    assert dispatchers.route_to_slots is slot_routing.route_to_slots
    assert (
        dispatchers.SlotTables is slot_routing.SlotTables
        and dispatchers.slot_tables is slot_routing.slot_tables
    )
    tables = slot_tables(torch.tensor([[0, 2], [1, -1]]), torch.tensor([2, 1]))
    routing_map = torch.tensor([[True, True], [True, False], [False, True]])
    probs = torch.rand(3, 2)
    got = route_to_slots(probs, routing_map, tables, 3, offset=1)
    want = slot_routing.route_to_slots_torch(probs, routing_map, tables, 3, offset=1)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[1].tolist() == [[False, True, True], [True, False, False], [False, True, False]]


def _old_route_to_slots(
    probs, routing_map, log2phy, replica_count, num_slots, offset=0, local_slot=None, split=None
):
    """The formula before the per-placement tables (a scan over every expert and a dropped column ``P``): the
    reference the tables' path must equal bitwise."""
    num_tokens = routing_map.shape[0]
    pair_index = routing_map.t().to(torch.int32).cumsum(dim=1) - 1
    if split is not None:
        first, bounds = split
        copy = torch.searchsorted(bounds, pair_index + first.unsqueeze(1), right=True).t()
    else:
        copy = ((pair_index + offset) % replica_count.unsqueeze(1)).t()
    slot = torch.gather(log2phy.t(), 0, copy)
    if local_slot is not None:
        slot = torch.where(local_slot >= 0, local_slot, slot)
    slot = torch.where(routing_map, slot, num_slots)
    phys_map = torch.zeros(num_tokens, num_slots + 1, dtype=torch.bool).scatter_(1, slot, routing_map)
    phys_probs = torch.zeros(num_tokens, num_slots + 1, dtype=probs.dtype).scatter(1, slot, probs)
    return phys_probs[:, :num_slots], phys_map[:, :num_slots].contiguous()


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (``torch.equal`` takes ``-0.0 == 0.0``)."""
    return x.contiguous().view({4: torch.int32, 2: torch.int16}[x.element_size()])


def _random_row(gen, experts: int, ranks: int, slots_per_rank: int) -> np.ndarray:
    """A ``phy2log`` row: every expert once, the other slots copies (up to 3 of one expert) or empty."""
    extra = ranks * slots_per_rank - experts
    copies = np.repeat(np.arange(experts), 2)[torch.randperm(2 * experts, generator=gen)[:extra].numpy()]
    copies[torch.rand(extra, generator=gen).numpy() < 0.2] = -1
    return np.concatenate([np.arange(experts), copies])[
        torch.randperm(ranks * slots_per_rank, generator=gen).numpy()
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_route_to_slots_tables_equal_the_old_formula_bitwise(seed, dtype):
    """The per-placement tables' path against the old formula on random routings with replicas (and empty
    slots): the same physical map (so the same slot per pair), bitwise the same probs and prob gradients, for
    every EP rank's round-robin offset, ``local_first``, per-batch shares over source ranks, and every expert
    spread (the per-step replicas' tables); with dropped pairs (tokens routed nowhere, experts without pairs,
    probs of unrouted pairs that must not pass)."""
    from megatron_eplb.replica_split import balanced_shares, copy_bounds, replica_tables, source_offsets

    gen = torch.Generator().manual_seed(seed)
    experts, ranks, slots_per_rank, tokens, topk = (16, 4, 6, 97, 4) if seed % 2 else (8, 2, 7, 64, 2)
    row = _random_row(gen, experts, ranks, slots_per_rank)
    log2phy, count = build_log2phy(row[None, :], experts)
    log2phy, count = torch.from_numpy(log2phy[0]), torch.from_numpy(count[0])
    num_slots = ranks * slots_per_rank
    assert (count > 1).any()
    maps = []
    for _ in range(ranks):  # one routing per source rank
        scores = torch.rand(tokens, experts, generator=gen)
        scores[:, seed % experts] = -1.0  # an expert with no pair
        routing_map = torch.zeros(tokens, experts, dtype=torch.bool)
        routing_map.scatter_(1, scores.topk(topk, dim=1).indices, True)
        routing_map[:, seed % experts] = False
        routing_map[torch.rand(tokens, generator=gen) < 0.1] = False  # dropped tokens
        maps.append(routing_map)
    counts = torch.stack([m.sum(0) for m in maps])
    bounds = copy_bounds(balanced_shares(counts.sum(0), replica_tables(row, ranks, experts)))
    first = source_offsets(counts)
    every = torch.arange(experts)
    cases = []
    for rank, routing_map in enumerate(maps):
        local = torch.full((experts,), -1, dtype=torch.int64)
        for slot in reversed(range(rank * slots_per_rank, (rank + 1) * slots_per_rank)):
            if row[slot] >= 0:
                local[row[slot]] = slot
        split = (first[rank], bounds)
        cases += [
            (routing_map, slot_tables(log2phy, count), dict(offset=rank)),
            (routing_map, slot_tables(log2phy, count, local), dict(offset=rank, local_slot=local)),
            (routing_map, slot_tables(log2phy, count), dict(split=split)),
            (routing_map, slot_tables(log2phy, count, spread=every), dict(split=split)),
            (routing_map, slot_tables(log2phy, count, spread=every), dict(offset=rank)),
        ]
    for routing_map, tables, old_kwargs in cases:
        new_kwargs = {k: v for k, v in old_kwargs.items() if k != "local_slot"}  # in the tables
        probs = torch.randn(tokens, experts, generator=gen).to(dtype)  # unrouted pairs' probs nonzero too
        upstream = torch.randn(tokens, num_slots, generator=gen).to(dtype)
        upstream[upstream.abs() < 0.3] = -0.0
        old = _map_probs_grad(
            partial(_old_route_to_slots, routing_map=routing_map, log2phy=log2phy, replica_count=count),
            probs,
            upstream,
            **old_kwargs,
        )
        new = _map_probs_grad(
            partial(route_to_slots, routing_map=routing_map, tables=tables), probs, upstream, **new_kwargs
        )
        assert new[0].dtype == torch.bool and new[0].shape == (tokens, num_slots)
        assert torch.equal(new[0], old[0])
        assert torch.equal(_bits(new[1]), _bits(old[1]))
        assert torch.equal(_bits(new[2]), _bits(old[2]))


def _map_probs_grad(route, probs, upstream, **kwargs):
    """``(physical map, physical probs, gradient of probs)`` of ``route(probs, num_slots=P, **kwargs)``
    backpropagating ``upstream [T, P]``."""
    probs = probs.clone().requires_grad_()
    phys_probs, phys_map = route(probs, num_slots=upstream.shape[1], **kwargs)
    phys_probs.backward(upstream)
    return phys_map, phys_probs.detach(), probs.grad
