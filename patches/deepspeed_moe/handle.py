"""Seam: the handle (:class:`DeepSpeedMoEEPLB`), the model side of EPLB for ``deepspeed.moe.layer.MoE``.

It satisfies :class:`megatron_eplb.protocols.ExpertModel` for models built from DeepSpeed's own MoE layer
(``MoE`` → ``MOELayer`` → ``TopKGate`` + ``Experts``, as Megatron-DeepSpeed builds them), and wires each
layer once (:meth:`DeepSpeedMoEEPLB._convert_layer`):

* ``Experts.deepspeed_experts`` is rebuilt for ``S`` local slots (copies of the expert module), each filled
  from the logical expert it holds; ``MOELayer.num_local_experts = S``;
* ``TopKGate.forward`` is wrapped: the gate decides exactly as before (logical experts, capacity, drops,
  combine weights, aux loss, RNG draws); the wrapper records what it chose (``[L, E]``), maps every kept
  route to a slot and a row of an ``[P, C, M]`` buffer (:func:`.routing.routes_to_slots`) and returns
  ``E = P`` to ``MOELayer``, whose unchanged forward then dispatches to slots (all-to-all over the EP
  group), runs the local slots and combines.

State (all of it): the current :attr:`placement`; per MoE layer its routing tables on the device
(``log2phy [E, R]``, ``replica_count [E]``, ``local_slot [E]``); the load buffers: routed pairs per logical
expert ``[L, E]`` and routes this rank sent to each slot ``[L, P + 1]`` (column 0: not routed), both reset
every step by the manager; routed and dropped pairs per layer ``[L, 2]``, cumulative.  Shapes: ``L`` MoE layers, ``E`` logical experts, ``S`` slots
per rank, ``P = S * EP`` slots per layer.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_eplb.checkpoint import check_state_fits, logical_to_physical
from megatron_eplb.comm import all_gather_counts, collective_device
from megatron_eplb.errors import CheckpointError, DeepSpeedEPLBError, ExpertMapError
from megatron_eplb.load_recorder import LoadRecorder
from megatron_eplb.placement import ExpertPlacement, build_log2phy
from megatron_eplb.replica_split import BalancedSplit, replica_tables, source_offset
from megatron_eplb.slot_copies import (
    all_gather_rows,
    flatten,
    gather_logical,
    recomputing,
    refill_slots,
    unflatten_into,
)
from megatron_eplb.slots import SlotParam, SlotShape

from .routing import expert_counts, per_slot_capacity, routes_to_slots, slot_counts, split_routes_to_slots

__all__ = ["CAPACITY_MODES", "DeepSpeedMoEEPLB", "EXPERT_KEY_INFIX"]

logger = logging.getLogger("megatron_eplb")

CAPACITY_MODES = ("logical", "per_slot")
EXPERT_KEY_INFIX = "deepspeed_moe.experts.deepspeed_experts."
"""What a ``MoE`` module's expert keys have between the module name and the expert index."""


class DeepSpeedMoEEPLB(SlotShape):
    """Controls the placement-aware ``deepspeed.moe.layer.MoE`` layers of one model (returned by
    :func:`megatron_eplb.patches.deepspeed_moe.apply`); an :class:`~megatron_eplb.protocols.ExpertModel`.

    With ``patch=False`` (:func:`~megatron_eplb.patches.deepspeed_moe.attach`) nothing is changed: the handle
    only *reads* an unpatched model in DeepSpeed's own layout (rank ``r``'s local expert ``k`` is logical
    expert ``r * E / EP + k``: the default placement without redundancy), for logical checkpoints.

    Attributes:
        model: the model.  layer_names: ``[L]`` module names of the ``MoE`` layers.
        ep_group: the expert-parallel group (DeepSpeed's ``ep_size_<EP>``); ``ep_size``, ``ep_rank``.
        replica_dispatch: ``"balanced"`` (per-batch shares from every rank's kept routes), ``"even"`` or
            ``"local_first"``.
        capacity: ``"logical"`` (the gate's capacity per logical expert, the unpatched math) or
            ``"per_slot"`` (each physical slot its own capacity; changes which tokens are dropped).
        num_layers: ``L``.  num_experts: ``E``.  slots_per_rank: ``S``.
        placement: the :class:`ExpertPlacement` the layers route with (``phy2log [L, P]``).
        recording: whether real forwards are counted (``False`` pauses it, e.g. for evaluation).
        patched: whether the layers were converted (``False``: a read-only view of an unpatched model).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: list[tuple[str, torch.nn.Module]],
        placement: ExpertPlacement,
        ep_group,
        *,
        replica_dispatch: str = "even",
        capacity: str = "logical",
        patch: bool = True,
    ) -> None:
        self.model = model
        self.layer_names = [name for name, _ in layers]
        self._layers = [layer for _, layer in layers]
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        self.replica_dispatch = replica_dispatch
        self.capacity = capacity
        self.patched = patch
        self.num_layers = len(layers)
        self.num_experts = int(self._layers[0].num_experts)
        self.slots_per_rank = placement.slots_per_rank
        self.placement = placement
        first = next(self._experts(0).parameters())
        self.device = first.device
        L, E, P = self.num_layers, self.num_experts, self.num_slots
        self._recorder = LoadRecorder(L, E, self.slots_per_rank, self.device)  # logical loads (slots: _sent)
        self._sent = torch.zeros(L, P + 1, dtype=torch.int64, device=self.device)
        self._drops = torch.zeros(L, 2, dtype=torch.int64, device=self.device)
        self._sent_rows = list(self._sent.unbind(0))
        self._drop_rows = list(self._drops.unbind(0))
        self.recording = True
        self._tables = [self._routing_tables(placement.phy2log[i]) for i in range(L)]
        if patch:
            for idx, layer in enumerate(self._layers):
                self._convert_layer(idx, layer)
            logger.info(
                "megatron-eplb: %d DeepSpeed MoE layers placement-aware (%r, %s dispatch, %s capacity, EP rank %d/%d)",
                L,
                placement,
                replica_dispatch,
                capacity,
                self.ep_rank,
                self.ep_size,
            )
        else:  # read-only: observe the unchanged gates (DeepSpeed's layout: slot s holds expert s)
            for idx, layer in enumerate(self._layers):
                layer.deepspeed_moe.gate.register_forward_hook(self._make_gate_observer(idx))

    def _experts(self, layer: int) -> torch.nn.ModuleList:
        return self._layers[layer].deepspeed_moe.experts.deepspeed_experts

    # -------------------------------------------------------------- recording
    def loads(self) -> torch.Tensor:
        """int64 ``[L, E]``: (token, expert) pairs the gate routed on this rank per logical expert since the
        last :meth:`reset_loads`, before the capacity dropped any (what the router chose).  The live buffer."""
        return self._recorder.loads()

    def slot_loads(self) -> torch.Tensor:
        """int64 ``[L, S]``: tokens each local slot computed since the last :meth:`reset_loads` (the kept
        routes every rank of the EP group sent it).  Collective over :attr:`ep_group` (one all-reduce of
        ``[L, P]``: the forward only counts what this rank sends, a scatter-add)."""
        sent = self._sent[:, 1:].to(collective_device(self.ep_group))
        if self.ep_size > 1:
            sent = sent.clone()
            dist.all_reduce(sent, group=self.ep_group)
        s = self.slots_per_rank
        return sent[:, self.ep_rank * s : (self.ep_rank + 1) * s].to(self.device)

    def drop_counts(self) -> torch.Tensor:
        """int64 ``[L, 2]``: (token, expert) pairs the gates routed on this rank and the pairs the capacity
        dropped, since :meth:`reset_drop_counts` (or the start; :meth:`reset_loads` leaves them).  Live buffer."""
        return self._drops

    def reset_drop_counts(self) -> None:
        self._drops.zero_()

    def reset_loads(self) -> None:
        """Zero the per-step load buffers (in place, no host sync)."""
        self._recorder.reset()
        self._sent.zero_()

    # ---------------------------------------------------------------- slots
    def slot_params(self, layer: int, slot: int) -> list[SlotParam]:
        """The parameters of local slot ``slot`` of MoE layer ``layer`` (the expert module's order; each slot
        has its own: whole :class:`~megatron_eplb.slots.SlotParam` s)."""
        self._check(layer, slot)
        return [SlotParam.whole(p) for p in self._experts(layer)[slot].parameters()]

    def slot_param_names(self) -> list[str]:
        """Names of a slot's parameters within the expert module, e.g. ``["0.weight", "0.bias", ...]``."""
        return [name for name, _ in self._experts(0)[0].named_parameters()]

    def slot_tensors(self, layer: int, slot: int) -> list[torch.Tensor]:
        """The data of local slot ``slot``'s parameters (views without autograd)."""
        return [sp.data for sp in self.slot_params(layer, slot)]

    def write_slot(self, layer: int, slot: int, tensors: Sequence[torch.Tensor]) -> None:
        """Copy ``tensors`` (shapes as :meth:`slot_tensors`) into local slot ``slot``, parameters kept."""
        params = [sp.param for sp in self.slot_params(layer, slot)]
        if len(tensors) != len(params):
            raise DeepSpeedEPLBError(
                f"layer {layer} slot {slot}: {len(tensors)} tensors given, the slot has {len(params)}"
            )
        with torch.no_grad():
            for p, t in zip(params, tensors):
                if t.shape != p.shape:
                    raise DeepSpeedEPLBError(
                        f"layer {layer} slot {slot}: tensor of shape {list(t.shape)} for {list(p.shape)}"
                    )
                p.copy_(t)

    # -------------------------------------------------------------- placement
    def set_placement(self, placement: ExpertPlacement, optimizer: Any = None) -> None:
        """Re-place every layer in place (collective over :attr:`ep_group`, synchronous): each slot filled
        from its logical expert (a current copy); with ``optimizer`` (any
        :class:`~megatron_eplb.protocols.OptimizerSlots`, or a torch optimizer) its optimizer state too."""
        from megatron_eplb.optimizer_state import OptimizerSlotState

        self._check_placement(placement)
        if not self.patched:
            if placement != self.placement:
                raise DeepSpeedEPLBError(
                    "this model is not patched for EPLB (attach() reads DeepSpeed's own layout): it cannot be "
                    "re-placed; use apply() for placement-aware layers"
                )
            return
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer = OptimizerSlotState(optimizer)
        refill_slots(self, placement.phy2log, optimizer)
        self.placement = placement
        self._tables = [self._routing_tables(placement.phy2log[i]) for i in range(self.num_layers)]

    def commit_layer(self, layer: int, phy2log_row: Sequence[int] | np.ndarray) -> None:
        """Route MoE layer ``layer`` with ``phy2log_row`` (``[P]``), whose slots already hold those experts.
        Local: every rank commits the same row at the same step (the manager does)."""
        if not self.patched:
            raise DeepSpeedEPLBError("commit_layer on an unpatched model (attach()); use apply()")
        try:
            placement = self.placement.with_layer(layer, phy2log_row)
        except ExpertMapError as exc:
            raise DeepSpeedEPLBError(str(exc)) from None
        self._tables[layer] = self._routing_tables(placement.phy2log[layer], self._tables[layer][3])
        self.placement = placement

    # --------------------------------------------------------------- training
    def sum_replica_grads(self) -> None:
        """Replace each replicated expert's slot gradients by their sum over its copies (collective over
        :attr:`ep_group`; only replicated experts' rows travel).  Afterwards every copy holds the logical
        expert's gradient, so the optimizer takes the identical step on every copy."""
        for layer in range(self.num_layers):
            replicated = np.nonzero(self.placement.replica_count[layer] > 1)[0]
            if len(replicated) == 0:
                continue
            row_of = np.full(self.num_experts, -1, dtype=np.int64)
            row_of[replicated] = np.arange(len(replicated))
            local = self.placement.phy2log[layer, self.local_slots()]
            mine = [k for k in range(self.slots_per_rank) if local[k] >= 0 and row_of[local[k]] >= 0]
            params = {k: [sp.param for sp in self.slot_params(layer, k)] for k in range(self.slots_per_rank)}
            grads = {k: [_grad_of(p) for p in params[k]] for k in mine}
            width = sum(p.numel() for p in params[0])
            like = params[0][0]
            acc = torch.float32 if like.dtype in (torch.bfloat16, torch.float16) else like.dtype
            device = collective_device(self.ep_group)
            total = torch.zeros(len(replicated), width, dtype=acc, device=device)
            for k in mine:
                total[row_of[local[k]]] += torch.cat([g.reshape(-1) for g in grads[k]]).to(device, acc)
            dist.all_reduce(total, group=self.ep_group)
            for k in mine:
                src = total[row_of[local[k]]]
                offset = 0
                for p, g in zip(params[k], grads[k]):
                    g.copy_(src[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
                    if p.grad is None:
                        p.grad = g

    # ------------------------------------------------------------- checkpoints
    def expert_key_prefixes(self) -> list[str]:
        """``[L]`` state-dict key prefix of each MoE layer's experts up to the expert index, e.g.
        ``"blocks.0.moe.deepspeed_moe.experts.deepspeed_experts."``."""
        return [f"{name}.{EXPERT_KEY_INFIX}" if name else EXPERT_KEY_INFIX for name in self.layer_names]

    def logical_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict in the logical layout (collective over :attr:`ep_group`): expert keys
        ``{prefix}{e}.{name}`` for every logical expert ``e`` once (as DeepSpeed's model at EP = 1 has them,
        and as DeepSpeed's expert checkpoint files name them); other keys are this rank's own."""
        state = dict(self.model.state_dict())
        prefixes = self.expert_key_prefixes()
        for key in [k for k in state if any(k.startswith(p) for p in prefixes)]:
            del state[key]
        names = self.slot_param_names()
        for layer in range(self.num_layers):
            extra = {k: v for k, v in self._experts(layer)[0].state_dict().items() if k not in names}
            logical = gather_logical(self, layer)
            for e in range(self.num_experts):
                for name, tensor in zip(names, self._unflatten(logical[e])):
                    state[f"{prefixes[layer]}{e}.{name}"] = tensor.clone()
                for name, value in extra.items():
                    state[f"{prefixes[layer]}{e}.{name}"] = value
        return state

    def logical_entries(
        self, layer: int, experts: Sequence[Sequence[torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """State-dict entries of ``layer``'s experts in the logical layout (``{prefix}{e}.{name}``, as
        DeepSpeed's model at EP = 1 has them) from the ``E`` logical experts' tensors (:meth:`slot_params`
        order)."""
        prefix, names = self.expert_key_prefixes()[layer], self.slot_param_names()
        return {f"{prefix}{e}.{name}": t for e, ts in enumerate(experts) for name, t in zip(names, ts)}

    def split_logical_entries(
        self, layer: int, state: Mapping[str, torch.Tensor]
    ) -> list[list[torch.Tensor]]:
        """The inverse of :meth:`logical_entries`: ``[E]`` lists of tensors from ``state``.

        Raises:
            CheckpointError: ``state`` lacks an entry (names the key).
        """
        prefix, names = self.expert_key_prefixes()[layer], self.slot_param_names()
        out = []
        for e in range(self.num_experts):
            keys = [f"{prefix}{e}.{name}" for name in names]
            missing = [k for k in keys if k not in state]
            if missing:
                raise CheckpointError(f"the logical state dict has no {missing[0]!r}")
            out.append([state[k] for k in keys])
        return out

    def physical_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], phy2log: np.ndarray | None = None
    ) -> dict[str, torch.Tensor]:
        """This rank's model state dict from a logical one (any placement or EP size, or the unpatched model
        at EP = 1): every local slot from its logical expert under ``phy2log`` (default: the placement now).
        Local."""
        return logical_to_physical(
            state_dict,
            self.placement.phy2log if phy2log is None else phy2log,
            self.expert_key_prefixes(),
            rank=self.ep_rank,
            slots_per_rank=self.slots_per_rank,
        )

    def load_logical_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
        """Fill every slot from its logical expert in ``state_dict`` (:meth:`logical_state_dict` of any
        placement or EP size, or of the unpatched model at EP = 1), after checking every tensor fits.
        Local; returns ``load_state_dict``'s."""
        physical = self.physical_state_dict(state_dict)
        check_state_fits(physical, self.model, source="the logical state dict")
        return self.model.load_state_dict(physical, strict=strict)

    # ============================================================ internals
    def _check(self, layer: int, slot: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise DeepSpeedEPLBError(f"layer {layer} out of range [0, {self.num_layers})")
        if not 0 <= slot < self.slots_per_rank:
            raise DeepSpeedEPLBError(f"slot {slot} out of range [0, {self.slots_per_rank}) (local slots)")

    def _check_placement(self, placement: ExpertPlacement) -> None:
        try:
            placement.validate(
                num_layers=self.num_layers,
                num_experts=self.num_experts,
                num_ranks=self.ep_size,
                slots_per_rank=self.slots_per_rank,
            )
        except ExpertMapError as exc:
            raise DeepSpeedEPLBError(f"placement does not match the model: {exc}") from None

    def _unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for t in self.slot_tensors(0, 0):
            out.append(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return out

    def _routing_tables(self, row: np.ndarray, old_split: BalancedSplit | None = None) -> tuple:
        """Device tables of one layer: log2phy ``[E, R]``, replica_count ``[E]`` (at least 1), local_slot
        ``[E]`` (this rank's lowest slot holding the expert, else -1) and, for the ``balanced`` dispatch of a
        layer with replicas, its :class:`~megatron_eplb.replica_split.BalancedSplit` (``old_split``
        retargeted when given), else None."""
        row = np.asarray(row, dtype=np.int64)
        log2phy, count = build_log2phy(row[None, :], self.num_experts)
        local_slot = np.full(self.num_experts, -1, dtype=np.int64)
        for slot in reversed(self.local_slots()):
            if row[slot] >= 0:
                local_slot[row[slot]] = slot
        split = None
        if self.replica_dispatch == "balanced" and int(count[0].max()) > 1:
            tables = replica_tables(row, self.ep_size, self.num_experts, self.device)
            split = BalancedSplit(tables) if old_split is None else old_split.retarget(tables)
        to = functools.partial(torch.as_tensor, dtype=torch.int64, device=self.device)
        return to(log2phy[0]), to(np.maximum(count[0], 1)), to(local_slot), split

    def _convert_layer(self, idx: int, moe: torch.nn.Module) -> None:
        """Rebuild the layer's experts for ``S`` slots (filled from the logical experts) and wrap its gate."""
        experts = moe.deepspeed_moe.experts
        old = list(experts.deepspeed_experts)
        local = torch.stack([flatten(list(m.parameters())) for m in old])
        logical = all_gather_rows(local, self.ep_group)  # DeepSpeed puts expert r * E / EP + k on rank r
        if logical.shape[0] != self.num_experts:
            raise DeepSpeedEPLBError(
                f"layer {idx}: gathered {logical.shape[0]} experts, expected {self.num_experts}"
            )
        slots = torch.nn.ModuleList([copy.deepcopy(old[0]) for _ in range(self.slots_per_rank)])
        for module in slots:
            for p in module.parameters():
                p.allreduce = False  # DeepSpeed's expert tags: reduced over the expert-DP group only
                p.group_name = moe.expert_group_name
        experts.deepspeed_experts = slots
        experts.num_local_experts = moe.deepspeed_moe.num_local_experts = moe.num_local_experts = (
            self.slots_per_rank
        )
        row = self.placement.phy2log[idx]
        for k, slot in enumerate(self.local_slots()):
            if row[slot] >= 0:
                unflatten_into(self.slot_tensors(idx, k), logical[int(row[slot])].to(self.device))
        gate = moe.deepspeed_moe.gate
        gate.forward = self._make_gate_forward(idx, gate, gate.forward)
        moe._megatron_eplb_patched = True

    def _record(self, idx: int, exp_counts: torch.Tensor, slot: torch.Tensor, sent: torch.Tensor) -> None:
        """Count one forward of layer ``idx``: routed pairs per expert, kept routes per slot, drops."""
        if self.recording and not recomputing():
            self._recorder.logical_rows[idx].add_(exp_counts)
            self._sent_rows[idx].add_(sent)
            routed = exp_counts.sum()
            self._drop_rows[idx].add_(torch.stack((routed, routed - (slot >= 0).sum())))

    def _make_gate_observer(self, idx: int):
        """A forward hook recording an unpatched gate's sparse routes (its output is left as it is)."""
        num_slots = self.num_slots

        def hook(module, args, out):
            if isinstance(out, tuple) and len(out) == 7:
                indices, exp_counts = out[3], out[6]
                self._record(idx, exp_counts, indices, slot_counts(indices, num_slots))

        return hook

    def _make_gate_forward(self, idx: int, gate: torch.nn.Module, original):
        """``TopKGate.forward`` for physical slots: the gate's own decision, recorded, mapped to slots."""
        num_slots = self.num_slots

        def forward(input, used_token=None, sparse_routes=False, use_tutel=False):
            if not sparse_routes:
                raise DeepSpeedEPLBError(
                    "the EPLB gate returns sparse routes only (what MOELayer asks for); this DeepSpeed "
                    "release's MOELayer called TopKGate without sparse_routes=True"
                )
            per_slot = self.capacity == "per_slot" and gate.drop_tokens
            if per_slot:  # every route of the gate, the capacity applied per slot below
                gate.drop_tokens = False
                try:
                    out = original(input, used_token, True, use_tutel)
                finally:
                    gate.drop_tokens = True
            else:
                out = original(input, used_token, True, use_tutel)
            l_aux, capacity, _, indices, locations, gates, exp_counts = out
            log2phy, count, local_slot, split = self._tables[idx]
            if split is not None:  # balanced: this batch's shares from every rank's kept routes
                every = all_gather_counts(
                    expert_counts(indices, self.num_experts), self.ep_group, self.ep_size
                )
                first = source_offset(every, self.ep_rank)
                slot, row = split_routes_to_slots(indices, locations, log2phy, first, split(every.sum(dim=0)))
            else:
                slot, row = routes_to_slots(
                    indices,
                    locations,
                    log2phy,
                    count,
                    offset=self.ep_rank,
                    local_slot=local_slot if self.replica_dispatch == "local_first" else None,
                )
            sent = slot_counts(slot, num_slots)
            if per_slot:
                capacity = _logical_capacity(gate, input.shape[0], self.num_experts, indices.shape[0])
                slot, row, gates = per_slot_capacity(slot, row, gates, capacity)
                sent = slot_counts(slot, num_slots)
            elif not gate.drop_tokens:
                # dropless: every rank's buffer holds its busiest slot's rows (replicas of the hottest
                # expert shrink it; without replicas it is the gate's own capacity)
                capacity = sent[1:].max().reshape(1)
                if self.ep_size > 1:
                    capacity = capacity.to(collective_device(self.ep_group))
                    dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
                capacity = capacity.reshape(())
            self._record(idx, exp_counts, slot, sent)
            return l_aux, capacity, num_slots, slot.to(torch.int32), row.to(torch.int32), gates, exp_counts

        return forward


def _logical_capacity(gate: torch.nn.Module, num_tokens: int, num_experts: int, k: int) -> int:
    """The capacity DeepSpeed's gate gives each logical expert for ``num_tokens`` tokens (its own formula)."""
    from deepspeed.moe.sharded_moe import _capacity

    factor = gate.capacity_factor if gate.training else gate.eval_capacity_factor
    factor = factor * k if k > 1 else factor
    shape_only = torch.empty((num_tokens, num_experts), device="meta")
    return int(_capacity(shape_only, torch.tensor(factor), torch.tensor(gate.min_capacity)))


def _grad_of(p: torch.nn.Parameter) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad
