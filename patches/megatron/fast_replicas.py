"""Seam: per-step replicas (``eplb_fast_replicas``) in Megatron-core MoE layers — the fast timescale.

On top of the persistent placement (the handle's ``S`` slots per rank, their optimizer state owned by their
parameters), every rank gets ``F`` **spare slots** (``eplb_fast_replica_budget``).  In every MoE layer forward:

1. **route** (the handle's ``_route_physical`` hands over, :meth:`FastReplicas.route`): the ``[E]`` pair counts
   of every EP rank are all-gathered (the same one collective as the ``balanced`` dispatch), and every rank
   derives the same spare copies and split from their sum (:func:`megatron_eplb.fast_replicas.plan_fast_replicas`,
   pure, on the device); the tokens are routed onto the **union** layout of ``U = S + F`` slots per rank (rank
   ``r``'s persistent slot ``k`` is union slot ``r * U + k``, its spare slot ``j`` is ``r * U + S + j``): the
   dispatcher is rebuilt for ``N * U`` slots, ``U`` of them local;
2. **fetch** (started right after routing, asynchronously, ahead of the token dispatch; awaited in the experts
   forward, before the expert compute): the chosen experts' weights come from a persistent holder over one
   ``all_to_all_single`` of the EP group that every rank enters (split sizes from the spare choice, brought to
   the host: identical everywhere; skipped by every rank when no spare slot is used); a holder inside the target
   rank's node first, and a copy no holder of which is in that node is chosen only when it pays for the
   inter-node link (``eplb_fast_cross_node_min_tokens``, the cross-node rule of
   :mod:`megatron_eplb.fast_replicas`; counted in :attr:`FastReplicas.fetched_cross_node`).  Each copy is
   read from the holder's parameters through autograd (:class:`_Fetch`): in backward the copy's weight gradient
   travels back by the reverse all-to-all and is summed into the holder's gradient by autograd itself, so it is
   in ``param.grad`` (or Megatron's ``main_grad`` hooks) before the optimizer step, and the persistent
   replicas' sum (``handle.sum_replica_grads``) follows as before.  A copy owns no optimizer state and never
   outlives its step;
3. **compute**: the persistent slots run through the experts module as before (their slot counts recorded by
   the handle), the spare slots through the same Megatron class's ``forward`` on a view whose weights are the
   fetched copies (``SequentialMLP``: its expert module called with the copy's tensors, ``torch.func.functional_call``;
   ``GroupedMLP``: ``weight1`` / ``weight2`` stacked from the copies).  A token routed to a copy computes the
   same function as on its holder, so outputs and gradients equal the unpatched model's.

Ordering: the fetch's backward all-to-all runs in the autograd node that also passes the gradient of the
experts' input on, so on every rank it comes after the combine's backward and before the dispatch's backward of
the same layer.  Buffers: the received copies of a layer live in a pool shared by all layers (one buffer of
``F`` copies per layer alive between its forward and its backward, returned to the pool by the backward; one in
all without autograd), see :meth:`FastReplicas.memory_report`.

Supported: ``SequentialMLP`` and the legacy ``GroupedMLP``, the allgather and alltoall dispatchers, without
``gradient_accumulation_fusion`` (Megatron's fused wgrad writes into ``main_grad`` of the parameter it knows,
which a fetched copy is not).  The spare choice needs a host sync per layer for the all-to-all's split sizes
(as Megatron's alltoall dispatcher has for its own).  On NCCL the fetch shares the EP group's communicator (and
stream) with the token dispatch, so it runs before the dispatch's all-to-all, not beside it, unless
:meth:`FastReplicas.use_separate_group` gave it a communicator of its own.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_eplb.config import CROSS_NODE_MIN_TOKENS
from megatron_eplb.fast_replicas import FastPlan, FastPlanner, FastTables, fast_tables
from megatron_eplb.replica_split import align_bounds, copy_bounds, source_offset

from .compat import EPLBPatchError
from .dispatchers import rebuild_dispatcher, route_to_slots, slot_tables

__all__ = ["SUPPORTED_FAST_EXPERTS", "FastReplicas", "install"]

logger = logging.getLogger(__name__)

SUPPORTED_FAST_EXPERTS = ("SequentialMLP", "GroupedMLP")


def install(
    handle, budget: int, num_nodes: int = 1, cross_node_min_tokens: int = CROSS_NODE_MIN_TOKENS
) -> FastReplicas:
    """Give every MoE layer of ``handle`` (a ``MegatronEPLB``) ``budget`` spare slots per rank, refilled every
    step; returns the :class:`FastReplicas` (also ``handle.fast``).  Local: no communication.  With
    ``num_nodes`` > 1 (``eplb_num_nodes``: the EP group's ranks in that many equal consecutive nodes) a copy is
    fetched from a holder inside its rank's node where there is one, and a copy that would have to come across
    nodes is chosen only when it takes at least ``cross_node_min_tokens`` (``eplb_fast_cross_node_min_tokens``)
    more tokens off the step's busiest rank than the best copy inside a node holding the expert (the cross-node
    rule of :mod:`megatron_eplb.fast_replicas`; 0: copies go anywhere).

    Raises:
        EPLBPatchError: an unsupported expert class or ``gradient_accumulation_fusion`` (names what works).
    """
    if int(budget) < 1:
        raise EPLBPatchError(f"eplb_fast_replica_budget={budget} must be >= 1")
    for idx, storage in enumerate(handle._storages):
        if storage.class_name not in SUPPORTED_FAST_EXPERTS:
            raise EPLBPatchError(
                f"MoE layer {handle.layer_names[idx]!r}: eplb_fast_replicas does not support expert class "
                f"{storage.class_name}; supported: {', '.join(SUPPORTED_FAST_EXPERTS)}"
            )
        if getattr(storage.experts.config, "gradient_accumulation_fusion", False):
            raise EPLBPatchError(
                f"MoE layer {handle.layer_names[idx]!r}: eplb_fast_replicas needs gradient_accumulation_fusion="
                "False (the fused wgrad writes into the main_grad of the parameter it knows, which a fetched copy "
                "is not; its gradient would be lost)"
            )
    if num_nodes < 1 or handle.ep_size % num_nodes:
        raise EPLBPatchError(f"eplb_num_nodes={num_nodes} does not divide the EP size {handle.ep_size}")
    m = cross_node_min_tokens
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 0:
        raise EPLBPatchError(f"eplb_fast_cross_node_min_tokens={m!r} must be an integer >= 0 (tokens)")
    fast = FastReplicas(handle, int(budget), handle.ep_size // num_nodes, int(cross_node_min_tokens))
    handle.fast = fast
    return fast


class _Pool:
    """Receive buffers ``[F, n]`` shared by all layers: taken by a layer's fetch, given back when its copies are
    dead (after its backward; right after its forward without autograd)."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self.allocated_bytes = 0
        self.in_use = 0
        self.peak_in_use = 0

    def take(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        free = self._free.setdefault((shape, dtype, device), [])
        self.in_use += 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        if free:
            return free.pop()
        buf = torch.empty(shape, dtype=dtype, device=device)
        self.allocated_bytes += buf.numel() * buf.element_size()
        return buf

    def give(self, buf: torch.Tensor) -> None:
        self.in_use -= 1
        self._free.setdefault((tuple(buf.shape), buf.dtype, buf.device), []).append(buf)


class _Fetch(torch.autograd.Function):
    """``(hidden, send) -> (hidden, copies)``: ``copies [F, n]`` this rank's spare copies, received over one
    ``all_to_all_single`` from their holders (``send [k, n]``: the rows this rank sends, read from its
    parameters); backward sends each copy's gradient back the same way (reverse splits) and passes ``hidden``'s
    gradient on, so every rank runs it between the layer's combine and dispatch backward."""

    @staticmethod
    def forward(ctx, hidden, send, fetch):
        ctx.fetch = fetch
        copies = fetch.finish()  # the all-to-all was started at routing (``send``'s data is on its way)
        return hidden.view_as(hidden), copies

    @staticmethod
    def backward(ctx, grad_hidden, grad_copies):
        fetch = ctx.fetch
        grad_send = fetch.send_back(grad_copies)
        return grad_hidden, grad_send, None


class _LayerFetch:
    """One layer's fetch of one step: who sends which rows to whom (host lists, the same on every rank)."""

    def __init__(self, owner: FastReplicas, idx: int, fast_expert: np.ndarray) -> None:
        self.owner = owner
        handle = owner.handle
        n, f, me = handle.ep_size, owner.budget, handle.ep_rank
        holder_rank, holder_slot, count = owner._holders[idx]
        self.send_items: list[tuple[int, int]] = []  # (target rank, local slot of mine) in target order
        self.recv_rows: list[int] = []  # my spare slot j of each received row, in source order
        in_splits, out_splits = [0] * n, [0] * n
        recv_by_source: list[list[int]] = [[] for _ in range(n)]
        #: copies of this step (all ranks) fetched from a holder in another node; of them, this rank's
        self.cross_node = 0
        self.my_cross_node = 0
        for t in range(n):
            for j in range(f):
                e = int(fast_expert[t, j])
                if e < 0:
                    continue
                holders = holder_rank[e, : int(count[e])]
                near = holders[holders // owner.ranks_per_node == t // owner.ranks_per_node]
                holders = near if len(near) else holders  # a holder inside the target's node first
                cross = len(near) == 0
                self.cross_node += int(cross)
                self.my_cross_node += int(cross and t == me)
                src = int(holders[(t * f + j) % len(holders)])  # spread the sends over the holders
                c = int(np.nonzero(holder_rank[e] == src)[0][0])
                if src == me:
                    self.send_items.append((t, int(holder_slot[e, c])))
                    in_splits[t] += 1
                if t == me:
                    recv_by_source[src].append(j)
                    out_splits[src] += 1
        for rows in recv_by_source:
            self.recv_rows.extend(rows)
        self.any = bool((fast_expert >= 0).any())
        self.idx = idx
        self.width = owner.width
        self.in_splits = [k * self.width for k in in_splits]
        self.out_splits = [k * self.width for k in out_splits]
        self.buffer: torch.Tensor | None = None

    def send_rows(self) -> torch.Tensor:
        """``[k, n]`` the rows this rank sends, read from its parameters with autograd (their gradient flows back
        into the holder's parameters)."""
        handle = self.owner.handle
        if not self.send_items:
            sp = handle.slot_params(self.idx, 0)[0]
            return sp.of(sp.param).reshape(-1)[:0].reshape(0, self.width)  # keeps the graph on a non-sender
        slots = [handle.slot_params(self.idx, k) for _, k in self.send_items]  # [k][tensors of a slot]
        columns = []
        for parts in zip(*slots):
            first = parts[0]
            if first.is_whole or any(sp.param is not first.param for sp in parts):  # a parameter per slot
                columns.append(torch.stack([sp.of(sp.param).reshape(-1) for sp in parts]))
            else:  # blocks of one stacked parameter (GroupedMLP): one gather, one gradient for it in backward
                blocks = first.param.view(-1).view(-1, first.numel)
                rows = torch.tensor([sp.offset // sp.numel for sp in parts], device=blocks.device)
                columns.append(blocks.index_select(0, rows))
        return torch.cat(columns, dim=1)

    def start(self, send: torch.Tensor) -> None:
        """Start the all-to-all that brings this rank its copies (asynchronous: it runs while the tokens are
        dispatched; :meth:`finish` waits for it)."""
        owner = self.owner
        self.buffer = owner.pool.take((owner.budget, self.width), send.dtype, send.device)
        self._got = self.buffer.new_empty(len(self.recv_rows), self.width)
        self._sent = send.detach().contiguous()
        self._work = dist.all_to_all_single(
            self._got.view(-1),
            self._sent.view(-1),
            self.out_splits,
            self.in_splits,
            group=owner.fetch_group,
            async_op=True,
        )

    def finish(self) -> torch.Tensor:
        """``[F, n]`` the spare copies of this rank (rows of unused spare slots are zeros)."""
        self._work.wait()
        self.buffer.zero_()
        if self.recv_rows:
            rows = torch.tensor(self.recv_rows, device=self.buffer.device)
            self.buffer.index_copy_(0, rows, self._got)
        self._got = self._sent = self._work = None
        return self.buffer

    def send_back(self, grad_copies: torch.Tensor | None) -> torch.Tensor:
        """The reverse all-to-all of the copies' gradients ``[F, n]``: ``[k, n]`` for the rows this rank sent."""
        owner = self.owner
        device = self.buffer.device
        if grad_copies is None:
            grad_copies = torch.zeros_like(self.buffer)
        rows = torch.tensor(self.recv_rows, dtype=torch.int64, device=device)
        outgoing = grad_copies.index_select(0, rows).contiguous()
        grad_send = grad_copies.new_empty(len(self.send_items), self.width)
        dist.all_to_all_single(
            grad_send.view(-1),
            outgoing.view(-1),
            self.in_splits,
            self.out_splits,
            group=owner.fetch_group,
        )
        self.release()
        return grad_send

    def release(self) -> None:
        if self.buffer is not None:
            self.owner.pool.give(self.buffer)
            self.buffer = None


class FastReplicas:
    """The per-step replicas of one handle's MoE layers (made by :func:`install`).

    Attributes:
        handle: the ``MegatronEPLB`` handle (persistent placement, storages, EP group).
        budget: ``F`` spare slots per rank.
        ranks_per_node: EP ranks per node (consecutive): a copy comes from a holder in its rank's node first.
        cross_node_min_tokens: ``m`` of the cross-node rule (``eplb_fast_cross_node_min_tokens``): a copy from
            another node only when it takes at least this many more tokens off the busiest rank than an in-node one.
        pool: the receive buffers shared by the layers.
    """

    def __init__(
        self,
        handle,
        budget: int,
        ranks_per_node: int | None = None,
        cross_node_min_tokens: int = CROSS_NODE_MIN_TOKENS,
    ) -> None:
        self.handle = handle
        self.budget = budget
        self.ranks_per_node = ranks_per_node or handle.ep_size
        self.num_nodes = handle.ep_size // self.ranks_per_node
        self.cross_node_min_tokens = cross_node_min_tokens
        #: The process group the copies travel over: the EP group, or a communicator of their own
        #: (:meth:`use_separate_group`).
        self.fetch_group = handle.ep_group
        self.pool = _Pool()
        n, s = handle.ep_size, handle.slots_per_rank
        self.union_slots_per_rank = s + budget
        self.width = sum(sp.numel for sp in handle.slot_params(0, 0))
        self._cache: list[tuple[np.ndarray, FastPlanner] | None] = [None] * handle.num_layers
        self._holders: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = [None] * handle.num_layers
        self._plans: list[FastPlan | None] = [None] * handle.num_layers
        # Per layer, this step's fetch (started at routing) and the rows it sends, until the experts run.
        self._fetches: list[tuple[_LayerFetch, torch.Tensor | None] | None] = [None] * handle.num_layers
        #: int64 ``[L, F]`` tokens each spare slot of this rank computed since :meth:`reset_loads`.
        self.spare_loads = torch.zeros(handle.num_layers, budget, dtype=torch.int64)
        #: copies fetched by this rank (spare slots used) since :meth:`reset_loads`, and steps (layer forwards).
        self.fetched = 0
        self.forwards = 0
        #: of :attr:`fetched`, the copies that came from another node (no holder in this rank's node), and the
        #: cross-node copies of the whole EP group (every rank counts the same number) since :meth:`reset_loads`.
        self.fetched_cross_node = 0
        self.group_cross_node = 0
        u = self.union_slots_per_rank
        for idx, layer in enumerate(handle.moe_layers()):
            layer.token_dispatcher = rebuild_dispatcher(layer, n * u, u, handle.ep_rank)
            layer.num_local_experts = u
            layer.local_expert_indices = list(range(handle.ep_rank * u, (handle.ep_rank + 1) * u))
            experts = layer.experts
            experts.forward = self._make_forward(idx, experts, experts.forward)
        logger.info(
            "megatron-eplb: per-step replicas on %d MoE layers, %d spare slot(s) per rank (%d slots per rank)",
            handle.num_layers,
            budget,
            u,
        )

    # ------------------------------------------------------------------ tables
    def planner(self, idx: int) -> FastPlanner:
        """Layer ``idx``'s :class:`FastPlanner` for the handle's current persistent row (retargeted on a commit)."""
        handle = self.handle
        row = handle.placement.phy2log[idx]
        cached = self._cache[idx]
        if cached is not None and np.array_equal(cached[0], row):
            return cached[1]
        tables = fast_tables(
            row,
            handle.ep_size,
            handle.num_experts,
            self.budget,
            handle.device,
            num_nodes=self.num_nodes,
            cross_node_min_gain=self.cross_node_min_tokens,
        )
        planner = FastPlanner(tables) if cached is None else cached[1].retarget(tables)
        self._cache[idx] = (row.copy(), planner)
        self._set_holders(idx, tables)
        return planner

    def _set_holders(self, idx: int, tables: FastTables) -> None:
        """Host: the persistent holders of each expert, (rank, local slot), for the fetch."""
        handle = self.handle
        copy_rank = tables.copy_rank.cpu().numpy()
        union = tables.copy_slot.cpu().numpy()
        u = self.union_slots_per_rank
        self._holders[idx] = (
            copy_rank,
            np.where(union >= 0, union % u, -1),
            (copy_rank < handle.ep_size).sum(1),
        )

    # ------------------------------------------------------------------- route
    def route(
        self, idx: int, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, E]`` logical probs / routing map to the ``[T, N * U]`` union slots of this step (collective: the
        ``[E]`` counts of every EP rank, one all-gather)."""
        from megatron_eplb.comm import all_gather_counts

        handle = self.handle
        planner = self.planner(idx)
        counts = routing_map.sum(dim=0, dtype=torch.int64)  # [E]
        every = all_gather_counts(counts, handle.ep_group, handle.ep_size)  # [N, E]
        total = every.sum(dim=0)
        plan = planner(total)
        self._plans[idx] = plan
        # The copies' all-to-all starts now, ahead of the token dispatch (the spare choice comes to the host:
        # the split sizes; every rank enters the same collectives in the same order).
        fetch = _LayerFetch(self, idx, plan.fast_expert.cpu().numpy())
        send = None
        if fetch.any:
            send = fetch.send_rows()
            fetch.start(send)
        self._fetches[idx] = (fetch, send)
        first = source_offset(every, handle.ep_rank)
        copy_count = (plan.copy_rank < handle.ep_size).sum(dim=1).clamp(min=1)
        # This step's copies are on the device: every expert is spread (no host sync to find the replicated).
        experts = torch.arange(handle.num_experts, device=routing_map.device)
        return route_to_slots(
            probs,
            routing_map,
            slot_tables(plan.copy_slot, copy_count, spread=experts),
            handle.ep_size * self.union_slots_per_rank,
            split=(first, align_bounds(copy_bounds(plan.shares), total, handle.split_align)),
        )

    # ----------------------------------------------------------------- experts
    def _make_forward(self, idx: int, experts: torch.nn.Module, inner):
        """The experts' ``forward(hidden, tokens_per_slot [U], probs)``: persistent slots through ``inner`` (the
        handle's counting forward), spare slots with the fetched copies."""
        s = self.handle.slots_per_rank

        def forward(hidden, tokens_per_expert, probs):
            pending = self._fetches[idx]
            if pending is None:
                raise EPLBPatchError(f"MoE layer {idx}: experts called without routing (per-step replicas)")
            self._fetches[idx] = None
            fetch, send = pending
            counts = torch.as_tensor(tokens_per_expert)
            copies = None
            if fetch.any:
                if torch.is_grad_enabled() and (hidden.requires_grad or send.requires_grad):
                    hidden, copies = _Fetch.apply(hidden, send, fetch)
                else:
                    copies = fetch.finish()
            persistent = int(counts[:s].sum())
            out, bias = inner(hidden[:persistent], tokens_per_expert[:s], probs[:persistent])
            spare_counts = counts[s:]
            self._count(idx, spare_counts, fetch)
            if copies is None:  # no spare slot used anywhere: nothing routed to them
                return out, bias
            spare_out, _ = self._spare_forward(
                experts, copies, hidden[persistent:], tokens_per_expert[s:], probs[persistent:]
            )
            if not (torch.is_grad_enabled() and copies.requires_grad):
                fetch.release()  # no backward: the copies are dead after this forward
            return torch.cat([out, spare_out], dim=0), bias

        return forward

    def _count(self, idx: int, spare_counts: torch.Tensor, fetch: _LayerFetch) -> None:
        from megatron_eplb.slot_copies import recomputing

        if not self.handle.recording or recomputing():
            return
        self.spare_loads[idx] += spare_counts.detach().to("cpu", torch.int64)
        self.fetched += int((spare_counts > 0).sum())
        self.fetched_cross_node += fetch.my_cross_node
        self.group_cross_node += fetch.cross_node
        self.forwards += 1

    def _spare_forward(self, experts, copies: torch.Tensor, hidden, tokens_per_expert, probs):
        """The Megatron class's own forward over the ``F`` spare slots holding ``copies [F, n]``."""
        storage = self.handle._storages[0]
        shapes = [sp.shape for sp in storage.slot_params(0)]
        names = storage.slot_param_names()
        tensors = []  # per spare slot, its tensors (views of its row of ``copies``)
        for j in range(self.budget):
            offset, parts = 0, []
            for shape in shapes:
                numel = int(np.prod(shape))
                parts.append(copies[j, offset : offset + numel].view(shape))
                offset += numel
            tensors.append(parts)
        cls = type(experts)
        if cls.__name__ == "GroupedMLP":
            hidden_size = experts.config.hidden_size
            # GroupedMLP reads weight1 as view(F, H, -1): the copies' blocks back to back (one copy: a view).
            stacked = [t[0] if len(tensors) == 1 else torch.stack(t) for t in zip(*tensors)]
            view = _SpareView(
                experts,
                num_local_experts=self.budget,
                weight1=stacked[0].reshape(hidden_size, -1),
                weight2=stacked[1].reshape(-1, hidden_size),
            )
        else:
            template = experts.local_experts[0]
            modules = [_FunctionalExpert(template, dict(zip(names, t))) for t in tensors]
            view = _SpareView(experts, num_local_experts=self.budget, local_experts=modules)
        return cls.forward(view, hidden, tokens_per_expert, probs)

    def use_separate_group(self):
        """Fetch over a process group of its own with the EP group's ranks (collective over the WORLD: every
        rank must call it, in the same order as its other group creations).  On NCCL the EP group's collectives
        share one stream, so the fetch runs before the token dispatch's all-to-all; on a communicator of its own
        it runs beside it.  Returns the new group."""
        ranks = dist.get_process_group_ranks(self.handle.ep_group)
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, ranks)
        mine = None
        for group in sorted({tuple(r) for r in every}):  # every EP group, the same order on every rank
            new = dist.new_group(list(group))
            if dist.get_rank() in group:
                mine = new
        self.fetch_group = mine
        return mine

    # ------------------------------------------------------------------ report
    def reset_loads(self) -> None:
        self.spare_loads.zero_()
        self.fetched = 0
        self.fetched_cross_node = 0
        self.group_cross_node = 0
        self.forwards = 0

    def memory_report(self, optimizer_bytes_per_param: int = 12) -> dict[str, Any]:
        """Bytes per rank of the spare slots against persistent-only redundancy with as many slots.

        Args:
            optimizer_bytes_per_param: optimizer state per parameter of a persistent slot (12: fp32 master and
                two fp32 Adam moments).
        Returns:
            ``slot_bytes`` (one expert's weights), ``spare_buffers_allocated`` (the pool now),
            ``spare_peak_training`` (``F`` copies per MoE layer alive between its forward and backward, plus
            one layer's gradients of them in its backward), ``spare_inference`` (one layer's ``F`` copies),
            ``persistent_only`` (``F`` more persistent slots per layer: weights, gradients and optimizer state,
            always resident).
        """
        handle = self.handle
        sp = handle.slot_params(0, 0)[0]
        elem = sp.param.element_size()
        slot = self.width * elem
        layers, f = handle.num_layers, self.budget
        return {
            "slot_bytes": slot,
            "spare_buffers_allocated": self.pool.allocated_bytes,
            "spare_buffers_peak_in_use": self.pool.peak_in_use,
            "spare_peak_training": (layers + 1) * f * slot,
            "spare_inference": f * slot,
            "persistent_only": layers * f * (2 * slot + self.width * optimizer_bytes_per_param),
        }


class _FunctionalExpert(torch.nn.Module):
    """One expert module of ``SequentialMLP`` run with other tensors (a fetched copy's): the module's own code,
    ``torch.func.functional_call``.  The template is not a submodule (the copy has no parameters)."""

    def __init__(self, template: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "_template", template)
        object.__setattr__(self, "_tensors", tensors)

    def forward(self, *args):
        return torch.func.functional_call(self._template, self._tensors, args)


class _SpareView:
    """The experts module seen as holding the spare slots only (``view``: the attributes that hold them)."""

    def __init__(self, experts: torch.nn.Module, **view: Any) -> None:
        self._experts = experts
        for name, value in view.items():
            setattr(self, name, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._experts, name)
