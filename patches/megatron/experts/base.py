"""The expert-storage interface: how one MoE layer's experts module holds its ``S`` local slots.

Every place the patch touches an experts module goes through an :class:`ExpertStorage`: building the
module for ``S`` slots, a slot's parameters (read, written, moved, summed), its state-dict keys, and the
Megatron dist-checkpoint entries of one slot as a logical expert.  The registry maps Megatron expert
classes to their storage; :func:`storage_class` refuses any other class with an error naming the
supported ones.

A new expert class (e.g. ``TEGroupedMLP``): one new module in this package with a subclass of
:class:`ExpertStorage` decorated with :func:`register` (every module of the package is imported); nothing
here changes.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..compat import EPLBPatchError, param_device, process_groups

__all__ = ["ExpertStorage", "register", "storage_class", "storage_for", "supported_expert_classes"]

_STORAGES: list[type[ExpertStorage]] = []
_GROUPED = ("GroupedMLP", "TEGroupedMLP")  # grouped-GEMM classes a model gets with moe_grouped_gemm=True


class ExpertStorage(ABC):
    """One MoE layer's experts module seen as ``S`` slots of identical parameter shapes.

    Slot ``k`` (``0 <= k < S``) is this rank's local slot ``k``, i.e. global slot ``ep_rank * S + k``.
    Subclasses name their Megatron class (:attr:`class_name`) and implement the slot accessors.
    """

    class_name: ClassVar[str] = ""
    """The Megatron class in ``megatron.core.transformer.moe.experts`` this storage handles."""
    key_prefix: ClassVar[str] = ""
    """State-dict keys of slot ``k``, within the experts module: ``f"{key_prefix}{k}.{name}"`` with ``name``
    from :meth:`slot_param_names` (the keys the logical checkpoint format uses too)."""

    def __init__(self, experts: torch.nn.Module) -> None:
        self.experts = experts
        """The Megatron experts module (``layer.experts``)."""

    @classmethod
    def expert_class(cls) -> type | None:
        """The Megatron class (``None`` where this release lacks it)."""
        from megatron.core.transformer.moe import experts

        return getattr(experts, cls.class_name, None)

    @classmethod
    def build(cls, layer: torch.nn.Module, num_slots: int) -> ExpertStorage:
        """A new experts module of ``layer``'s spec with ``num_slots`` local experts (weights uninitialised:
        every slot is filled from its logical expert right after), on the old module's device."""
        from megatron.core.transformer.spec_utils import build_module

        old = layer.experts
        pgc = process_groups(ep=old.ep_group, expt_tp=old.tp_group, expt_dp=old.dp_group)
        config = layer.config
        saved = config.perform_initialization
        config.perform_initialization = False
        spec = layer.submodules.experts
        try:
            if isinstance(spec, functools.partial):  # 0.18+: a builder, called like the class
                new = spec(num_slots, config, pg_collection=pgc)
            else:
                new = build_module(spec, num_slots, config, pg_collection=pgc)
        finally:
            config.perform_initialization = saved
        return cls(new.to(device=param_device(old)))

    @property
    @abstractmethod
    def num_slots(self) -> int:
        """``S``: local slots (local experts) of the module."""

    @abstractmethod
    def slot_params(self, k: int) -> list[torch.nn.Parameter]:
        """The parameters of slot ``k``, in :meth:`slot_param_names` order (same shapes for every slot)."""

    @abstractmethod
    def slot_param_names(self) -> list[str]:
        """Names of a slot's parameters, e.g. ``["linear_fc1.weight", "linear_fc2.weight"]``."""

    @abstractmethod
    def slot_extra_state(self) -> dict[str, Any]:
        """A slot's state-dict entries that are not parameters (e.g. ``_extra_state``), the same for every
        slot, keyed like :meth:`slot_param_names`."""

    @abstractmethod
    def slot_sharded_state_dict(
        self,
        k: int,
        expert: int,
        num_experts: int,
        prefix: str,
        sharded_offsets: tuple,
        metadata: dict | None,
    ) -> dict[str, Any]:
        """Megatron dist-checkpoint entries of slot ``k`` as logical expert ``expert`` of ``num_experts``:
        the ShardedTensors the unpatched model gives that expert (its keys, global shape ``[E, ...]``,
        offset ``expert``), under this module's key of slot ``k`` (``f"{prefix}{key_prefix}{k}."``)."""

    def flat_rows(self) -> torch.Tensor:
        """``[S, n]``: each slot's parameters flattened and concatenated, in slot order."""
        return torch.stack(
            [torch.cat([p.detach().reshape(-1) for p in self.slot_params(k)]) for k in range(self.num_slots)]
        )


def register(cls: type[ExpertStorage]) -> type[ExpertStorage]:
    """Class decorator: make ``cls`` the storage of the Megatron class ``cls.class_name``."""
    _STORAGES.append(cls)
    return cls


def supported_expert_classes() -> tuple[str, ...]:
    """Names of the expert classes with a storage."""
    return tuple(s.class_name for s in _STORAGES)


def storage_class(experts: torch.nn.Module, where: str) -> type[ExpertStorage]:
    """The storage of ``experts``'s class; :class:`EPLBPatchError` (naming the supported classes) else."""
    for storage in _STORAGES:
        cls = storage.expert_class()
        if cls is not None and isinstance(experts, cls):
            return storage
    name = type(experts).__name__
    hint = ""
    if name in _GROUPED and name not in supported_expert_classes():
        hint = " (build the model with moe_grouped_gemm=False to get SequentialMLP)"
    raise EPLBPatchError(
        f"{where}: expert class {name} is not supported; supported: {', '.join(supported_expert_classes())}{hint}"
    )


def storage_for(experts: torch.nn.Module) -> ExpertStorage:
    """``experts`` wrapped in its storage (its class must be supported: :func:`storage_class`)."""
    return storage_class(experts, type(experts).__name__)(experts)
