"""Pipeline stages: each stage holds some of the model's MoE layers, and layer ids stay global.

With pipeline parallelism (PP > 1) every stage has its own handle over its own MoE layers (local ids
``0..L_s-1``) and its own manager: it gathers, plans and moves only its layers, over the ranks of its stage.
What a user sees is global: MoE layer ``l`` of stage ``s`` is layer ``offset_s + l`` in expert maps,
checkpoints and metrics.  A handle of a pipeline-parallel model carries a :class:`PipelineStage` as
``handle.stage`` (None with PP = 1, which keeps every function here an identity).

The functions are pure except the ``gather`` ones, which are collective over the pipeline group (one rank per
stage, at the same position inside its stage; every rank of a stage holds the same placement).  No Megatron.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .placement import ExpertPlacement

__all__ = [
    "PipelineStage",
    "gather_layers",
    "gather_over_stages",
    "gather_steps",
    "global_placement",
    "max_over_world",
    "merge_stage_records",
    "round_summary",
    "stage_of",
    "stage_placement",
]


@dataclass(frozen=True)
class PipelineStage:
    """Where this rank's MoE layers sit among the whole model's.

    Attributes:
        group: the pipeline group of this rank (one rank per stage, in stage order).
        rank: this stage's index; size: the number of stages.
        layer_counts: ``[size]`` MoE layers of each stage, in stage order.
        stage_group: every rank of this stage (those that route tokens through its layers: the manager's
            default ``load_group``).
    """

    group: Any
    rank: int
    size: int
    layer_counts: tuple[int, ...]
    stage_group: Any = None

    @property
    def layer_offset(self) -> int:
        """The global id of this stage's first MoE layer."""
        return int(sum(self.layer_counts[: self.rank]))

    @property
    def num_layers(self) -> int:
        """This stage's MoE layers."""
        return int(self.layer_counts[self.rank])

    @property
    def total_layers(self) -> int:
        """The model's MoE layers over all stages."""
        return int(sum(self.layer_counts))


def stage_of(handle: Any) -> PipelineStage | None:
    """``handle.stage`` (None: PP = 1, or a handle without stages)."""
    return getattr(handle, "stage", None)


def stage_placement(placement: ExpertPlacement, stage: PipelineStage | None) -> ExpertPlacement:
    """This stage's rows of a whole-model ``placement`` (``phy2log [L, P]`` -> ``[L_s, P]``, its
    ``expert_load [L, E]`` likewise).  A placement that already has the stage's layer count (a map written
    for this stage alone) comes back unchanged, as does any placement with PP = 1."""
    if stage is None or placement.num_layers != stage.total_layers or stage.total_layers == stage.num_layers:
        return placement
    rows = slice(stage.layer_offset, stage.layer_offset + stage.num_layers)
    out = placement.select_layers(rows)
    if placement.expert_load is not None:
        out = out.with_load(np.asarray(placement.expert_load)[rows])
    return out


def gather_over_stages(value: Any, stage: PipelineStage | None) -> list[Any]:
    """``[size]``: every stage's ``value`` in stage order (``[value]`` with PP = 1).  Collective over
    ``stage.group``; ``value`` must pickle."""
    if stage is None or stage.size == 1:
        return [value]
    out: list[Any] = [None] * stage.size
    dist.all_gather_object(out, value, group=stage.group)
    return out


def gather_layers(stage: PipelineStage | None, *arrays: np.ndarray, axis: int = 0) -> tuple[np.ndarray, ...]:
    """Each of ``arrays`` (this stage's layers along ``axis``, e.g. ``[k, L_s, E]`` with ``axis=1``) joined
    over every stage in stage order (``[k, L, E]``).  Collective over ``stage.group``; with PP = 1 the arrays
    themselves."""
    if stage is None or stage.size == 1:
        return tuple(arrays)
    parts = gather_over_stages(tuple(np.asarray(a) for a in arrays), stage)
    return tuple(np.concatenate([p[i] for p in parts], axis=axis) for i in range(len(arrays)))


def gather_steps(
    stage: PipelineStage | None, placement: ExpertPlacement, logical: np.ndarray, per_slot: np.ndarray
) -> tuple[ExpertPlacement, np.ndarray, np.ndarray]:
    """Some steps' counts of every stage's layers (``logical [k, L_s, E]``, ``per_slot [k, L_s, P]`` ->
    ``[k, L, ...]``) and the whole model's placement (``phy2log [L_s, P]`` -> ``[L, P]``), in one gather.
    Collective over ``stage.group``; with PP = 1 the inputs themselves."""
    if stage is None:
        return placement, logical, per_slot
    logical, per_slot, phy2log = gather_layers(stage, logical, per_slot, placement.phy2log[None], axis=1)
    whole = ExpertPlacement(
        phy2log[0], placement.num_ranks, placement.num_experts, allow_same_rank_copies=True
    )
    return whole, logical, per_slot


def global_placement(
    placement: ExpertPlacement, stage: PipelineStage | None, load: np.ndarray | None = None
) -> ExpertPlacement:
    """The whole model's placement from every stage's rows (``phy2log [L_s, P]`` -> ``[L, P]``), with the
    ``[L, E]`` load where every stage gives one (``load [L_s, E]``, default the placement's own).  Collective
    over ``stage.group``; with PP = 1 the placement itself (with ``load``)."""
    load = placement.expert_load if load is None else load
    if stage is None or stage.size == 1:
        return placement.with_load(load) if load is not None else placement
    parts = gather_over_stages((placement.phy2log, None if load is None else np.asarray(load)), stage)
    out = ExpertPlacement(
        np.concatenate([p for p, _ in parts]),
        placement.num_ranks,
        placement.num_experts,
        allow_same_rank_copies=True,
    )
    if all(w is not None for _, w in parts):
        out = out.with_load(np.concatenate([w for _, w in parts]))
    return out


def max_over_world(value: int, device: torch.device | str = "cpu") -> int:
    """The largest ``value`` over every rank (collective over the world; the value itself without one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def round_summary(
    placement: ExpertPlacement, stage: PipelineStage, load: np.ndarray | None, record: dict | None
) -> tuple[ExpertPlacement, dict]:
    """At the end of a rebalance of every stage: the whole model's placement (with the ``[L, E]`` load every
    stage planned from, ``load [L_s, E]``) and its one record (:func:`merge_stage_records` of every stage's
    ``record``, a ``RebalanceRecord.as_dict()``; ``outcome`` ``"none"`` when no stage has one).  Collective
    over ``stage.group``."""
    whole = global_placement(placement, stage, load)
    records = gather_over_stages(record if record is not None else {"outcome": "none"}, stage)
    return whole, merge_stage_records(records, stage.layer_counts)


def merge_stage_records(records: list[dict[str, Any]], layer_counts: list[int] | tuple[int, ...]) -> dict:
    """One rebalance record (``RebalanceRecord.as_dict()``) of the whole model from one per stage (in stage
    order, ``layer_counts[s]`` MoE layers each): layer lists with global ids, moved slots and bytes summed,
    balancedness (a mean over layers) weighted by each stage's layer count, seconds the slowest stage's, the
    outcome ``committed`` when any stage committed (else the first stage's that has one; ``"none"`` marks a
    stage without a record).  Pure."""
    offsets = np.concatenate([[0], np.cumsum(layer_counts)[:-1]]).astype(int)
    out = dict(next((r for r in records if r.get("outcome", "none") != "none"), records[0]))
    for key in ("layers_planned", "layers_committed", "layers_rolled_back"):
        out[key] = [int(layer) + int(o) for r, o in zip(records, offsets) for layer in r.get(key, [])]
    for key in ("moved_slots", "moved_bytes"):
        out[key] = int(sum(r.get(key, 0) for r in records))
    weights = np.asarray(layer_counts, dtype=np.float64)
    for key in [k for k in out if k.startswith(("balancedness", "measured_balancedness", "old_placement"))]:
        values = np.asarray([r.get(key, float("nan")) for r in records], dtype=np.float64)
        ok = np.isfinite(values)
        out[key] = float((values[ok] * weights[ok]).sum() / weights[ok].sum()) if ok.any() else float("nan")
    seconds: dict[str, float] = {}
    for r in records:
        for phase, value in (r.get("seconds") or {}).items():
            seconds[phase] = max(seconds.get(phase, 0.0), float(value))
    out["seconds"] = seconds
    outcomes = [r.get("outcome") for r in records]
    out["outcome"] = (
        "committed" if "committed" in outcomes else next((o for o in outcomes if o != "none"), "none")
    )
    return out
