"""Seam: :func:`apply` — find the MoE layers, check everything, then hand them to the handle.

Owns :func:`find_moe_layers`, the checks that refuse a model before anything changes (expert class via
``experts/``, dispatcher via ``dispatchers.py``, parallel layout, router options, device, placement), and
the start placement from the config.  Nothing is changed when a check fails.

A new expert class or dispatcher changes nothing here: the checks ask their registries.  A newly
supported parallel layout or router option: relax its check in :func:`_check_layers`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatron_eplb.comm import collective_device
from megatron_eplb.config import REPLICA_DISPATCH, EPLBConfig
from megatron_eplb.pipeline import stage_placement
from megatron_eplb.placement import ExpertMapError, ExpertPlacement

from .compat import EPLBPatchError, check_mcore_version, ensure_compat, param_device
from .dispatchers import SUPPORTED_DISPATCHERS, dispatcher_kind
from .experts import storage_class
from .handle import MegatronEPLB, check_placement, check_same_placement_everywhere
from .pipeline import pipeline_stage

__all__ = ["REPLICA_DISPATCH", "apply", "find_moe_layers"]


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
    fast_replicas: int | None = None,
) -> MegatronEPLB:
    """Make every MoE layer of ``model`` placement-aware; return the handle that controls them.

    Collective over the expert-parallel group (gathers the logical experts to fill the slots) and, with
    PP > 1, over the pipeline group (each stage's MoE layer count, for global layer ids).  Call it
    after ``parallel_state`` is initialised and before building the optimizer: the experts' parameters
    are re-created once here (never again afterwards).

    Args:
        model: a Megatron-core module holding ``MoELayer`` s (e.g. ``GPTModel``).
        placement: the placement to start from; ``None``: from ``config.expert_map_path``, else the
            default layout with ``config.init_redundancy_expert`` redundant slots (0 without config).
        config: optional :class:`EPLBConfig` (``expert_map_path``, ``init_redundancy_expert``,
            ``eplb_replica_dispatch``).
        replica_dispatch: ``"even"``, ``"local_first"`` or ``"balanced"``; overrides
            ``config.eplb_replica_dispatch``.
        fast_replicas: spare slots per rank for per-step replicas (``fast_replicas.py``; 0 = off); overrides
            ``config.eplb_fast_replicas`` / ``eplb_fast_replica_budget`` (``eplb_num_nodes`` and
            ``eplb_fast_cross_node_min_tokens`` from ``config``).
    Raises:
        EPLBPatchError: no MoE layer, unsupported class/dispatcher/parallel layout/version, or a placement
            that does not match the model.  Nothing is changed when it raises.
    """
    check_mcore_version()
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
    dispatch = replica_dispatch or (config or EPLBConfig()).eplb_replica_dispatch
    if dispatch not in REPLICA_DISPATCH:
        raise EPLBPatchError(f"replica_dispatch={dispatch!r}; supported: {', '.join(REPLICA_DISPATCH)}")
    stage = pipeline_stage(len(layers))  # PP > 1: this stage's MoE layers among the model's (collective)
    if placement is None:
        placement = _placement_from_config(config, len(layers), num_experts, ep_size)
    placement = stage_placement(placement, stage)  # a whole-model map: this stage's rows
    check_placement(placement, len(layers), num_experts, ep_size, None)
    check_same_placement_everywhere(placement, ep_group)
    cfg = config or EPLBConfig()
    if fast_replicas is None:
        fast_replicas = cfg.eplb_fast_replica_budget if cfg.eplb_fast_replicas else 0
    if fast_replicas:
        _check_fast(layers, dispatch, cfg.eplb_num_nodes, ep_size)
    handle = MegatronEPLB(model, layers, placement, ep_group, dispatch, stage, cfg.eplb_split_align)
    if fast_replicas:
        from .fast_replicas import install

        install(handle, fast_replicas, cfg.eplb_num_nodes, cfg.eplb_fast_cross_node_min_tokens)
    model._megatron_eplb_handle = handle
    return handle


def _check_layers(layers: list[tuple[str, torch.nn.Module]]) -> None:
    """Raise :class:`EPLBPatchError` for the first layer the patch cannot convert (nothing changed yet)."""

    first = layers[0][1]
    for name, layer in layers:
        where = f"MoE layer {name!r}"
        storage_class(layer.experts, where)
        kind = dispatcher_kind(layer)
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


def _check_fast(
    layers: list[tuple[str, torch.nn.Module]], dispatch: str, num_nodes: int = 1, ep_size: int = 1
) -> None:
    """Per-step replicas: refuse what they do not support before anything changes."""
    from .fast_replicas import SUPPORTED_FAST_EXPERTS

    if ep_size % num_nodes:
        raise EPLBPatchError(
            f"eplb_num_nodes={num_nodes} does not divide the EP size {ep_size} (per-step replicas fetch inside a node first)"
        )
    if dispatch != "balanced":
        raise EPLBPatchError(
            f"per-step replicas split over all copies with the per-batch shares; replica_dispatch={dispatch!r} "
            "is not supported with them: use 'balanced'"
        )
    for name, layer in layers:
        kind = type(layer.experts).__name__
        if kind not in SUPPORTED_FAST_EXPERTS:
            raise EPLBPatchError(
                f"MoE layer {name!r}: per-step replicas (eplb_fast_replicas) do not support expert class {kind}; "
                f"supported: {', '.join(SUPPORTED_FAST_EXPERTS)}"
            )
        if getattr(layer.config, "gradient_accumulation_fusion", False):
            raise EPLBPatchError(
                f"MoE layer {name!r}: per-step replicas need gradient_accumulation_fusion=False (the fused wgrad "
                "writes into the main_grad of the parameter it knows, which a fetched copy is not)"
            )


def _check_device(layer: torch.nn.Module, ep_group) -> None:
    """The experts must live where the EP group's collectives run (``apply`` gathers them over it)."""
    have, need = param_device(layer.experts), collective_device(ep_group)
    if have.type != need.type:
        raise EPLBPatchError(
            f"the experts are on {have} but the expert-parallel group ({dist.get_backend(ep_group)}) "
            f"communicates on {need}: move the model first (model.to({str(need)!r})), then call apply()"
        )


def _placement_from_config(
    config: EPLBConfig | None, num_layers: int, num_experts: int, ep_size: int
) -> ExpertPlacement:
    """The start placement: ``config.expert_map_path``, else the default with ``init_redundancy_expert``."""
    try:
        if config is not None and config.expert_map_path is not None:
            return ExpertPlacement.from_json(config.expert_map_path, allow_same_rank_copies=True)
        redundant = config.init_redundancy_expert if config is not None else 0
        return ExpertPlacement.default(num_layers, num_experts, ep_size, redundant)
    except ExpertMapError as exc:
        raise EPLBPatchError(f"cannot build the start placement: {exc}") from None
