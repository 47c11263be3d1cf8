"""Seam: :func:`apply` / :func:`attach` — find DeepSpeed's ``MoE`` layers, check them, hand them to the handle.

Owns :func:`find_moe_layers`, :func:`expert_groups` (DeepSpeed's expert-parallel / expert-data-parallel
groups, built as DeepSpeed builds them) and the checks that refuse a model before anything changes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatron_eplb.comm import collective_device
from megatron_eplb.config import EPLBConfig
from megatron_eplb.errors import DeepSpeedEPLBError, ExpertMapError
from megatron_eplb.placement import ExpertPlacement

from .handle import CAPACITY_MODES, DeepSpeedMoEEPLB

__all__ = ["REPLICA_DISPATCH", "apply", "attach", "expert_groups", "find_moe_layers"]

REPLICA_DISPATCH = ("balanced", "even", "local_first")
"""Replica-dispatch modes of this adapter (those of ``megatron_eplb.config.REPLICA_DISPATCH``)."""


def find_moe_layers(model: torch.nn.Module | Sequence[torch.nn.Module]) -> list[tuple[str, torch.nn.Module]]:
    """``(name, MoE)`` of every ``deepspeed.moe.layer.MoE`` in module order: the MoE layer ids ``0..L-1``
    (the order DeepSpeed numbers its ``layer_<id>_expert_<e>`` checkpoint files in)."""
    from deepspeed.moe.layer import MoE

    modules = [model] if isinstance(model, torch.nn.Module) else list(model)
    return [(name, m) for chunk in modules for name, m in chunk.named_modules() if isinstance(m, MoE)]


def expert_groups(ep_size: int, use_data_before_expert_parallel: bool = False) -> tuple[object, object]:
    """DeepSpeed's ``(expert-parallel, expert-data-parallel)`` groups for ``ep_size``, created as the engine
    creates them (``deepspeed.utils.groups._create_expert_and_data_parallel``, what ``MoE.
    set_deepspeed_parallelism`` calls) when they do not exist yet; the engine later finds and uses them.
    Collective over the world when it creates them."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    world = dist.get_world_size()
    if world % ep_size:
        raise DeepSpeedEPLBError(
            f"expert-parallel size {ep_size} does not divide the world size {world}; choose ep_size in "
            f"{[d for d in range(1, world + 1) if world % d == 0]}"
        )
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(
            ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel
        )
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


def apply(
    model: torch.nn.Module,
    placement: ExpertPlacement | None = None,
    config: EPLBConfig | None = None,
    *,
    replica_dispatch: str | None = None,
    capacity: str | None = None,
    use_data_before_expert_parallel: bool = False,
) -> DeepSpeedMoEEPLB:
    """Make every ``deepspeed.moe.layer.MoE`` of ``model`` placement-aware; return the handle.

    Collective over the world (DeepSpeed's expert groups are created if missing; the logical experts are
    gathered over the EP group).  Call it after ``deepspeed.init_distributed()`` and before
    ``deepspeed.initialize`` (the experts' parameters are re-created here, once).

    Args:
        model: a module holding ``MoE`` layers (e.g. a Megatron-DeepSpeed GPT).
        placement: the start placement; ``None``: ``config.expert_map_path``, else the default layout with
            ``config.init_redundancy_expert`` redundant slots.
        config: optional :class:`EPLBConfig` (``expert_map_path``, ``init_redundancy_expert``,
            ``eplb_replica_dispatch``, ``eplb_capacity``).
        replica_dispatch: ``"balanced"``, ``"even"`` or ``"local_first"`` (overrides the config).
        capacity: ``"logical"`` or ``"per_slot"`` (overrides the config).
        use_data_before_expert_parallel: DeepSpeed's ``use_data_before_expert_parallel_`` (group layout).
    Raises:
        DeepSpeedEPLBError: no ``MoE`` layer, an unsupported option, or a placement that does not fit.
            Nothing is changed when it raises.
    """
    if getattr(model, "_megatron_eplb_handle", None) is not None:
        raise DeepSpeedEPLBError("apply() was already called on this model; use handle.set_placement()")
    layers, ep_group = _checked_layers(model, use_data_before_expert_parallel)
    first = layers[0][1]
    dispatch = replica_dispatch or (config or EPLBConfig()).eplb_replica_dispatch
    if dispatch not in REPLICA_DISPATCH:
        raise DeepSpeedEPLBError(
            f"replica_dispatch={dispatch!r} is not supported for DeepSpeed MoE layers; supported: "
            f"{', '.join(REPLICA_DISPATCH)}"
        )
    capacity = capacity or (getattr(config, "eplb_capacity", None) or "logical")
    if capacity not in CAPACITY_MODES:
        raise DeepSpeedEPLBError(f"capacity={capacity!r}; supported: {', '.join(CAPACITY_MODES)}")
    if capacity == "per_slot" and dispatch == "balanced":
        # Per-slot capacity is there to keep more pairs: the even split keeps the most (c copies of an expert,
        # up to c x C of its pairs); the balanced split loads some copies past C (measured on the example,
        # top-2: 0.347 of the pairs dropped instead of 0.295).
        logging.getLogger("megatron_eplb").info(
            "megatron-eplb: eplb_capacity='per_slot' splits replicas evenly (it keeps the most pairs); "
            "the balanced dispatch serves eplb_capacity='logical'"
        )
        dispatch = "even"
    ep_size = dist.get_world_size(ep_group)
    if placement is None:
        placement = _placement_from_config(config, len(layers), first.num_experts, ep_size)
    try:
        placement.validate(num_layers=len(layers), num_experts=first.num_experts, num_ranks=ep_size)
    except ExpertMapError as exc:
        raise DeepSpeedEPLBError(f"placement does not match the model: {exc}") from None
    _check_same_everywhere(placement, ep_group)
    handle = DeepSpeedMoEEPLB(
        model, layers, placement, ep_group, replica_dispatch=dispatch, capacity=capacity, patch=True
    )
    model._megatron_eplb_handle = handle
    return handle


def attach(model: torch.nn.Module, use_data_before_expert_parallel: bool = False) -> DeepSpeedMoEEPLB:
    """A read-only handle of an *unpatched* model (``patch=False``): DeepSpeed's own layout as a placement
    (the default one, no redundancy), so that the logical checkpoint functions save and load it.  Changes
    nothing in the model."""
    layers, ep_group = _checked_layers(model, use_data_before_expert_parallel)
    ep_size = dist.get_world_size(ep_group)
    placement = ExpertPlacement.default(len(layers), layers[0][1].num_experts, ep_size, 0)
    return DeepSpeedMoEEPLB(model, layers, placement, ep_group, patch=False)


def _checked_layers(model: torch.nn.Module, use_data_before_expert_parallel: bool):
    """The ``MoE`` layers and their EP group, or :class:`DeepSpeedEPLBError` for the first thing unsupported."""
    from deepspeed.moe.sharded_moe import TopKGate
    from deepspeed.utils import groups

    if "sparse_routes" not in inspect.signature(TopKGate.forward).parameters:
        import deepspeed

        raise DeepSpeedEPLBError(
            f"DeepSpeed {deepspeed.__version__}: TopKGate.forward has no sparse_routes argument; the EPLB "
            "adapter maps the gate's sparse routes to slots (DeepSpeed >= 0.19 has them)"
        )
    layers = find_moe_layers(model)
    if not layers:
        raise DeepSpeedEPLBError(f"{type(model).__name__} has no deepspeed.moe.layer.MoE; nothing to balance")
    first = layers[0][1]
    for name, moe in layers:
        where = f"MoE layer {name!r}"
        if moe.num_experts != first.num_experts or moe.ep_size != first.ep_size:
            raise DeepSpeedEPLBError(
                f"{where}: {moe.num_experts} experts at ep_size {moe.ep_size}, the first MoE layer "
                f"{first.num_experts} at {first.ep_size}; every MoE layer needs the same experts and EP size"
            )
        if moe.enable_expert_tensor_parallelism:
            raise DeepSpeedEPLBError(f"{where}: expert tensor parallelism is not supported; supported: off")
        if getattr(moe.deepspeed_moe, "use_tutel", False):
            raise DeepSpeedEPLBError(f"{where}: use_tutel=True is not supported; supported: use_tutel=False")
        if not isinstance(moe.deepspeed_moe.gate, TopKGate):
            raise DeepSpeedEPLBError(
                f"{where}: gate {type(moe.deepspeed_moe.gate).__name__} is not a TopKGate"
            )
        if getattr(moe, "_megatron_eplb_patched", False):
            raise DeepSpeedEPLBError(f"{where}: already placement-aware (apply() was called on it)")
    if groups.mpu is not None:
        from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

        if bwc_tensor_model_parallel_world_size(groups.mpu) > 1:
            raise DeepSpeedEPLBError("tensor parallel size > 1 is not supported; supported: TP = 1")
    ep_group, _ = expert_groups(first.ep_size, use_data_before_expert_parallel)
    have = next(first.deepspeed_moe.experts.parameters()).device
    need = collective_device(ep_group)
    if have.type != need.type:
        raise DeepSpeedEPLBError(
            f"the experts are on {have} but the expert-parallel group ({dist.get_backend(ep_group)}) "
            f"communicates on {need}: move the model first (model.to({str(need)!r})), then call apply()"
        )
    return layers, ep_group


def _placement_from_config(config, num_layers: int, num_experts: int, ep_size: int) -> ExpertPlacement:
    try:
        if config is not None and config.expert_map_path is not None:
            return ExpertPlacement.from_json(config.expert_map_path, allow_same_rank_copies=True)
        redundant = config.init_redundancy_expert if config is not None else 0
        return ExpertPlacement.default(num_layers, num_experts, ep_size, redundant)
    except ExpertMapError as exc:
        raise DeepSpeedEPLBError(f"cannot build the start placement: {exc}") from None


def _check_same_everywhere(placement: ExpertPlacement, group) -> None:
    """Raise when the EP ranks were given different placements (a stale map on one rank)."""
    if dist.get_world_size(group) == 1:
        return
    p = torch.from_numpy(placement.phy2log.astype("int64")).reshape(-1)
    w = torch.arange(1, p.numel() + 1, dtype=torch.int64)
    digest = torch.stack([(p * w).sum(), (p * w * w % 1_000_003).sum()]).to(collective_device(group))
    every = [torch.empty_like(digest) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, digest, group=group)
    bad = [r for r, d in enumerate(every) if not torch.equal(d, every[0])]
    if bad:
        raise DeepSpeedEPLBError(f"EP ranks {bad} were given another placement than EP rank 0")
