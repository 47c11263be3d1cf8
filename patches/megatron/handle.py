"""Seam: the handle (:class:`MegatronEPLB`), the model side of EPLB for Megatron-core.

It satisfies :class:`megatron_eplb.protocols.ExpertModel`: shape facts, the EP group, per-slot tensors, the
recorded loads, the routing tables, replica gradient sums and logical state dicts.  It owns the state of
the patched layers (placement, routing tables on the device, load buffers: a
:class:`~megatron_eplb.load_recorder.LoadRecorder`) and wires each layer once
(:meth:`MegatronEPLB._convert_layer`): the experts module through its storage (``experts/``), the token
dispatcher through its adapter (``dispatchers.py``), the sharded state dict through ``dist_ckpt.py``.

A new expert class or dispatcher changes nothing here.  Shapes: ``L`` MoE layers, ``E`` logical experts,
``S`` slots per rank, ``P = S * EP`` physical slots per layer, ``C`` most copies of one expert.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_eplb.checkpoint import check_state_fits
from megatron_eplb.comm import all_gather_counts, collective_device
from megatron_eplb.errors import CheckpointError
from megatron_eplb.gradients import param_grad
from megatron_eplb.load_recorder import LoadRecorder
from megatron_eplb.pipeline import PipelineStage
from megatron_eplb.placement import ExpertMapError, ExpertPlacement
from megatron_eplb.replica_split import BalancedSplit, device_tables, replica_tables, source_offset
from megatron_eplb.slot_copies import all_gather_rows, gather_logical, recomputing, refill_slots
from megatron_eplb.slot_routing import count_pairs
from megatron_eplb.slots import SlotParam, SlotShape

from . import dist_ckpt, pipeline, tp
from .compat import EPLBPatchError, model_facts, param_device
from .dispatchers import SlotTables, rebuild_dispatcher, route_to_slots, slot_tables
from .experts import ExpertStorage, storage_for

__all__ = ["MegatronEPLB"]

logger = logging.getLogger(__name__)


class _LayerTables(NamedTuple):
    """The device tables one layer routes with (made by ``MegatronEPLB._routing_tables``)."""

    slots: SlotTables  # route_to_slots' tables (``local_first``: a slot of this rank holding the expert wins)
    direct: torch.Tensor | bool | None  # True: identity; int64 [P] phy2log: a permutation; None: replicas
    replicas: BalancedSplit | None  # ``balanced`` dispatch of a layer with replicas, else None


def check_placement(
    placement: ExpertPlacement, num_layers: int, num_experts: int, ep_size: int, slots_per_rank: int | None
) -> None:
    """Raise :class:`EPLBPatchError` unless ``placement`` fits the model (``slots_per_rank=None``: any ``S``)."""
    if not isinstance(placement, ExpertPlacement):
        raise EPLBPatchError(f"placement must be an ExpertPlacement, got {type(placement).__name__}")
    try:
        placement.validate(
            num_layers=num_layers, num_experts=num_experts, num_ranks=ep_size, slots_per_rank=slots_per_rank
        )
    except ExpertMapError as exc:
        raise EPLBPatchError(f"placement does not match the model: {exc}") from None


def check_same_placement_everywhere(placement: ExpertPlacement, group) -> None:
    """Raise when the ranks of ``group`` were given different placements (a stale map on one rank)."""
    if dist.get_world_size(group) == 1:
        return
    p = torch.from_numpy(placement.phy2log.astype(np.int64)).reshape(-1)
    weights = torch.arange(1, p.numel() + 1, dtype=torch.int64)
    digest = torch.stack(
        [(p * weights).sum(), (p * weights * weights % 1_000_003).sum(), torch.tensor(p.numel())]
    )
    digest = digest.to(collective_device(group))
    gathered = [torch.empty_like(digest) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, digest, group=group)
    bad = [r for r, d in enumerate(gathered) if not torch.equal(d, gathered[0])]
    if bad:
        raise EPLBPatchError(
            f"EP ranks {bad} were given another placement than EP rank 0; every rank needs the same"
        )


class MegatronEPLB(SlotShape):
    """Controls the placement-aware MoE layers of one model (returned by :func:`apply`); an
    :class:`~megatron_eplb.protocols.ExpertModel`.

    State (all of it): the current :attr:`placement`; per MoE layer its routing tables on the device
    (:class:`~.dispatchers.SlotTables`, the direct map, the balanced split) and its expert storage; the load
    buffers ``[L, E]`` and ``[L, S]``.  ``placement`` is the same on every rank of :attr:`ep_group`.

    Attributes:
        model: the patched model.
        layer_names: ``[L]`` module names of the MoE layers (``""`` for the model itself).
        ep_group: the expert-parallel process group; ``ep_size`` its ranks, ``ep_rank`` this rank.
        replica_dispatch: ``"even"``, ``"local_first"`` or ``"balanced"`` (per-batch shares from this
            batch's global counts: one all-gather of ``[E]`` counts over the EP group per layer and forward).
        num_layers: ``L``.  num_experts: ``E``.  slots_per_rank: ``S``.
        device: where the experts, the load buffers and the routing tables live.
        placement: the :class:`ExpertPlacement` the layers route with (``phy2log [L, P]``).
        recording: whether real forwards are counted into :meth:`loads` / :meth:`slot_loads`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: list[tuple[str, torch.nn.Module]],
        placement: ExpertPlacement,
        ep_group,
        replica_dispatch: str,
        stage: PipelineStage | None = None,
        split_align: int = 0,
    ) -> None:
        self.model = model
        #: With PP > 1: this stage's place among the model's MoE layers (global layer ids); else None.
        self.stage = stage
        self.layer_names = [name for name, _ in layers]
        self._layers = [layer for _, layer in layers]
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        self.replica_dispatch = replica_dispatch
        self.num_layers = len(layers)
        self.num_experts = int(self._layers[0].config.num_moe_experts)
        self.slots_per_rank = placement.slots_per_rank
        self.device = param_device(self._layers[0].experts)
        #: The balanced dispatch's cut points between copies are multiples of this (``eplb_split_align``).
        self.split_align = int(split_align) or (128 if self.device.type == "cuda" else 1)
        self.placement = placement
        # Per layer, the expert storage of its experts module (set when the layer is converted).
        self._storages: list[ExpertStorage] = [None] * self.num_layers
        # The load buffers (the per-forward counts: logical pairs routed, tokens per local slot).
        self._recorder = LoadRecorder(self.num_layers, self.num_experts, self.slots_per_rank, self.device)
        # The split's first positions at EP = 1: no pairs before this rank's (made once, read by every forward).
        self._no_pairs_before = torch.zeros(self.num_experts, dtype=torch.int64, device=self.device)
        #: Record loads (``loads()``, ``slot_loads()``) on real forwards; ``False`` pauses recording (e.g. for
        #: evaluation forwards that should not steer the placement).
        self.recording = True
        # Logical loads count each routed token once: with TP > 1 and no sequence parallelism (inference) the
        # TP ranks of an attention group route the same tokens, so only TP rank 0 counts them.
        self._counts_logical = tp.routes_own_tokens(self._layers[0])
        self._tables: list[_LayerTables] = [None] * self.num_layers
        #: Per-step replicas (``fast_replicas.install``), or None: they route every layer when set.
        self.fast = None
        for idx in range(self.num_layers):
            self._tables[idx] = self._routing_tables(placement.phy2log[idx])
        for idx, layer in enumerate(self._layers):
            self._convert_layer(idx, layer)
        logger.info(
            "megatron-eplb: %d MoE layers placement-aware (%r, %s dispatch, EP rank %d/%d)",
            self.num_layers,
            placement,
            replica_dispatch,
            self.ep_rank,
            self.ep_size,
        )

    # -------------------------------------------------------------- recording
    def loads(self) -> torch.Tensor:
        """int64 ``[L, E]``: (token, expert) pairs routed on this rank per MoE layer and logical expert
        since the last :meth:`reset_loads` (real forward passes only, padding tokens excluded).  The live
        buffer on the device, brought up to date by this call (the per-forward counts are folded in here,
        two small ops per layer and shape, no host sync); clone it to keep a snapshot."""
        return self._recorder.loads()

    def slot_loads(self) -> torch.Tensor:
        """int64 ``[L, S]``: tokens each local physical slot computed since the last :meth:`reset_loads`.

        The live buffer on the device, brought up to date by this call (the counts kept since the last call
        are summed in: a few ops for all layers together)."""
        return self._recorder.slot_loads()

    def reset_loads(self) -> None:
        """Zero both load buffers (in place, no host sync)."""
        self._recorder.reset()
        if self.fast is not None:
            self.fast.reset_loads()

    # ---------------------------------------------------------------- slots
    def slot_params(self, layer: int, slot: int) -> list[SlotParam]:
        """The tensors of local slot ``slot`` (``0 <= slot < S``) of MoE layer ``layer``, in a fixed order
        (:meth:`slot_param_names`): whole parameters (``SequentialMLP``) or blocks of stacked ones
        (``GroupedMLP``)."""
        return self._storage(layer, slot).slot_params(slot)

    def slot_param_names(self) -> list[str]:
        """Names of a slot's tensors within the slot, e.g. ``["linear_fc1.weight", "linear_fc2.weight"]``."""
        return self._storage(0, 0).slot_param_names()

    def slot_tensors(self, layer: int, slot: int) -> list[torch.Tensor]:
        """The data of local slot ``slot``'s tensors (views without autograd; writing them writes the slot)."""
        return [sp.data for sp in self.slot_params(layer, slot)]

    def write_slot(self, layer: int, slot: int, tensors: Sequence[torch.Tensor]) -> None:
        """Copy ``tensors`` (shapes as :meth:`slot_tensors`) into local slot ``slot``, parameters kept."""
        params = self.slot_params(layer, slot)
        if len(tensors) != len(params):
            raise EPLBPatchError(
                f"layer {layer} slot {slot}: {len(tensors)} tensors given, the slot has {len(params)}"
            )
        with torch.no_grad():
            for sp, t in zip(params, tensors):
                if tuple(t.shape) != sp.shape:
                    raise EPLBPatchError(
                        f"layer {layer} slot {slot}: tensor of shape {list(t.shape)} for {list(sp.shape)}"
                    )
                sp.data.copy_(t)

    # -------------------------------------------------------------- placement
    def set_placement(self, placement: ExpertPlacement, optimizer: Any = None) -> None:
        """Re-place every layer in place (collective over :attr:`ep_group`, synchronous).

        Each slot is filled from its logical expert (read from a current copy); parameters are kept, so
        optimizer references stay valid.  With ``optimizer`` (a plain torch optimizer, or any
        :class:`~megatron_eplb.protocols.OptimizerSlots`), each slot's optimizer state moves with its weights.
        """
        from megatron_eplb.optimizer_state import OptimizerSlotState

        check_placement(placement, self.num_layers, self.num_experts, self.ep_size, self.slots_per_rank)
        check_same_placement_everywhere(placement, self.ep_group)
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer = OptimizerSlotState(optimizer)
        refill_slots(self, placement.phy2log, optimizer)
        self.placement = placement
        self._tables = [self._routing_tables(placement.phy2log[i]) for i in range(self.num_layers)]

    def commit_layer(self, layer: int, phy2log_row: Sequence[int] | np.ndarray) -> None:
        """Switch MoE layer ``layer`` to ``phy2log_row`` (``[P]``) whose slot weights are already in place
        (written by a mover).  Local, no communication: every rank must commit the same row at the same step."""
        try:
            placement = self.placement.with_layer(layer, phy2log_row)
        except ExpertMapError as exc:
            raise EPLBPatchError(str(exc)) from None
        self._tables[layer] = self._routing_tables(placement.phy2log[layer], layer)
        self.placement = placement

    # --------------------------------------------------------------- training
    def sum_replica_grads(self) -> None:
        """Sum each expert's gradient over all its copies (collective over :attr:`ep_group`).

        Afterwards every copy holds the gradient of the logical expert (equal to the unreplicated model's),
        so the optimizer takes the identical step on every copy.  Uses ``param.main_grad`` where Megatron
        DDP keeps one, else ``param.grad``.  Layers without replicas are skipped.
        """
        for layer in range(self.num_layers):
            # Only experts with several copies need a sum, and only their rows travel: [R_e, n], not [E, n].
            replicated = np.nonzero(self.placement.replica_count[layer] > 1)[0]
            if len(replicated) == 0:
                continue
            row_of = np.full(self.num_experts, -1, dtype=np.int64)
            row_of[replicated] = np.arange(len(replicated))
            local = self.placement.phy2log[layer, self.local_slots()]
            mine = [k for k in range(self.slots_per_rank) if local[k] >= 0 and row_of[local[k]] >= 0]
            grads = {k: [_slot_grad(sp) for sp in self.slot_params(layer, k)] for k in mine}
            width = sum(sp.numel for sp in self.slot_params(layer, 0))
            like = _grad_dtype_device(self.slot_params(layer, 0)[0].param)
            acc = torch.float32 if like[0] in (torch.bfloat16, torch.float16) else like[0]  # one rounding
            total = torch.zeros(len(replicated), width, dtype=acc, device=like[1])
            for k in mine:
                total[row_of[local[k]]] += torch.cat([g.reshape(-1) for g in grads[k]]).to(acc)
            dist.all_reduce(total, group=self.ep_group)
            for k in mine:
                src = total[row_of[local[k]]]
                offset = 0
                for g in grads[k]:  # views into the parameters' gradients: written in place
                    g.copy_(src[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()

    # ------------------------------------------------------------- checkpoints
    def experts_prefix(self, layer: int) -> str:
        """The state-dict key prefix of MoE layer ``layer``'s experts module, e.g. ``"decoder.layers.1.mlp.experts."``."""
        name = self.layer_names[layer]
        return f"{name}.experts." if name else "experts."

    def logical_entries(
        self, layer: int, experts: Sequence[Sequence[torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The state-dict entries (model keys) of MoE layer ``layer``'s experts in the logical layout — those of
        the unpatched model without EP — from the ``E`` logical experts' tensors (``[E]`` lists in
        :meth:`slot_param_names` order; the same for any tensor shaped like the weights, e.g. Adam moments).
        ``SequentialMLP``: ``...experts.local_experts.{e}.{name}``; ``GroupedMLP``: ``...experts.weight1`` and
        ``weight2`` stacked over the ``E`` experts."""
        prefix = self.experts_prefix(layer)
        return {prefix + k: v for k, v in self._storages[layer].state_entries(experts).items()}

    def split_logical_entries(
        self, layer: int, state: Mapping[str, torch.Tensor]
    ) -> list[list[torch.Tensor]]:
        """The inverse of :meth:`logical_entries`: ``[E]`` lists of tensors from ``state`` (model keys).

        Raises:
            CheckpointError: ``state`` lacks an entry of the layer (names the key).
        """
        prefix = self.experts_prefix(layer)
        storage = self._storages[layer]
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            return storage.split_state_entries(own, self.num_experts)
        except KeyError as exc:
            raise CheckpointError(
                f"MoE layer {layer}: the state dict has no logical {storage.class_name} entry {prefix}"
                f"{exc.args[0]} for {self.num_experts} experts; it was saved for a model with other experts"
            ) from None

    def model_facts(self) -> dict[str, Any]:
        """The model's shape facts a checkpoint stores (:func:`.compat.model_facts`: ``hidden_size``,
        ``num_experts``, ...); a load into a model with other facts names them."""
        return model_facts(self.model, self.stage.total_layers if self.stage is not None else self.num_layers)

    def state_to_global(self, state: dict) -> dict:
        """``state`` keyed by this pipeline stage's names -> by the whole model's (PP = 1: unchanged)."""
        return state if self.stage is None else pipeline.state_to_global(self.model, state)

    def state_to_stage(self, state: dict) -> dict:
        """This pipeline stage's part of a whole-model ``state``, keyed by its names (PP = 1: unchanged)."""
        return state if self.stage is None else pipeline.state_to_stage(self.model, state)

    def logical_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict in the logical layout (collective over :attr:`ep_group`, and over the TP
        group with TP > 1): every logical expert once, keyed as the unpatched model without EP keys it
        (:meth:`logical_entries`); other keys are this rank's own, TP-sharded parameters joined over the TP
        group as the model without TP has them (:meth:`dense_to_logical`).  Save it with the expert map beside
        it (:func:`megatron_eplb.checkpoint.save_expert_map`).
        """
        state = tp.gather_dense_state(self.model, dict(self.model.state_dict()), self._expert_param_ids())
        for layer in range(self.num_layers):
            storage, prefix = self._storages[layer], self.experts_prefix(layer)
            for key in storage.state_keys(self.slots_per_rank):
                state.pop(prefix + key, None)
            logical = gather_logical(self, layer)
            experts = [[t.clone() for t in self._unflatten(logical[e])] for e in range(self.num_experts)]
            state.update(self.logical_entries(layer, experts))
            # Non-parameter entries of a slot (``_extra_state``) are the same for every expert.
            state.update({prefix + k: v for k, v in storage.extra_entries(self.num_experts).items()})
        return state

    def physical_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], phy2log: np.ndarray | None = None
    ) -> dict[str, torch.Tensor]:
        """This rank's model state dict made from a logical one (:meth:`logical_state_dict`, any placement or
        EP size): every local slot from its logical expert under ``phy2log`` (``[L, P]``, default the current
        placement); an empty slot keeps what it holds; TP-sharded dense parameters as this TP rank's part of
        the whole tensor (:meth:`dense_to_local`).  Local, no communication.

        Raises:
            CheckpointError: ``state_dict`` lacks an entry of an MoE layer's experts (names the key).
        """
        phy2log = self.placement.phy2log if phy2log is None else phy2log
        physical = tp.shard_dense_state(self.model, dict(state_dict), self._expert_param_ids())
        for layer in range(self.num_layers):
            storage, prefix = self._storages[layer], self.experts_prefix(layer)
            experts = self.split_logical_entries(layer, state_dict)
            for key in storage.state_keys(self.num_experts):
                physical.pop(prefix + key, None)
            row = phy2log[layer, self.local_slots()]
            like = experts[0][0]
            slots = [
                experts[int(e)] if e >= 0 else [t.to(like.device) for t in self.slot_tensors(layer, k)]
                for k, e in enumerate(row)
            ]
            physical.update({prefix + k: v for k, v in storage.state_entries(slots).items()})
            physical.update({prefix + k: v for k, v in storage.extra_entries(self.slots_per_rank).items()})
        return physical

    def load_logical_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
        """Load a logical state dict (:meth:`logical_state_dict`, any placement, EP or TP size) into this
        model: every slot is filled from its logical expert, every TP-sharded parameter from its part of the
        whole tensor, after every tensor is checked to fit (one :class:`~megatron_eplb.errors.CheckpointError`
        naming the key, nothing loaded).  Local, no communication.  Returns what ``Module.load_state_dict``
        returns."""
        physical = self.physical_state_dict(state_dict)
        check_state_fits(physical, self.model, source="the logical state dict")  # before anything is loaded
        return self.model.load_state_dict(physical, strict=strict)

    def dense_to_logical(self, p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """``local`` (shaped like non-expert parameter ``p`` on this rank: the weight or its optimizer state)
        as the model without TP has it (collective over the TP group when ``p`` is TP-sharded)."""
        return tp.gather_tp(p, local)

    def dense_to_local(self, p: torch.Tensor, logical: torch.Tensor) -> torch.Tensor:
        """This rank's part of a whole (:meth:`dense_to_logical`) tensor of non-expert parameter ``p``.  Local."""
        return tp.shard_tp(p, logical)

    def _expert_param_ids(self) -> set[int]:
        """``id`` of every parameter of the MoE layers' experts (never TP-sharded: expert TP = 1)."""
        return {id(p) for layer in self._layers for p in layer.experts.parameters()}

    # ============================================================ internals
    def _storage(self, layer: int, slot: int) -> ExpertStorage:
        """The storage of MoE layer ``layer`` (checking ``layer`` and the local slot ``slot``)."""
        if not 0 <= layer < self.num_layers:
            raise EPLBPatchError(f"layer {layer} out of range [0, {self.num_layers})")
        if not 0 <= slot < self.slots_per_rank:
            raise EPLBPatchError(f"slot {slot} out of range [0, {self.slots_per_rank}) (local slots)")
        return self._storages[layer]

    def _unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for t in self.slot_tensors(0, 0):
            out.append(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return out

    def _write_flat(self, layer: int, slot: int, flat: torch.Tensor) -> None:
        self.write_slot(layer, slot, self._unflatten(flat))

    def _routing_tables(self, row: np.ndarray, layer: int | None = None) -> _LayerTables:
        """Device tables of one layer: :func:`slot_tables` of its ``log2phy [E, C]``, ``replica_count [E]`` and,
        for the ``local_first`` dispatch, ``local_slot [E]`` (a slot of this rank holding the expert, else -1);
        the direct map: ``True`` when slot ``s`` holds expert ``s`` (the routing passes through unchanged), an
        int64 ``[P]`` ``phy2log`` row when every slot holds a distinct expert (a column gather), else ``None``
        (replicas or empty slots: :func:`route_to_slots`), and, for the ``balanced`` dispatch of a layer with
        replicas, its :class:`~megatron_eplb.replica_split.BalancedSplit` (``layer``'s previous one retargeted,
        when given)."""
        from megatron_eplb.placement import build_log2phy

        row = np.asarray(row, dtype=np.int64)
        log2phy, count = build_log2phy(row[None, :], self.num_experts)
        local_slot = None
        if self.replica_dispatch == "local_first":
            local_slot = np.full(self.num_experts, -1, dtype=np.int64)
            for slot in reversed(self.local_slots()):  # lowest local slot wins
                if row[slot] >= 0:
                    local_slot[row[slot]] = slot
            local_slot = torch.from_numpy(local_slot)
        copies = log2phy.shape[2]
        # Built on the host (which experts are spread: no host sync in the forward), then moved at once.
        parts = list(
            slot_tables(
                torch.from_numpy(log2phy[0]),
                torch.from_numpy(np.maximum(count[0], 1)),
                local_slot,
                num_slots=self.num_slots,
            )
        )
        permutation = row.shape[0] == self.num_experts and np.array_equal(
            np.sort(row), np.arange(self.num_experts)
        )
        identity = permutation and np.array_equal(row, np.arange(self.num_experts))
        if permutation and not identity:
            parts.append(torch.from_numpy(row))
        parts = device_tables(parts, self.device)
        direct = True if identity else parts[-1] if permutation else None
        replicas = None
        if self.replica_dispatch == "balanced" and copies > 1:
            tables = replica_tables(row, self.ep_size, self.num_experts, self.device)
            old = self._tables[layer].replicas if layer is not None else None
            replicas = BalancedSplit(tables, align=self.split_align) if old is None else old.retarget(tables)
        slots = SlotTables(*parts[:4], parts[4].to(torch.int32))  # the routing table: int32 (one cast)
        return _LayerTables(slots, direct, replicas)

    def _convert_layer(self, idx: int, layer: torch.nn.Module) -> None:
        """Rebuild the experts for S slots (filled from the logical experts) and the dispatcher for P."""
        old = storage_for(layer.experts)
        # [E, n]: Megatron puts expert r*E/N+k on rank r
        logical = all_gather_rows(old.flat_rows(), self.ep_group)
        if logical.shape[0] != self.num_experts:
            raise EPLBPatchError(
                f"layer {idx}: gathered {logical.shape[0]} experts, expected {self.num_experts}"
            )
        storage = type(old).build(layer, self.slots_per_rank)
        self._storages[idx] = storage
        layer.experts = new = storage.experts
        row = self.placement.phy2log[idx]
        for k, slot in enumerate(self.local_slots()):
            if row[slot] >= 0:
                self._write_flat(idx, k, logical[int(row[slot])])
        layer.token_dispatcher = rebuild_dispatcher(layer, self.num_slots, self.slots_per_rank, self.ep_rank)
        layer.num_local_experts = self.slots_per_rank
        layer.local_expert_indices = list(self.local_slots())
        original_route = layer.route

        def route(hidden_states, padding_mask=None, _idx=idx, _route=original_route):
            probs, routing_map = _route(hidden_states, padding_mask)
            return self._route_physical(_idx, probs, routing_map, padding_mask)

        layer.route = route
        new.forward = self._make_slot_counting_forward(idx, new.forward)
        dist_ckpt.install(self, idx, storage)

    def _make_slot_counting_forward(self, idx: int, experts_forward):
        """The experts' ``forward(hidden, tokens_per_slot, probs)``, keeping ``tokens_per_slot`` for
        :meth:`slot_loads` first.  A wrapper rather than a forward pre-hook: a module without hooks takes
        ``Module.__call__``'s fast path."""

        def forward(*args, **kwargs):
            if self.recording and not recomputing():
                counts = args[1] if len(args) > 1 else kwargs["tokens_per_expert"]
                self._recorder.keep_slot_counts(idx, counts)
            return experts_forward(*args, **kwargs)

        return forward

    def _route_physical(
        self, idx: int, probs: torch.Tensor, routing_map: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Record logical loads; map ``[T, E]`` probs / routing map to ``[T, P]`` physical slots."""
        slots, direct, replicas = self._tables[idx]
        record = self.recording and self._counts_logical and not recomputing()
        if record and (padding_mask is not None or replicas is None or self.fast is not None):
            routed = routing_map
            if padding_mask is not None:  # Megatron's router: True marks padding
                routed = routing_map & ~padding_mask.reshape(-1, 1).to(routing_map.device)
            self._recorder.count_routed(idx, routed)
            record = False
        if self.fast is not None:  # per-step replicas: this step's copies and split (fast_replicas.py)
            return self.fast.route(idx, probs, routing_map)
        if direct is True:  # slot s holds expert s: physical routing is the logical routing
            return probs, routing_map
        if direct is not None:  # one copy of each expert: a column gather (phys[:, s] = log[:, phy2log[s]])
            return probs.index_select(1, direct), routing_map.index_select(1, direct)
        if replicas is None:
            return route_to_slots(probs, routing_map, slots, self.num_slots, offset=self.ep_rank)
        # The balanced dispatch: the batch's pairs counted once (recorded in the same kernel), then the split.
        counted = count_pairs(
            routing_map, slots, self.num_slots, record=self._recorder.count_into(idx) if record else None
        )
        split = self._batch_split(counted.counts, replicas)
        return route_to_slots(probs, routing_map, slots, self.num_slots, split=split, counted=counted)

    def _batch_split(self, counts: torch.Tensor, split: BalancedSplit) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's split of the replicated experts (``balanced`` dispatch) from this rank's int64 ``[E]`` pair
        counts: those of every EP rank (one all-gather on the device, no host sync), the shares from their sums,
        and this rank's ``(first [E], bounds [E, C-1])`` for :func:`route_to_slots`.  Every rank computes the
        same."""
        if self.ep_size == 1:
            return self._no_pairs_before, split(counts)
        every = all_gather_counts(counts, self.ep_group, self.ep_size)  # [EP, E]
        return source_offset(every, self.ep_rank), split(every.sum(dim=0))


def _slot_grad(sp: SlotParam) -> torch.Tensor:
    """The slot's part of its parameter's gradient (``main_grad`` where Megatron DDP keeps one, else
    ``grad``, created as zeros where missing): a view, writing it writes the gradient."""
    p = sp.param
    g = getattr(p, "main_grad", None)
    if g is None:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = p.grad
    return sp.of(g)


def _grad_dtype_device(p: torch.nn.Parameter) -> tuple[torch.dtype, torch.device]:
    g = param_grad(p)
    return (p.dtype, p.device) if g is None else (g.dtype, g.device)
