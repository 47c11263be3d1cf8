"""Seam: Megatron dist checkpointing (``sharded_state_dict``) of the patched layers in the logical layout.

A patched experts module saves each logical expert once, keyed and offset as the unpatched model keys
it, so checkpoints load across placements, EP sizes and the unpatched model:

* each local slot holding expert ``e`` (the first of its copies on this rank) gives the entries of
  ``e`` (:meth:`ExpertStorage.slot_sharded_state_dict`);
* the primary copy of ``e`` (``placement.log2phy[l, e, 0]``, :meth:`ExpertPlacement.primary_slots`) is the
  main replica that is saved; its copies on other ranks get a non-zero replica id (loaded, never saved);
* a second copy on one rank is left out, and a load-state-dict pre-hook fills it from the first, then turns
  the slots' entries into the module's own (stacked where the slots share parameters).

Owns :func:`install` (called once per layer by the handle).  A new expert class changes nothing here (its
storage gives a slot's entries and :attr:`ExpertStorage.key_prefix`); a new dispatcher neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .experts import ExpertStorage
    from .handle import MegatronEPLB

__all__ = ["install"]


def install(handle: MegatronEPLB, idx: int, storage: ExpertStorage) -> None:
    """Give MoE layer ``idx``'s experts module (``storage.experts``) the logical-layout
    ``sharded_state_dict`` and the pre-hook that fills same-rank copies on load."""
    storage.experts.sharded_state_dict = _sharded_state_dict(handle, idx, storage)
    storage.experts.register_load_state_dict_pre_hook(_fill_same_rank_copies(handle, idx, storage))


def _sharded_state_dict(handle: MegatronEPLB, idx: int, storage: ExpertStorage):
    """``experts.sharded_state_dict`` in the logical layout (see the module docstring)."""
    experts = storage.experts

    def sharded_state_dict(prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        row = handle.placement.phy2log[idx]
        copies = handle.placement.log2phy[idx]  # [E, C]: slots of each expert, primary copy first
        dp_size = experts.dp_group.size()
        out: dict[str, Any] = {}
        done: set[int] = set()
        for k, slot in enumerate(handle.local_slots()):
            expert = int(row[slot])
            if expert < 0 or expert in done:
                continue
            done.add(expert)
            copy = int(np.flatnonzero(copies[expert] == slot)[0])
            entries = storage.slot_sharded_state_dict(
                k, expert, handle.num_experts, prefix, sharded_offsets, metadata
            )
            for key, sharded in entries.items():
                if copy > 0:  # replication over expert-DP ranks and over copies
                    pp, tp, dp = sharded.replica_id
                    sharded.replica_id = (pp, tp, dp + copy * dp_size)
                out[key] = sharded
        return out

    return sharded_state_dict


def _fill_same_rank_copies(handle: MegatronEPLB, idx: int, storage: ExpertStorage):
    """A load-state-dict pre-hook on the per-slot keys of a dist-checkpoint load (``{prefix}{slot_key(k, name)}``;
    a plain state dict of the module's own keys passes untouched): a slot whose keys are missing takes them
    from another local slot of the same expert (a second copy on one rank, left out of the sharded state
    dict); then the slots' tensors become the module's own entries (:meth:`ExpertStorage.state_entries`: the
    same keys where each slot has its own parameters, the stacked ``weight1`` / ``weight2`` of GroupedMLP)."""

    def fill(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        row = handle.placement.phy2log[idx]
        base = f"{prefix}{storage.key_prefix}"
        by_slot: dict[int, list[str]] = {}  # local slot -> its keys in state_dict
        for key in state_dict:
            if key.startswith(base):
                index, _, _ = key[len(base) :].partition(".")
                if index.isdigit():
                    by_slot.setdefault(int(index), []).append(key)
        if not by_slot:
            return
        source: dict[int, int] = {}  # logical expert -> a local slot whose keys are present
        for k, slot in enumerate(handle.local_slots()):
            if row[slot] >= 0 and k in by_slot:
                source.setdefault(int(row[slot]), k)
        for k, slot in enumerate(handle.local_slots()):
            if row[slot] < 0 or k in by_slot or int(row[slot]) not in source:
                continue
            src, dst = f"{base}{source[int(row[slot])]}.", f"{base}{k}."
            for key in by_slot[source[int(row[slot])]]:
                state_dict[dst + key[len(src) :]] = state_dict[key]
        names = storage.slot_param_names()
        keys = [[prefix + storage.slot_key(k, name) for name in names] for k in range(storage.num_slots)]
        held = [k for k, slot in enumerate(handle.local_slots()) if row[slot] >= 0]
        if all(key in state_dict for k in held for key in keys[k]):  # else the load reports what is missing
            tensors = [
                [
                    state_dict.pop(key) if key in state_dict else sp.data
                    for key, sp in zip(ks, storage.slot_params(k))
                ]
                for k, ks in enumerate(keys)
            ]  # an empty slot (row -1) keeps what it holds
            state_dict.update({prefix + key: t for key, t in storage.state_entries(tensors).items()})

    return fill
