"""Placement-aware Megatron-core MoE layers, and CPU/gloo support for Megatron-core MoE.

Usage::

    from megatron_eplb.patches import megatron as eplb_mcore

    eplb_mcore.enable_cpu()                      # no-op where CUDA is available
    handle = eplb_mcore.apply(model, placement)  # after parallel_state is initialised, before the optimizer
    ...
    loss.backward()
    handle.sum_replica_grads()                   # copies of one expert take the same update
    optimizer.step()
    handle.loads()                               # [L, E] tokens routed per logical expert on this rank

What :func:`apply` changes in each ``MoELayer`` (MoE layer ids ``l`` count MoE layers only, in module order):

* the router stays logical (weight ``[E, H]``, aux losses, capacity, expert bias untouched);
* ``MoELayer.route`` is wrapped: it records the routed (token, expert) pairs (padding tokens excluded,
  activation-recompute re-runs skipped) into an int64 ``[L, E]`` buffer, then maps the logical
  ``[T, E]`` routing map and probabilities to the ``[T, P]`` physical slots: the pairs of an expert are
  split round-robin over its copies (``even``), or go to a copy on this rank when there is one
  (``local_first``);
* the token dispatcher is rebuilt for ``P`` "experts" with ``S = P / EP`` local ones, and the experts
  module (``SequentialMLP``) for ``S`` local slots whose weights are filled from their logical experts;
* a forward pre-hook on the experts module counts the tokens each local slot computes (``[L, S]``);
* the experts module's ``sharded_state_dict`` (Megatron dist checkpointing) gives the logical layout: each
  logical expert once, keyed and offset as the unpatched model keys it (the first copy is the saved main
  replica, copies on other ranks load it too); a load-state-dict pre-hook fills a second copy on one rank.
  So checkpoints load across placements, EP sizes and the unpatched model.

Supported: megatron-core 0.16–0.19, ``SequentialMLP`` experts, ``allgather`` and ``alltoall`` dispatchers,
expert-TP = 1, PP = 1, dropless or capacity-dropping routers without padding to capacity.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_eplb.checkpoint import logical_to_physical, physical_to_logical
from megatron_eplb.comm import collective_device
from megatron_eplb.config import EPLBConfig
from megatron_eplb.placement import ExpertMapError, ExpertPlacement

__all__ = [
    "EPLBPatchError",
    "MegatronEPLB",
    "SUPPORTED_DISPATCHERS",
    "SUPPORTED_MCORE_VERSIONS",
    "apply",
    "enable_cpu",
    "ensure_compat",
    "find_moe_layers",
    "mcore_version",
]

logger = logging.getLogger(__name__)

SUPPORTED_MCORE_VERSIONS = ((0, 16), (0, 19))  # inclusive range of (major, minor)
SUPPORTED_DISPATCHERS = ("allgather", "alltoall")
REPLICA_DISPATCH = ("even", "local_first")


# Routed-map accumulators kept per MoE layer (distinct token counts ``T``); see ``MegatronEPLB._route_acc``.
_MAX_ACC_SHAPES = 4
_MAX_PENDING_SLOT_COUNTS = 256  # per layer, slot counts kept between two reads before they are summed


class EPLBPatchError(ValueError):
    """The model, its configuration or a placement cannot be used by the Megatron-core patch."""


# ============================================================================ version adapter
# Everything that differs between megatron-core releases lives in this section.


def mcore_version() -> tuple[int, int, int]:
    """The installed megatron-core version as ``(major, minor, patch)``."""
    from megatron.core import package_info

    return (int(package_info.MAJOR), int(package_info.MINOR), int(str(package_info.PATCH).split("rc")[0]))


def _check_mcore_version() -> None:
    version = mcore_version()
    low, high = SUPPORTED_MCORE_VERSIONS
    if not low <= version[:2] <= high:
        raise EPLBPatchError(
            f"megatron-core {'.'.join(map(str, version))} is not supported; supported: "
            f"{low[0]}.{low[1]} to {high[0]}.{high[1]}"
        )


def _expert_classes() -> dict[str, type]:
    """Expert module classes by name (those this release has)."""
    from megatron.core.transformer.moe import experts

    return {
        name: getattr(experts, name)
        for name in ("SequentialMLP", "GroupedMLP", "TEGroupedMLP")
        if hasattr(experts, name)
    }


def _check_experts(experts: torch.nn.Module, where: str) -> None:
    classes = _expert_classes()
    if isinstance(experts, classes["SequentialMLP"]):
        return
    name = type(experts).__name__
    hint = ""
    if name in ("GroupedMLP", "TEGroupedMLP"):
        hint = " (build the model with moe_grouped_gemm=False to get SequentialMLP)"
    raise EPLBPatchError(f"{where}: expert class {name} is not supported; supported: SequentialMLP{hint}")


def _process_groups(**groups: Any):
    """A ``ProcessGroupCollection`` holding ``groups`` (its fields are set after construction)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgc = ProcessGroupCollection()
    for name, group in groups.items():
        setattr(pgc, name, group)
    return pgc


def _build_experts(layer: torch.nn.Module, num_local: int) -> torch.nn.Module:
    """A new experts module of ``layer``'s class with ``num_local`` local experts (weights uninitialised)."""
    from megatron.core.transformer.spec_utils import build_module

    old = layer.experts
    pgc = _process_groups(ep=old.ep_group, expt_tp=old.tp_group, expt_dp=old.dp_group)
    config = layer.config
    saved = config.perform_initialization
    config.perform_initialization = False  # every slot is filled from its logical expert right after
    spec = layer.submodules.experts
    try:
        if isinstance(spec, functools.partial):  # 0.18+: a builder, called like the class
            new = spec(num_local, config, pg_collection=pgc)
        else:
            new = build_module(spec, num_local, config, pg_collection=pgc)
    finally:
        config.perform_initialization = saved
    return new.to(device=_param_device(old))


def _build_dispatcher(layer: torch.nn.Module, num_slots: int, num_local: int, ep_rank: int):
    """A new token dispatcher of ``layer``'s kind for ``num_slots`` physical "experts", ``num_local`` local."""
    import copy

    old = layer.token_dispatcher
    config = copy.copy(layer.config)  # the dispatcher reads num_moe_experts from its config
    config.num_moe_experts = num_slots
    pgc = _process_groups(ep=old.ep_group, expt_tp=old.tp_group, tp_ep=old.tp_ep_group)
    local = list(range(ep_rank * num_local, (ep_rank + 1) * num_local))
    new = type(old)(num_local, local, config=config, pg_collection=pgc)
    if getattr(old, "shared_experts", None) is not None:
        new.set_shared_experts(old.shared_experts)
    return new


def _dispatcher_kind(layer: torch.nn.Module) -> str:
    from megatron.core.transformer.moe.token_dispatcher import (
        MoEAllGatherTokenDispatcher,
        MoEAlltoAllTokenDispatcher,
    )

    d = layer.token_dispatcher
    if type(d) is MoEAllGatherTokenDispatcher:
        return "allgather"
    if type(d) is MoEAlltoAllTokenDispatcher:
        return "alltoall"
    return type(d).__name__


# ============================================================================ CPU support

_CPU_LOCK = threading.Lock()
_CPU_FIXES: list[str] = []


def enable_cpu() -> list[str]:
    """Let Megatron-core MoE layers run forward and backward on CPU with gloo.

    A no-op where CUDA is available.  Idempotent: a second call changes nothing and returns the same list.
    The fixes (each logged once):

    * ``torch.cuda.current_device`` returns ``"cpu"`` (Megatron allocates on it; ``Router.gating`` then
      leaves the router weight on CPU instead of moving it to CUDA);
    * ``torch.cuda.synchronize`` does nothing (Megatron's dist-checkpoint writer calls it before saving);
    * :func:`ensure_compat` (on any device);
    * the model-parallel RNG tracker (``model_parallel_cuda_manual_seed``, ``get_cuda_rng_tracker().fork``)
      keeps CPU generator states;
    * the alltoall dispatcher gets no CUDA side stream and passes its split sizes as Python lists.

    Returns:
        the names of the fixes in effect.
    """
    ensure_compat()
    with _CPU_LOCK:
        if torch.cuda.is_available():
            logger.info("enable_cpu: CUDA is available, nothing to do")
            return []
        if _CPU_FIXES:
            return list(_CPU_FIXES)
        fixes = [
            _fix_current_device(),
            _fix_synchronize(),
            _fix_rng_tracker(),
            _fix_alltoall(),
        ]
        _CPU_FIXES.extend(f for f in fixes if f)
        for fix in _CPU_FIXES:
            logger.info("enable_cpu: %s", fix)
        return list(_CPU_FIXES)


def _fix_current_device() -> str:
    torch.cuda.current_device = lambda: "cpu"
    return "torch.cuda.current_device() -> 'cpu'"


def _fix_synchronize() -> str:
    torch.cuda.synchronize = lambda device=None: None
    return "torch.cuda.synchronize() is a no-op (dist-checkpoint writers call it)"


def ensure_compat() -> list[str]:
    """Version fixes Megatron-core needs on any device; idempotent, called by :func:`apply`,
    :func:`enable_cpu` and ``patches.deepspeed.initialize`` (call it yourself for a model without EPLB).

    * ``moe_utils.te_general_gemm = None`` where Transformer Engine is absent: megatron-core 0.16 reads
      the name in the MoE forward without importing it (``NameError`` on CPU and on GPU alike).

    Returns:
        the fixes applied by this call (empty when nothing was needed).
    """
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return []
    moe_utils.te_general_gemm = None
    fix = "megatron.core.transformer.moe.moe_utils.te_general_gemm = None (no Transformer Engine)"
    logger.info("megatron-eplb: %s", fix)
    return [fix]


def _fix_rng_tracker() -> str:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    tracker = mrandom.CudaRNGStatesTracker
    original_add = tracker.add

    def add(self, name: str, seed: int) -> None:
        # The original seeds and reads the CUDA generator; on CPU it reads/seeds the CPU one instead
        # (and restores it through the patched ``_set_cuda_rng_state``).
        real_get, real_seed = torch.cuda.get_rng_state, torch.cuda.manual_seed
        torch.cuda.get_rng_state, torch.cuda.manual_seed = torch.get_rng_state, torch.manual_seed
        try:
            original_add(self, name, seed)
        finally:
            torch.cuda.get_rng_state, torch.cuda.manual_seed = real_get, real_seed

    tracker.add = add
    return "Megatron's CUDA RNG tracker keeps CPU generator states"


def _fix_alltoall() -> str:
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    if MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None:
        MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NoStream()

    def dtoh_on_cpu(self, point: str, tokens_per_expert: torch.Tensor | None = None):
        # No device-to-host copy exists on CPU; gloo's all_to_all_single wants split sizes as lists.
        if point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, name, None)
                if torch.is_tensor(value) or isinstance(value, np.ndarray):
                    setattr(self, name, [int(v) for v in value.tolist()])
        return tokens_per_expert

    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = dtoh_on_cpu
    return "MoEAlltoAllTokenDispatcher: no CUDA side stream, split sizes as lists"


class _NoStream:
    """Stands in for the alltoall dispatcher's CUDA side stream on CPU."""


# ============================================================================ apply


def find_moe_layers(model: torch.nn.Module | Sequence[torch.nn.Module]) -> list[tuple[str, torch.nn.Module]]:
    """``(name, MoELayer)`` of every MoE layer in module order: the MoE layer ids ``0..L-1``."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    modules = [model] if isinstance(model, torch.nn.Module) else list(model)
    return [(name, m) for chunk in modules for name, m in chunk.named_modules() if isinstance(m, MoELayer)]


def apply(
    model: torch.nn.Module,
    placement: ExpertPlacement | None = None,
    config: EPLBConfig | None = None,
    *,
    replica_dispatch: str | None = None,
) -> MegatronEPLB:
    """Make every MoE layer of ``model`` placement-aware; return the handle that controls them.

    Collective over the expert-parallel group (gathers the logical experts to fill the slots).  Call it
    after ``parallel_state`` is initialised and before building the optimizer: the experts' parameters
    are re-created once here (never again afterwards).

    Args:
        model: a Megatron-core module holding ``MoELayer`` s (e.g. ``GPTModel``).
        placement: the placement to start from; ``None``: from ``config.expert_map_path``, else the
            default layout with ``config.init_redundancy_expert`` redundant slots (0 without config).
        config: optional :class:`EPLBConfig` (``expert_map_path``, ``init_redundancy_expert``,
            ``eplb_replica_dispatch``).
        replica_dispatch: ``"even"`` or ``"local_first"``; overrides ``config.eplb_replica_dispatch``.
    Raises:
        EPLBPatchError: no MoE layer, unsupported class/dispatcher/parallel layout/version, or a placement
            that does not match the model.  Nothing is changed when it raises.
    """
    _check_mcore_version()
    ensure_compat()
    if getattr(model, "_megatron_eplb_handle", None) is not None:
        raise EPLBPatchError(
            "apply() was already called on this model; use handle.set_placement() to re-place"
        )
    layers = find_moe_layers(model)
    if not layers:
        raise EPLBPatchError(f"{type(model).__name__} has no Megatron-core MoELayer; nothing to balance")
    _check_layers(layers)
    first = layers[0][1]
    ep_group = first.experts.ep_group
    ep_size = dist.get_world_size(ep_group)
    _check_device(first, ep_group)
    num_experts = first.config.num_moe_experts
    dispatch = replica_dispatch or (config.eplb_replica_dispatch if config is not None else "even")
    if dispatch not in REPLICA_DISPATCH:
        raise EPLBPatchError(f"replica_dispatch={dispatch!r}; supported: {', '.join(REPLICA_DISPATCH)}")
    if placement is None:
        placement = _placement_from_config(config, len(layers), num_experts, ep_size)
    _check_placement(placement, len(layers), num_experts, ep_size, None)
    _check_same_placement_everywhere(placement, ep_group)
    handle = MegatronEPLB(model, layers, placement, ep_group, dispatch)
    model._megatron_eplb_handle = handle
    return handle


def _check_layers(layers: list[tuple[str, torch.nn.Module]]) -> None:
    from megatron.core import parallel_state

    first = layers[0][1]
    for name, layer in layers:
        where = f"MoE layer {name!r}"
        _check_experts(layer.experts, where)
        kind = _dispatcher_kind(layer)
        if kind not in SUPPORTED_DISPATCHERS:
            raise EPLBPatchError(
                f"{where}: token dispatcher {kind} is not supported; supported: {', '.join(SUPPORTED_DISPATCHERS)}"
            )
        cfg = layer.config
        if dist.get_world_size(layer.experts.tp_group) > 1:
            raise EPLBPatchError(f"{where}: expert tensor parallel size > 1 is not supported; supported: 1")
        if getattr(cfg, "moe_pad_expert_input_to_capacity", False):
            raise EPLBPatchError(
                f"{where}: moe_pad_expert_input_to_capacity=True is not supported (capacity would be per "
                "physical slot); supported: dropless routing or moe_expert_capacity_factor without padding"
            )
        if getattr(cfg, "moe_router_padding_for_quantization", False):
            raise EPLBPatchError(f"{where}: moe_router_padding_for_quantization=True is not supported")
        if getattr(cfg, "moe_latent_size", None):
            raise EPLBPatchError(f"{where}: moe_latent_size is not supported")
        if cfg.num_moe_experts != first.config.num_moe_experts:
            raise EPLBPatchError(
                f"{where}: {cfg.num_moe_experts} experts, but the first MoE layer has {first.config.num_moe_experts}; "
                "every MoE layer needs the same expert count"
            )
        if layer.experts.ep_group is not first.experts.ep_group:
            raise EPLBPatchError(f"{where}: uses another expert-parallel group than the first MoE layer")
    if (
        parallel_state.model_parallel_is_initialized()
        and parallel_state.get_pipeline_model_parallel_world_size() > 1
    ):
        raise EPLBPatchError("pipeline parallel size > 1 is not supported; supported: 1")


def _check_device(layer: torch.nn.Module, ep_group) -> None:
    """The experts must live where the EP group's collectives run (``apply`` gathers them over it)."""
    have, need = _param_device(layer.experts), collective_device(ep_group)
    if have.type != need.type:
        raise EPLBPatchError(
            f"the experts are on {have} but the expert-parallel group ({dist.get_backend(ep_group)}) "
            f"communicates on {need}: move the model first (model.to({str(need)!r})), then call apply()"
        )


def _placement_from_config(
    config: EPLBConfig | None, num_layers: int, num_experts: int, ep_size: int
) -> ExpertPlacement:
    try:
        if config is not None and config.expert_map_path is not None:
            return ExpertPlacement.from_json(config.expert_map_path, allow_same_rank_copies=True)
        redundant = config.init_redundancy_expert if config is not None else 0
        return ExpertPlacement.default(num_layers, num_experts, ep_size, redundant)
    except ExpertMapError as exc:
        raise EPLBPatchError(f"cannot build the start placement: {exc}") from None


def _check_placement(
    placement: ExpertPlacement, num_layers: int, num_experts: int, ep_size: int, slots_per_rank: int | None
) -> None:
    if not isinstance(placement, ExpertPlacement):
        raise EPLBPatchError(f"placement must be an ExpertPlacement, got {type(placement).__name__}")
    try:
        placement.validate(
            num_layers=num_layers, num_experts=num_experts, num_ranks=ep_size, slots_per_rank=slots_per_rank
        )
    except ExpertMapError as exc:
        raise EPLBPatchError(f"placement does not match the model: {exc}") from None


def _check_same_placement_everywhere(placement: ExpertPlacement, group) -> None:
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


# ============================================================================ the handle


class MegatronEPLB:
    """Controls the placement-aware MoE layers of one model (returned by :func:`apply`).

    State (all of it): the current :attr:`placement`; per MoE layer its routing tables on the device
    (``log2phy [E, C]``, ``replica_count [E]``, ``local_slot [E]``); the load buffers ``[L, E]`` and
    ``[L, S]``.  ``placement`` is the same on every rank of :attr:`ep_group`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: list[tuple[str, torch.nn.Module]],
        placement: ExpertPlacement,
        ep_group,
        replica_dispatch: str,
    ) -> None:
        self.model = model
        self.layer_names = [name for name, _ in layers]
        self._layers = [layer for _, layer in layers]
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        self.replica_dispatch = replica_dispatch
        self.num_layers = len(layers)
        self.num_experts = int(self._layers[0].config.num_moe_experts)
        self.slots_per_rank = placement.slots_per_rank
        self.device = _param_device(self._layers[0].experts)
        self.placement = placement
        self._loads = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64, device=self.device)
        self._slot_loads = torch.zeros(
            self.num_layers, self.slots_per_rank, dtype=torch.int64, device=self.device
        )
        #: Record loads (``loads()``, ``slot_loads()``) on real forwards; ``False`` pauses recording (e.g. for
        #: evaluation forwards that should not steer the placement).
        self.recording = True
        # Per layer, the per-slot token counts exactly as the dispatcher hands them to the experts (a host
        # tensor for the alltoall and allgather dispatchers): a forward only keeps a reference (a list
        # append, no op); ``slot_loads()`` sums them all at once.  In the middle of the host-bound MoE
        # forward even one small op costs tens of µs.
        self._slot_counts_pending: list[list] = [[] for _ in range(self.num_layers)]
        # Per-layer row views, made once: the per-forward adds go straight into them (no indexing or
        # ``__setitem__`` on the hot path).  The buffers are only ever zeroed in place, so the views stay live.
        self._loads_rows = list(self._loads.unbind(0))
        self._slot_loads_rows = list(self._slot_loads.unbind(0))
        # Per layer, int32 accumulators of the routed map, keyed by its shape ``[T, E]``: each forward adds its
        # bool map with ONE elementwise op (``acc += routed``); the column sums are taken on read (``loads()``).
        # One op instead of four (cast, memset, column sum, add) is what makes the recording cheap: the MoE
        # forward is host-bound, and every op launched is host time on its critical path.  The accumulators
        # are never replaced (graph-safe), at most ``_MAX_ACC_SHAPES`` per layer; other shapes are counted
        # with the direct column sum.
        self._route_acc: list[dict[torch.Size, torch.Tensor]] = [{} for _ in range(self.num_layers)]
        self._tables: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | bool | None]] = [
            None
        ] * self.num_layers
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

    # ------------------------------------------------------------------ shape
    @property
    def num_slots(self) -> int:
        """``P``: physical slots per layer over the EP group."""
        return self.slots_per_rank * self.ep_size

    def moe_layers(self) -> list[torch.nn.Module]:
        """The patched ``MoELayer`` modules, index = MoE layer id."""
        return list(self._layers)

    def local_slots(self) -> range:
        """Global slot ids of this rank's local slots."""
        return range(self.ep_rank * self.slots_per_rank, (self.ep_rank + 1) * self.slots_per_rank)

    # -------------------------------------------------------------- recording
    def loads(self) -> torch.Tensor:
        """int64 ``[L, E]``: (token, expert) pairs routed on this rank per MoE layer and logical expert
        since the last :meth:`reset_loads` (real forward passes only, padding tokens excluded).  The live
        buffer on the device, brought up to date by this call (the per-forward counts are folded in here,
        two small ops per layer and shape, no host sync); clone it to keep a snapshot."""
        for row, accs in zip(self._loads_rows, self._route_acc):
            for acc in accs.values():
                row.add_(acc.sum(dim=0, dtype=torch.int64))
                acc.zero_()
        return self._loads

    def slot_loads(self) -> torch.Tensor:
        """int64 ``[L, S]``: tokens each local physical slot computed since the last :meth:`reset_loads`.

        The live buffer on the device, brought up to date by this call (the counts kept since the last call
        are summed in: a few ops for all layers together)."""
        self._fold_slot_counts()
        return self._slot_loads

    def _fold_slot_counts(self) -> None:
        """Add the kept per-forward slot counts into ``_slot_loads`` and drop them: per device they came on,
        one stack ``[N, S]``, one ``index_add_`` into an ``[L, S]`` table, one copy to the device."""
        by_device: dict[torch.device, tuple[list[int], list[torch.Tensor]]] = {}
        for idx, pending in enumerate(self._slot_counts_pending):
            for counts in pending:
                counts = torch.as_tensor(counts)
                layers, rows = by_device.setdefault(counts.device, ([], []))
                layers.append(idx)
                rows.append(counts.reshape(-1))
            pending.clear()
        for device, (layers, rows) in by_device.items():
            table = torch.zeros(self.num_layers, self.slots_per_rank, dtype=torch.int64, device=device)
            table.index_add_(0, torch.tensor(layers, device=device), torch.stack(rows).to(torch.int64))
            self._slot_loads.add_(table.to(self.device))

    def reset_loads(self) -> None:
        """Zero both load buffers (in place, no host sync)."""
        self._loads.zero_()
        for accs in self._route_acc:
            for acc in accs.values():
                acc.zero_()
        self._slot_loads.zero_()
        for pending in self._slot_counts_pending:
            pending.clear()

    # ---------------------------------------------------------------- slots
    def slot_params(self, layer: int, slot: int) -> list[torch.nn.Parameter]:
        """The parameters of local slot ``slot`` (``0 <= slot < S``) of MoE layer ``layer``, in a fixed
        order (:meth:`slot_param_names`)."""
        return list(self._slot_module(layer, slot).parameters())

    def slot_param_names(self) -> list[str]:
        """Names of a slot's parameters within the slot, e.g. ``["linear_fc1.weight", "linear_fc2.weight"]``."""
        return [name for name, _ in self._slot_module(0, 0).named_parameters()]

    def slot_tensors(self, layer: int, slot: int) -> list[torch.Tensor]:
        """The data of local slot ``slot``'s parameters (views without autograd; writing them writes the slot)."""
        return [p.detach() for p in self.slot_params(layer, slot)]

    def write_slot(self, layer: int, slot: int, tensors: Sequence[torch.Tensor]) -> None:
        """Copy ``tensors`` (shapes as :meth:`slot_tensors`) into local slot ``slot``, parameters kept."""
        params = self.slot_params(layer, slot)
        if len(tensors) != len(params):
            raise EPLBPatchError(
                f"layer {layer} slot {slot}: {len(tensors)} tensors given, the slot has {len(params)}"
            )
        with torch.no_grad():
            for p, t in zip(params, tensors):
                if t.shape != p.shape:
                    raise EPLBPatchError(
                        f"layer {layer} slot {slot}: tensor of shape {list(t.shape)} for {list(p.shape)}"
                    )
                p.copy_(t)

    # -------------------------------------------------------------- placement
    def set_placement(
        self, placement: ExpertPlacement, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Re-place every layer in place (collective over :attr:`ep_group`, synchronous).

        Each slot is filled from its logical expert (read from a current copy); parameters are kept, so
        optimizer references stay valid.  With ``optimizer`` (a plain torch optimizer keeping per-parameter
        state, e.g. Adam), each slot's optimizer state tensors move with its weights.
        """
        _check_placement(placement, self.num_layers, self.num_experts, self.ep_size, self.slots_per_rank)
        _check_same_placement_everywhere(placement, self.ep_group)
        for layer in range(self.num_layers):
            row = placement.phy2log[layer]
            if np.array_equal(row, self.placement.phy2log[layer]):
                continue
            getters = [self.slot_tensors]
            if optimizer is not None and self.slot_optimizer_state(optimizer, layer, 0):
                getters.append(lambda lyr, k: self.slot_optimizer_state(optimizer, lyr, k))
            for get in getters:
                logical = self._gather_logical(layer, get)
                for k, slot in enumerate(self.local_slots()):
                    if row[slot] >= 0:
                        _unflatten_into(get(layer, k), logical[int(row[slot])])
        self.placement = placement
        self._tables = [self._routing_tables(placement.phy2log[i]) for i in range(self.num_layers)]

    def slot_optimizer_state(
        self, optimizer: torch.optim.Optimizer, layer: int, slot: int
    ) -> list[torch.Tensor]:
        """The per-parameter optimizer state tensors of local slot ``slot`` (params in :meth:`slot_params`
        order, state keys sorted; e.g. Adam's ``exp_avg``, ``exp_avg_sq``, ``step``).  Empty before the
        first step.  Writing them writes the optimizer state."""
        out = []
        for p in self.slot_params(layer, slot):
            state = optimizer.state.get(p, {})
            out.extend(state[key] for key in sorted(state) if torch.is_tensor(state[key]))
        return out

    def commit_layer(self, layer: int, phy2log_row: Sequence[int] | np.ndarray) -> None:
        """Switch MoE layer ``layer`` to ``phy2log_row`` (``[P]``) whose slot weights are already in place
        (written by a mover).  Local, no communication: every rank must commit the same row at the same step."""
        if not 0 <= layer < self.num_layers:
            raise EPLBPatchError(f"layer {layer} out of range [0, {self.num_layers})")
        row = np.asarray(phy2log_row, dtype=np.int64).reshape(-1)
        if row.shape[0] != self.num_slots:
            raise EPLBPatchError(
                f"layer {layer}: phy2log row has {row.shape[0]} slots, the model has {self.num_slots}"
            )
        phy2log = self.placement.phy2log.copy()
        phy2log[layer] = row
        try:
            placement = ExpertPlacement(
                phy2log,
                self.ep_size,
                self.num_experts,
                expert_load=self.placement.expert_load,
                allow_same_rank_copies=self.placement.allow_same_rank_copies,
            )
        except ExpertMapError as exc:
            raise EPLBPatchError(f"layer {layer}: {exc}") from None
        self._tables[layer] = self._routing_tables(row)
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
            grads = {k: [_grad_of(p) for p in self.slot_params(layer, k)] for k in mine}
            width = sum(p.numel() for p in self.slot_params(layer, 0))
            like = _grad_of(self.slot_params(layer, 0)[0])
            acc = (
                torch.float32 if like.dtype in (torch.bfloat16, torch.float16) else like.dtype
            )  # one rounding
            total = torch.zeros(len(replicated), width, dtype=acc, device=like.device)
            for k in mine:
                total[row_of[local[k]]] += torch.cat([g.reshape(-1) for g in grads[k]]).to(acc)
            dist.all_reduce(total, group=self.ep_group)
            for k in mine:
                src = total[row_of[local[k]]]
                offset = 0
                for p, g in zip(self.slot_params(layer, k), grads[k]):
                    g.copy_(src[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
                    _set_grad(p, g)

    # ------------------------------------------------------------- checkpoints
    def expert_key_prefixes(self) -> list[str]:
        """``[L]`` state-dict key prefix of each MoE layer's slots, e.g. ``"decoder.layers.1.mlp.experts.local_experts."``."""
        return [
            f"{name}.experts.local_experts." if name else "experts.local_experts."
            for name in self.layer_names
        ]

    def logical_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict in the logical layout (collective over :attr:`ep_group`).

        Expert keys are ``{prefix}{e}.{name}`` for every logical expert ``e`` (each once, as a model
        without EP has them); other keys are this rank's own.  Save it with the expert map beside it
        (:func:`megatron_eplb.checkpoint.save_expert_map`).
        """
        state = dict(self.model.state_dict())
        prefixes = self.expert_key_prefixes()
        param_names = self.slot_param_names()
        for key in [k for k in state if any(k.startswith(p) for p in prefixes)]:
            del state[key]
        physical: dict[str, Any] = {}
        for layer in range(self.num_layers):
            # Non-parameter entries of a slot (``_extra_state``) are the same for every expert: take slot 0's.
            extra = {
                k: v for k, v in self._slot_module(layer, 0).state_dict().items() if k not in param_names
            }
            logical = self._gather_logical(layer)
            for e in range(self.num_experts):
                for name, tensor in zip(param_names, self._unflatten(logical[e])):
                    physical[f"{prefixes[layer]}{e}.{name}"] = tensor.clone()
                for name, value in extra.items():
                    physical[f"{prefixes[layer]}{e}.{name}"] = value
        state.update(physical)
        return state

    def load_logical_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
        """Load a logical state dict (:meth:`logical_state_dict`, any placement or EP size) into this model:
        every slot is filled from its logical expert.  Local, no communication.  Returns what
        ``Module.load_state_dict`` returns."""
        physical = logical_to_physical(
            state_dict,
            self.placement.phy2log,
            self.expert_key_prefixes(),
            rank=self.ep_rank,
            slots_per_rank=self.slots_per_rank,
        )
        return self.model.load_state_dict(physical, strict=strict)

    def physical_to_logical(self, slot_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:func:`megatron_eplb.checkpoint.physical_to_logical` with this model's prefixes and placement."""
        return physical_to_logical(slot_state, self.placement.phy2log, self.expert_key_prefixes())

    # ============================================================ internals
    def _slot_module(self, layer: int, slot: int) -> torch.nn.Module:
        if not 0 <= layer < self.num_layers:
            raise EPLBPatchError(f"layer {layer} out of range [0, {self.num_layers})")
        if not 0 <= slot < self.slots_per_rank:
            raise EPLBPatchError(f"slot {slot} out of range [0, {self.slots_per_rank}) (local slots)")
        return self._layers[layer].experts.local_experts[slot]

    def _unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for t in self.slot_tensors(0, 0):
            out.append(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return out

    def _write_flat(self, layer: int, slot: int, flat: torch.Tensor) -> None:
        self.write_slot(layer, slot, self._unflatten(flat))

    def _gather_logical(self, layer: int, get=None) -> torch.Tensor:
        """``[E, n]`` flat tensors (``get(layer, slot)``, default the weights) of every logical expert of
        ``layer``, each from its first copy (collective)."""
        get = get or self.slot_tensors
        local = torch.stack([_flatten(get(layer, k)) for k in range(self.slots_per_rank)])
        everything = _all_gather_rows(local, self.ep_group)  # [P, n]
        first_copy = torch.tensor(self.placement.log2phy[layer, :, 0], device=everything.device)
        return everything[first_copy]

    def _routing_tables(
        self, row: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | bool | None]:
        """Device tables of one layer: log2phy ``[E, C]``, replica_count ``[E]``, local_slot ``[E]``
        (a slot of this rank holding the expert, else -1), and the direct map: ``True`` when slot ``s``
        holds expert ``s`` (the routing passes through unchanged), an int64 ``[P]`` ``phy2log`` row when every
        slot holds a distinct expert (a column gather), else ``None`` (replicas or empty slots: the
        round-robin split of :func:`route_to_slots`)."""
        from megatron_eplb.placement import build_log2phy

        row = np.asarray(row, dtype=np.int64)
        log2phy, count = build_log2phy(row[None, :], self.num_experts)
        local_slot = np.full(self.num_experts, -1, dtype=np.int64)
        for slot in reversed(self.local_slots()):  # lowest local slot wins
            if row[slot] >= 0:
                local_slot[row[slot]] = slot
        num_experts, copies = log2phy.shape[1:]
        parts = [log2phy[0].reshape(-1), np.maximum(count[0], 1), local_slot]
        permutation = row.shape[0] == self.num_experts and np.array_equal(
            np.sort(row), np.arange(num_experts)
        )
        identity = permutation and np.array_equal(row, np.arange(num_experts))
        if permutation and not identity:
            parts.append(row)
        # One host-to-device copy for all tables; on CUDA from pinned memory, asynchronous: a commit lands in
        # a layer's forward pre-hook, where a pageable copy would synchronise the stream mid-forward.
        flat = torch.from_numpy(np.concatenate(parts).astype(np.int64))
        if self.device.type == "cuda":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        else:
            flat = flat.to(self.device)
        ec, e2 = num_experts * copies, 2 * num_experts
        direct = True if identity else flat[ec + e2 :] if permutation else None
        return (
            flat[:ec].view(num_experts, copies),
            flat[ec : ec + num_experts],
            flat[ec + num_experts : ec + e2],
            direct,
        )

    def _convert_layer(self, idx: int, layer: torch.nn.Module) -> None:
        """Rebuild the experts for S slots (filled from the logical experts) and the dispatcher for P."""
        old = layer.experts
        flat_old = torch.stack(
            [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in old.local_experts]
        )
        logical = _all_gather_rows(flat_old, self.ep_group)  # [E, n]: Megatron puts expert r*E/N+k on rank r
        if logical.shape[0] != self.num_experts:
            raise EPLBPatchError(
                f"layer {idx}: gathered {logical.shape[0]} experts, expected {self.num_experts}"
            )
        new = _build_experts(layer, self.slots_per_rank)
        layer.experts = new
        row = self.placement.phy2log[idx]
        for k, slot in enumerate(self.local_slots()):
            if row[slot] >= 0:
                self._write_flat(idx, k, logical[int(row[slot])])
        layer.token_dispatcher = _build_dispatcher(layer, self.num_slots, self.slots_per_rank, self.ep_rank)
        layer.num_local_experts = self.slots_per_rank
        layer.local_expert_indices = list(self.local_slots())
        layer.eplb_layer_id = idx
        original_route = layer.route

        def route(hidden_states, padding_mask=None, _idx=idx, _route=original_route):
            probs, routing_map = _route(hidden_states, padding_mask)
            return self._route_physical(_idx, probs, routing_map, padding_mask)

        layer.route = route
        new.forward = self._make_slot_counting_forward(idx, new.forward)
        new.sharded_state_dict = self._make_sharded_state_dict(idx, new)
        new.register_load_state_dict_pre_hook(self._make_fill_same_rank_copies(idx))

    def _make_sharded_state_dict(self, idx: int, experts: torch.nn.Module):
        """Wrap ``experts.sharded_state_dict`` (Megatron dist checkpointing) to give the logical layout.

        Each local slot holding expert ``e`` (the first of its copies on this rank) is passed to Megatron's own
        ``sharded_state_dict`` as the one local expert of a view that claims EP rank ``e`` of ``E`` ranks, so
        the ShardedTensors get the keys, global shape ``[E, ...]`` and offset ``e`` the unpatched model gives
        expert ``e``.  The globally first copy (``log2phy[l, e, 0]``) is the main replica that is saved; the
        copies on other ranks get a non-zero replica id (loaded, never saved); a second copy on one rank is
        left out and filled on load by :meth:`_make_fill_same_rank_copies`.
        """
        original = type(experts).sharded_state_dict

        def sharded_state_dict(prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
            row = self.placement.phy2log[idx]
            copies = self.placement.log2phy[idx]  # [E, C]: slots of each expert, first copy first
            dp_size = experts.dp_group.size()
            out: dict[str, Any] = {}
            done: set[int] = set()
            for k, slot in enumerate(self.local_slots()):
                expert = int(row[slot])
                if expert < 0 or expert in done:
                    continue
                done.add(expert)
                view = _OneExpertView(experts, experts.local_experts[k], expert, self.num_experts)
                copy = int(np.flatnonzero(copies[expert] == slot)[0])
                src, dst = f"{prefix}local_experts.0.", f"{prefix}local_experts.{k}."
                for key, sharded in original(view, prefix, sharded_offsets, metadata).items():
                    if copy > 0:  # replication over expert-DP ranks and over copies
                        pp, tp, dp = sharded.replica_id
                        sharded.replica_id = (pp, tp, dp + copy * dp_size)
                    out[dst + key[len(src) :] if key.startswith(src) else key] = sharded
            return out

        return sharded_state_dict

    def _make_fill_same_rank_copies(self, idx: int):
        """A load-state-dict pre-hook: a slot whose keys are missing takes them from another local slot of
        the same expert (a second copy on one rank, left out of the sharded state dict)."""

        def fill(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
            row = self.placement.phy2log[idx]
            base = f"{prefix}local_experts."
            by_slot: dict[int, list[str]] = {}  # local slot -> its keys in state_dict
            for key in state_dict:
                if key.startswith(base):
                    index, _, _ = key[len(base) :].partition(".")
                    if index.isdigit():
                        by_slot.setdefault(int(index), []).append(key)
            source: dict[int, int] = {}  # logical expert -> a local slot whose keys are present
            for k, slot in enumerate(self.local_slots()):
                if row[slot] >= 0 and k in by_slot:
                    source.setdefault(int(row[slot]), k)
            for k, slot in enumerate(self.local_slots()):
                if row[slot] < 0 or k in by_slot or int(row[slot]) not in source:
                    continue
                src, dst = f"{base}{source[int(row[slot])]}.", f"{base}{k}."
                for key in by_slot[source[int(row[slot])]]:
                    state_dict[dst + key[len(src) :]] = state_dict[key]

        return fill

    def _make_slot_counting_forward(self, idx: int, experts_forward):
        """The experts' ``forward(hidden, tokens_per_slot, probs)``, keeping ``tokens_per_slot`` for
        :meth:`slot_loads` first.  A wrapper rather than a forward pre-hook: a module without hooks takes
        ``Module.__call__``'s fast path."""

        def forward(*args, **kwargs):
            if self.recording and not _recomputing():
                counts = args[1] if len(args) > 1 else kwargs["tokens_per_expert"]
                if getattr(counts, "is_cuda", False) and torch.cuda.is_current_stream_capturing():
                    self._slot_loads_rows[idx].add_(counts)  # graph-safe: in place into a live buffer
                else:
                    pending = self._slot_counts_pending[idx]
                    pending.append(counts)
                    if len(pending) >= _MAX_PENDING_SLOT_COUNTS:  # nobody reads: bound what is kept
                        self._fold_slot_counts()
            return experts_forward(*args, **kwargs)

        return forward

    def _count_routed(self, idx: int, routed: torch.Tensor) -> None:
        """Count the bool ``[T, E]`` map ``routed`` (padding already masked) into layer ``idx``'s logical
        loads: one in-place add into the layer's accumulator of that shape (summed by :meth:`loads`)."""
        accs = self._route_acc[idx]
        acc = accs.get(routed.shape)
        if acc is None:
            if len(accs) >= _MAX_ACC_SHAPES:  # many token counts: count directly, hold no more memory
                self._loads_rows[idx].add_(routed.sum(dim=0, dtype=torch.int64))
                return
            acc = accs[routed.shape] = torch.zeros(routed.shape, dtype=torch.int32, device=routed.device)
        acc.add_(routed)  # int32 += bool; overflows only after 2**31 forwards between two reads

    def _route_physical(
        self, idx: int, probs: torch.Tensor, routing_map: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Record logical loads; map ``[T, E]`` probs / routing map to ``[T, P]`` physical slots."""
        if self.recording and not _recomputing():
            routed = routing_map
            if padding_mask is not None:  # Megatron's router: True marks padding
                routed = routing_map & ~padding_mask.reshape(-1, 1).to(routing_map.device)
            self._count_routed(idx, routed)
        log2phy, count, local_slot, direct = self._tables[idx]
        if direct is True:  # slot s holds expert s: physical routing is the logical routing
            return probs, routing_map
        if direct is not None:  # one copy of each expert: a column gather (phys[:, s] = log[:, phy2log[s]])
            return probs.index_select(1, direct), routing_map.index_select(1, direct)
        return route_to_slots(
            probs,
            routing_map,
            log2phy,
            count,
            self.num_slots,
            offset=self.ep_rank,
            local_slot=local_slot if self.replica_dispatch == "local_first" else None,
        )


def route_to_slots(
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    log2phy: torch.Tensor,
    replica_count: torch.Tensor,
    num_slots: int,
    *,
    offset: int = 0,
    local_slot: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map logical routing to physical slots (a pure function, differentiable in ``probs``).

    The ``i``-th pair (in token order) routed to expert ``e`` goes to copy ``(i + offset) % c_e``; with
    ``local_slot`` a pair goes to ``local_slot[e]`` where that is ``>= 0``.

    Args:
        probs: ``[T, E]`` routing probabilities (zero where not routed).
        routing_map: bool ``[T, E]``.
        log2phy: int64 ``[E, C]`` slots of each expert (``-1`` padded, ascending).
        replica_count: int64 ``[E]`` copies of each expert (>= 1).
        num_slots: ``P``.
        offset: round-robin start (the EP rank, so leftovers spread over copies).
        local_slot: optional int64 ``[E]``.
    Returns:
        probs ``[T, P]`` and bool routing map ``[T, P]``.
    """
    num_tokens = routing_map.shape[0]
    pair_index = routing_map.to(torch.int64).cumsum(dim=0) - 1  # [T, E]
    copy = (pair_index + offset) % replica_count  # [T, E]
    slot = torch.gather(log2phy.t(), 0, copy)  # [T, E]: slot[t, e] = log2phy[e, copy[t, e]]
    if local_slot is not None:
        slot = torch.where(local_slot >= 0, local_slot, slot)
    slot = torch.where(routing_map, slot, num_slots)  # unrouted pairs go to a dropped column
    phys_map = torch.zeros(num_tokens, num_slots + 1, dtype=torch.bool, device=routing_map.device)
    phys_map.scatter_(1, slot, routing_map)
    phys_probs = torch.zeros(num_tokens, num_slots + 1, dtype=probs.dtype, device=probs.device)
    phys_probs = phys_probs.scatter(1, slot, probs)
    return phys_probs[:, :num_slots], phys_map[:, :num_slots].contiguous()


# ============================================================================ helpers


def _recomputing() -> bool:
    """Whether this forward is a re-run inside backward (activation recompute): not counted."""
    return torch._C._current_graph_task_id() != -1


def _param_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _all_gather_rows(local: torch.Tensor, group) -> torch.Tensor:
    """Concatenate ``local [k, n]`` of every rank of ``group`` in rank order: ``[k * ranks, n]``."""
    size = dist.get_world_size(group)
    if size == 1:
        return local.clone()
    out = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(out, local.contiguous(), group=group)
    return torch.cat(out)


def _flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat vector of ``tensors`` (in the dtype of the widest float among them)."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def _unflatten_into(tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy ``flat`` (as made by :func:`_flatten`) back into ``tensors`` in place."""
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def _grad_of(p: torch.nn.Parameter) -> torch.Tensor:
    g = getattr(p, "main_grad", None)
    if g is None:
        g = p.grad
    return torch.zeros_like(p) if g is None else g


def _set_grad(p: torch.nn.Parameter, g: torch.Tensor) -> None:
    if getattr(p, "main_grad", None) is not None:
        return
    if p.grad is None:
        p.grad = g


class _ExpertRank:
    """Stands in for the EP group in :class:`_OneExpertView`: ``rank()`` is the expert, ``size()`` the count."""

    def __init__(self, expert: int, num_experts: int) -> None:
        self._rank, self._size = expert, num_experts

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


class _OneExpertView:
    """An experts module seen as holding only logical expert ``expert`` of ``num_experts``, as local expert 0
    of EP rank ``expert``: Megatron's ``SequentialMLP.sharded_state_dict`` run on it keys and offsets the slot
    exactly as the unpatched model keys that expert.  Other attributes are the real module's."""

    def __init__(
        self, experts: torch.nn.Module, slot: torch.nn.Module, expert: int, num_experts: int
    ) -> None:
        self._experts = experts
        self.local_experts = [slot]
        self.num_local_experts = 1
        self.ep_group = _ExpertRank(expert, num_experts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._experts, name)
