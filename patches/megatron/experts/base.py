"""The expert-storage interface: how one MoE layer's experts module holds its ``S`` local slots.

Every place the patch touches an experts module goes through an :class:`ExpertStorage`: building the
module for ``S`` slots, a slot's tensors (read, written, moved, summed: :class:`~megatron_eplb.slots.SlotParam`
s), the module's state-dict entries for any list of experts (its own ``S`` slots, or the ``E`` logical
experts of the unpatched model), and the Megatron dist-checkpoint entries of one slot as a logical expert.
The registry maps Megatron expert classes to their storage; :func:`storage_class` refuses any other class
with an error naming the supported ones (and, for ``TEGroupedMLP``, what is missing).

Two layouts are covered:

* **per-slot parameters** (``SequentialMLP``; ``TEGroupedMLP``'s ``linear_fc1.weight{k}``): a slot's tensors
  are whole parameters (``SlotParam.whole``), its state-dict keys :meth:`ExpertStorage.slot_key` — the
  defaults here;
* **stacked parameters** (``GroupedMLP``'s ``weight1`` / ``weight2``): a slot's tensors are blocks of
  parameters shared by all slots (``SlotParam.block``); the storage overrides :meth:`ExpertStorage.state_keys`,
  :meth:`~ExpertStorage.state_entries` and :meth:`~ExpertStorage.split_state_entries`.

Dist-checkpoint entries come from the Megatron class's own ``sharded_state_dict`` run on a
:class:`OneExpertView` of one slot (:meth:`ExpertStorage.one_expert_sharded_state_dict`), so a slot is keyed
and offset exactly as the unpatched model keys its logical expert.

A new expert class: one new module in this package with a subclass of :class:`ExpertStorage` decorated with
:func:`register` (every module of the package is imported); nothing here changes.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from megatron_eplb.slots import SlotParam

from ..compat import EPLBPatchError, param_device, process_groups

__all__ = [
    "ExpertStorage",
    "OneExpertView",
    "register",
    "storage_class",
    "storage_for",
    "supported_expert_classes",
]

_STORAGES: list[type[ExpertStorage]] = []
# What is missing for an expert class Megatron builds that has no storage here (the error of ``apply``).
_MISSING = {
    "TEGroupedMLP": (
        "Transformer Engine cannot be installed on the machines megatron-eplb is tested on, so its storage was "
        "never written or run. It is one class away: a module patches/megatron/experts/te_grouped.py with an "
        "ExpertStorage whose slot k is the per-slot parameters linear_fc1.weight{k} and linear_fc2.weight{k} "
        "(and bias{k}) as SlotParam.whole (the layout SequentialMLP's storage already uses; state keys "
        "linear_fc1.weight{k}), its build for S slots through the layer's spec (base.build), and its "
        "dist-checkpoint entries from TEGroupedMLP.sharded_state_dict on a one-expert view; to be checked with "
        "Transformer Engine (fp8 recipes keep one _extra_state per GroupedLinear, not per slot). Until then "
        "build the experts with moe_use_legacy_grouped_gemm=True (GroupedMLP, megatron-core <= 0.16) or "
        "moe_grouped_gemm=False (SequentialMLP)"
    ),
    "GroupedMLP": "this megatron-core has no legacy GroupedMLP storage; build with moe_grouped_gemm=False",
}


class ExpertStorage(ABC):
    """One MoE layer's experts module seen as ``S`` slots of identical tensor shapes.

    Slot ``k`` (``0 <= k < S``) is this rank's local slot ``k``, i.e. global slot ``ep_rank * S + k``.
    Subclasses name their Megatron class (:attr:`class_name`) and implement the slot accessors; a class whose
    slots are blocks of stacked parameters also overrides the state-dict layout (:meth:`state_keys`,
    :meth:`state_entries`, :meth:`split_state_entries`).
    """

    class_name: ClassVar[str] = ""
    """The Megatron class in ``megatron.core.transformer.moe.experts`` this storage handles."""
    key_prefix: ClassVar[str] = ""
    """Per-slot keys, within the experts module: ``f"{key_prefix}{k}.{name}"`` (:meth:`slot_key`) with ``name``
    from :meth:`slot_param_names`: the module's own state-dict keys where each slot has its own parameters,
    else only the keys of a slot's dist-checkpoint entries (turned into the module's keys on load)."""

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
        """A new experts module of ``layer``'s spec and the old module's config with ``num_slots`` local
        experts (weights uninitialised: every slot is filled from its logical expert right after), on the old
        module's device."""
        from megatron.core.transformer.spec_utils import build_module

        old = layer.experts
        pgc = process_groups(ep=old.ep_group, expt_tp=old.tp_group, expt_dp=old.dp_group)
        config = getattr(old, "config", layer.config)
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

    # ------------------------------------------------------------------ slots
    @property
    @abstractmethod
    def num_slots(self) -> int:
        """``S``: local slots (local experts) of the module."""

    @abstractmethod
    def slot_params(self, k: int) -> list[SlotParam]:
        """The tensors of slot ``k``, in :meth:`slot_param_names` order (same shapes for every slot)."""

    @abstractmethod
    def slot_param_names(self) -> list[str]:
        """Names of a slot's tensors, e.g. ``["linear_fc1.weight", "linear_fc2.weight"]``."""

    def slot_extra_state(self) -> dict[str, Any]:
        """A slot's state-dict entries that are not parameters (e.g. ``_extra_state``), the same for every
        slot, keyed like :meth:`slot_param_names` (none by default)."""
        return {}

    def flat_rows(self) -> torch.Tensor:
        """``[S, n]``: each slot's tensors flattened and concatenated, in slot order."""
        return torch.stack(
            [torch.cat([sp.data.reshape(-1) for sp in self.slot_params(k)]) for k in range(self.num_slots)]
        )

    # ------------------------------------------------------- state-dict layout
    def slot_key(self, k: int, name: str) -> str:
        """The per-slot key of tensor ``name`` of slot (or expert) ``k``: ``f"{key_prefix}{k}.{name}"``."""
        return f"{self.key_prefix}{k}.{name}"

    def state_keys(self, count: int) -> list[str]:
        """The keys (within the experts module) of :meth:`state_entries` for ``count`` experts, and of
        :meth:`extra_entries`.  Default: per-slot keys."""
        names = [*self.slot_param_names(), *self.slot_extra_state()]
        return [self.slot_key(i, name) for i in range(count) for name in names]

    def state_entries(self, tensors: Sequence[Sequence[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The experts module's parameter entries (keys within it) for experts holding ``tensors``
        (``[N]`` lists in :meth:`slot_param_names` order): for this module's ``S`` slots its own state-dict
        entries; for the ``E`` logical experts those of the unpatched model without EP (the logical layout).
        Default: per-slot keys, the tensors themselves."""
        names = self.slot_param_names()
        return {self.slot_key(i, name): t for i, ts in enumerate(tensors) for name, t in zip(names, ts)}

    def split_state_entries(self, state: Mapping[str, torch.Tensor], count: int) -> list[list[torch.Tensor]]:
        """The inverse of :meth:`state_entries`: ``[count]`` lists of tensors from ``state`` (keys within the
        experts module).  Raises ``KeyError`` naming the first missing key."""
        names = self.slot_param_names()
        return [[_entry(state, self.slot_key(i, name)) for name in names] for i in range(count)]

    def extra_entries(self, count: int) -> dict[str, Any]:
        """The non-parameter entries (:meth:`slot_extra_state`) of ``count`` experts, keys within the module."""
        return {
            self.slot_key(i, name): v for i in range(count) for name, v in self.slot_extra_state().items()
        }

    # ------------------------------------------------------- dist checkpoints
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
        offset ``expert``), under per-slot dict keys ``f"{prefix}{slot_key(k, name)}"`` where the entry is
        one of the slot's tensors."""

    def one_expert_sharded_state_dict(
        self,
        expert: int,
        num_experts: int,
        prefix: str,
        sharded_offsets: tuple,
        metadata: dict | None,
        rename: Callable[[str], str],
        **view: Any,
    ) -> dict[str, Any]:
        """The Megatron class's own ``sharded_state_dict`` run on a :class:`OneExpertView` (``view``: the
        attributes that make it hold one slot), its dict keys passed through ``rename``."""
        original = type(self.experts).sharded_state_dict  # the class's: the instance's is wrapped
        one = OneExpertView(self.experts, expert, num_experts, **view)
        return {rename(key): v for key, v in original(one, prefix, sharded_offsets, metadata).items()}


class _ExpertRank:
    """Stands in for the EP group in :class:`OneExpertView`: ``rank()`` is the expert, ``size()`` the count."""

    def __init__(self, expert: int, num_experts: int) -> None:
        self._rank, self._size = expert, num_experts

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


class OneExpertView:
    """An experts module seen as holding only logical expert ``expert`` of ``num_experts``, as its one local
    expert on EP rank ``expert``: Megatron's ``sharded_state_dict`` run on it keys and offsets the slot exactly
    as the unpatched model keys that expert.  ``view`` sets the attributes that hold the slot (e.g.
    ``local_experts``); others are the real module's."""

    def __init__(self, experts: torch.nn.Module, expert: int, num_experts: int, **view: Any) -> None:
        self._experts = experts
        self.num_local_experts = 1
        self.ep_group = _ExpertRank(expert, num_experts)
        for name, value in view.items():
            setattr(self, name, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._experts, name)


def _entry(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise KeyError(key)
    return state[key]


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
    missing = _MISSING.get(name) if name not in supported_expert_classes() else None
    hint = f" ({missing})" if missing else ""
    raise EPLBPatchError(
        f"{where}: expert class {name} is not supported; supported: {', '.join(supported_expert_classes())}{hint}"
    )


def storage_for(experts: torch.nn.Module) -> ExpertStorage:
    """``experts`` wrapped in its storage (its class must be supported: :func:`storage_class`)."""
    return storage_class(experts, type(experts).__name__)(experts)
