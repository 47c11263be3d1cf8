"""Load statistics: rank loads, balancedness, imbalance ratio, churn, similarity, load files.

Pure functions over numpy arrays (torch tensors are accepted and converted).  Shapes: ``L`` layers,
``E`` logical experts, ``P`` physical slots per layer, ``N`` ranks.

Balancedness of a layer = mean rank load / max rank load (1.0 is perfect); the two aggregates used in the
field are the mean over layers of that ratio and ``sum(mean) / sum(max)``.  The seeds' metric
``expert_load_balance_ratio`` is max / mean.  A logical expert's load splits evenly over its copies (the
default dispatch) unless measured per-slot loads are given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .placement import ExpertPlacement

__all__ = [
    "balancedness",
    "balance_summary",
    "expert_load_balance_ratio",
    "layers_to_replan",
    "load_similarity",
    "moved_slots",
    "moved_bytes",
    "rank_loads",
    "read_load_file",
    "realized_balance",
    "realized_steps",
    "slot_loads_from_logical",
    "update_baseline",
]


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def slot_loads_from_logical(phy2log: np.ndarray, load: np.ndarray) -> np.ndarray:
    """Split each logical expert's load evenly over its copies.

    Args:
        phy2log: int ``[L, P]`` (``-1`` = empty slot).
        load: float ``[L, E]`` tokens per logical expert.
    Returns:
        float64 ``[L, P]`` load of each physical slot (0 for empty slots).
    """
    phy2log = np.asarray(phy2log, dtype=np.int64)
    load = _np(load)
    if load.shape[0] != phy2log.shape[0]:
        raise ValueError(f"load has {load.shape[0]} layers, placement has {phy2log.shape[0]}")
    num_layers, num_experts = load.shape
    valid = phy2log >= 0
    rows = np.broadcast_to(np.arange(num_layers)[:, None], phy2log.shape)
    counts = np.zeros((num_layers, num_experts), dtype=np.float64)
    np.add.at(counts, (rows[valid], phy2log[valid]), 1.0)
    safe = np.where(valid, phy2log, 0)
    per_copy = np.divide(load, counts, out=np.zeros_like(load), where=counts > 0)
    return np.where(valid, np.take_along_axis(per_copy, safe, axis=1), 0.0)


def rank_loads(placement: ExpertPlacement, load: np.ndarray, *, per_slot: bool = False) -> np.ndarray:
    """Load of every rank.

    Args:
        placement: the placement (``[L, P]`` slots on ``N`` ranks).
        load: float ``[L, E]`` per logical expert (split evenly over copies), or with ``per_slot=True``
            measured ``[L, P]`` per physical slot.
    Returns:
        float64 ``[L, N]``.
    """
    slot_load = _np(load) if per_slot else slot_loads_from_logical(placement.phy2log, load)
    if slot_load.shape != placement.phy2log.shape:
        raise ValueError(
            f"slot load shape {slot_load.shape} does not match placement {placement.phy2log.shape}"
        )
    num_layers = slot_load.shape[0]
    return slot_load.reshape(num_layers, placement.num_ranks, placement.slots_per_rank).sum(axis=2)


def balancedness(rank_load: np.ndarray, active_ranks: np.ndarray | None = None) -> np.ndarray:
    """Per-layer balancedness = mean rank load / max rank load.

    Args:
        rank_load: float ``[L, N]``.
        active_ranks: optional bool ``[N]``; excluded ranks (no slots) do not count in the mean.
    Returns:
        float64 ``[L]``; a layer with no load is 1.0.
    """
    rank_load = _np(rank_load)
    if active_ranks is not None:
        rank_load = rank_load[:, np.asarray(active_ranks, dtype=bool)]
    mean = rank_load.mean(axis=1)
    peak = rank_load.max(axis=1)
    return np.divide(mean, peak, out=np.ones_like(mean), where=peak > 0)


def expert_load_balance_ratio(rank_load: np.ndarray) -> np.ndarray:
    """The seeds' per-layer imbalance: max rank load / mean rank load. ``[L, N]`` -> ``[L]`` (>= 1)."""
    rank_load = _np(rank_load)
    mean = rank_load.mean(axis=1)
    return np.divide(rank_load.max(axis=1), mean, out=np.ones_like(mean), where=mean > 0)


def balance_summary(placement: ExpertPlacement, load: np.ndarray, *, per_slot: bool = False) -> dict:
    """Balancedness of ``placement`` under ``load`` with both aggregates.

    Returns a dict: ``per_layer`` (list ``[L]``), ``mean`` (mean over layers of mean/max),
    ``sum_ratio`` (sum of means / sum of maxes), ``max_over_mean`` (mean over layers of max/mean).
    """
    rl = rank_loads(placement, load, per_slot=per_slot)
    active = np.ones(placement.num_ranks, dtype=bool)
    active[list(placement.excluded_ranks)] = False
    rl = rl[:, active]
    per_layer = balancedness(rl)
    peak = rl.max(axis=1).sum()
    return {
        "per_layer": per_layer.tolist(),
        "mean": float(per_layer.mean()),
        "sum_ratio": float(rl.mean(axis=1).sum() / peak) if peak > 0 else 1.0,
        "max_over_mean": float(expert_load_balance_ratio(rl).mean()),
    }


def moved_slots(old: ExpertPlacement, new: ExpertPlacement) -> np.ndarray:
    """Churn per layer: slots of ``new`` whose expert is not already on that rank in ``old``.

    Slots that only change position within a rank are not moves; empty new slots never count.
    Returns int64 ``[L]``.
    """
    if old.phy2log.shape != new.phy2log.shape or old.num_ranks != new.num_ranks:
        raise ValueError(
            f"placements differ in shape: {old.phy2log.shape} on {old.num_ranks} ranks vs "
            f"{new.phy2log.shape} on {new.num_ranks} ranks"
        )
    num_layers = old.num_layers
    n, s = old.num_ranks, old.slots_per_rank
    e = max(old.num_experts, new.num_experts)
    held = np.zeros((num_layers, n, e + 1), dtype=bool)
    old_r = old.phy2log.reshape(num_layers, n, s)
    li, ri, _ = np.indices(old_r.shape)
    held[li, ri, np.where(old_r >= 0, old_r, e)] = True
    new_r = new.phy2log.reshape(num_layers, n, s)
    present = held[li, ri, np.where(new_r >= 0, new_r, e)]
    return ((~present) & (new_r >= 0)).sum(axis=(1, 2)).astype(np.int64)


def moved_bytes(old: ExpertPlacement, new: ExpertPlacement, bytes_per_slot: int) -> int:
    """Bytes a switch from ``old`` to ``new`` transfers (moved slots x bytes of one slot's tensors)."""
    return int(moved_slots(old, new).sum()) * int(bytes_per_slot)


def load_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-layer cosine similarity of two load matrices (xLLM's update test).

    Args: a, b: float ``[L, E]``. Returns float64 ``[L]``; 1.0 where either row is all zero.
    """
    a, b = _np(a), _np(b)
    if a.shape != b.shape:
        raise ValueError(f"load shapes differ: {a.shape} vs {b.shape}")
    dot = (a * b).sum(axis=1)
    norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.divide(dot, norm, out=np.ones_like(dot), where=norm > 0)


def layers_to_replan(load: np.ndarray, baseline: np.ndarray | None, threshold: float | None) -> list[int]:
    """xLLM's per-layer update test (``eplb_update_threshold``): the layers whose ``load [L, E]`` is less
    similar than ``threshold`` (:func:`load_similarity`) to ``baseline [L, E]``, the load at each layer's last
    update (:func:`update_baseline`); every layer without a threshold or a baseline."""
    if threshold is None or baseline is None:
        return list(range(load.shape[0]))
    similarity = load_similarity(load, baseline)
    return [int(layer) for layer in np.nonzero(similarity < threshold)[0]]


def update_baseline(baseline: np.ndarray | None, load: np.ndarray, layers: list[int]) -> np.ndarray:
    """:func:`layers_to_replan`'s baseline after the layers ``layers`` were updated from ``load [L, E]``: their
    rows replaced (in place), or the whole ``load`` (float64) the first time."""
    if baseline is None:
        return load.astype(np.float64).copy()
    baseline[layers] = load[layers]
    return baseline


def read_load_file(path: str | os.PathLike, *, keep_dense_rows: bool = False) -> np.ndarray:
    """Read a load heat map ``{"logical_count": [[...]]}`` (or an expert map with ``expert_load``), or one
    load of a file that holds several per model and domain (the OLMoE/Mixtral counts of
    ``real_traces/olmoe_routing_output``: ``FILE.json#MODEL/DOMAIN``, ``#MODEL/DOMAIN/top1`` for the top-1
    counts).

    All-zero rows are dense layers and are dropped (MoE layer ids count MoE layers only).
    Returns float64 ``[L, E]``.
    """
    text = str(path)
    selector = None
    if not Path(text).is_file() and "#" in text:
        text, selector = text.rsplit("#", 1)
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"load file {str(path)!r} does not exist")
    raw = path.read_bytes()
    if raw[:1] == b"\x80":  # pickle's protocol opcode: the OLMoE originals (real_traces/.../original_pkl)
        raise ValueError(
            f"{path} is a Python pickle; load files are JSON (pickles are not read: unpickling runs code). "
            "For the OLMoE/Mixtral counts use the lossless JSON conversion beside them, "
            "olmoe_mixtral_domain_expert_counts.json#MODEL/DOMAIN (e.g. #olmoe/arxiv, #mistral/github/top1)"
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a JSON text file (it is not UTF-8); load files are JSON") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed JSON ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("models"), dict):
        data = {"logical_count": _pick_model_load(data["models"], selector, path)}
    elif selector is not None:
        raise ValueError(
            f"{path}: holds one load; '#{selector}' selects within a file of several models only"
        )
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a JSON object with a 'logical_count' [layers, experts] array, got a "
            f"{type(data).__name__}"
        )
    key = "logical_count" if "logical_count" in data else "expert_load" if "expert_load" in data else None
    if key is None:
        raise ValueError(f"{path}: expected a 'logical_count' (or 'expert_load') [layers, experts] array")
    rows = data[key]
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise ValueError(f"{path}: {key} must be a list of rows (2-D [layers, experts])")
    widths = sorted({len(r) for r in rows})
    if len(widths) > 1:
        raise ValueError(
            f"{path}: {key} is ragged: its rows have {widths} entries; every layer needs one per expert"
        )
    bad = next(
        (
            (i, j, x)
            for i, r in enumerate(rows)
            for j, x in enumerate(r)
            if isinstance(x, bool) or not isinstance(x, (int, float))
        ),
        None,
    )
    if bad is not None:
        i, j, x = bad
        raise ValueError(f"{path}: {key}[{i}][{j}] = {x!r} is not a number")
    load = np.asarray(rows, dtype=np.float64)
    if load.ndim != 2 or load.size == 0:
        raise ValueError(f"{path}: {key} must be 2-D [layers, experts], got shape {list(load.shape)}")
    if not np.isfinite(load).all() or (load < 0).any():
        raise ValueError(f"{path}: {key} has negative or non-finite entries")
    if not keep_dense_rows:
        load = load[load.sum(axis=1) > 0]
    return load


def _pick_model_load(models: dict, selector: str | None, path: Path) -> list:
    """``counts[DOMAIN]`` (or ``counts_top1``) of ``models[MODEL]`` for ``selector`` ``MODEL/DOMAIN[/top1]``."""
    choices = [f"{m}/{d}" for m, v in models.items() if isinstance(v, dict) for d in (v.get("counts") or {})]
    example = f" (e.g. {path}#{choices[0]})" if choices else ""
    if selector is None:
        raise ValueError(
            f"{path} holds the loads of several models and domains; pick one as FILE#MODEL/DOMAIN{example}; "
            f"there: {', '.join(choices)}"
        )
    parts = selector.split("/")
    key = "counts_top1" if len(parts) == 3 and parts[2] == "top1" else "counts"
    model = models.get(parts[0]) if len(parts) in (2, 3) else None
    rows = (model.get(key) or {}).get(parts[1]) if isinstance(model, dict) else None
    if rows is None or (len(parts) == 3 and parts[2] != "top1"):
        top1 = [
            f"{m}/{d}/top1"
            for m, v in models.items()
            if isinstance(v, dict)
            for d in (v.get("counts_top1") or {})
        ]
        raise ValueError(
            f"{path}: no load '{selector}'; there: {', '.join(choices)}"
            + (f"; top-1 counts: {', '.join(top1)}" if top1 else "")
        )
    return rows


def realized_balance(
    placement: ExpertPlacement, default: ExpertPlacement, logical: np.ndarray, per_slot: np.ndarray
) -> dict | None:
    """Realized balancedness of ``k`` steps, each on its own, beside ``default`` on the same routing.

    Args:
        placement: where the slots are (``per_slot``'s columns).
        default: the placement to compare with (Megatron's: ``ExpertPlacement.default(L, E, N, 0)``).
        logical: int ``[k, L, E]`` tokens per logical expert, per step.
        per_slot: int ``[k, L, P]`` tokens each slot computed, per step.
    Returns:
        ``eplb/balancedness_realized`` (mean over the steps of each step's mean-over-layers balancedness),
        ``eplb/balancedness_realized_min`` (the worst step), ``eplb/balancedness_default_placement`` (the
        mean for ``default``) and ``steps`` (steps with tokens); None when no step had tokens.
    """
    steps = [i for i in range(per_slot.shape[0]) if per_slot[i].sum()]
    if not steps:
        return None
    realized = [balance_summary(placement, per_slot[i], per_slot=True)["mean"] for i in steps]
    baseline = [balance_summary(default, logical[i])["mean"] for i in steps]
    return {
        "eplb/balancedness_realized": float(np.mean(realized)),
        "eplb/balancedness_realized_min": float(np.min(realized)),
        "eplb/balancedness_default_placement": float(np.mean(baseline)),
        "steps": len(steps),
    }


def realized_steps(
    placement: ExpertPlacement, logical: np.ndarray, per_slot: np.ndarray, last_step: int
) -> dict | None:
    """The realized balancedness of the ``k`` steps ending at ``last_step`` beside Megatron's default
    placement (``ExpertPlacement.default(L, E, N, 0)``) on the same steps' routing (routing does not depend on
    the placement): the manager's entry of every ``eplb_log_interval`` steps.

    Args:
        placement: where the slots are (``per_slot``'s columns).
        logical: int ``[k, L, E]`` tokens per logical expert, per step.
        per_slot: int ``[k, L, P]`` tokens each slot computed, per step.
        last_step: the step of ``per_slot[-1]``.
    Returns:
        ``first_step``, ``last_step`` and :func:`realized_balance`'s metrics; None when no step had tokens.
    """
    default = ExpertPlacement.default(placement.num_layers, placement.num_experts, placement.num_ranks, 0)
    metrics = realized_balance(placement, default, logical, per_slot)
    if metrics is None:
        return None
    return {"first_step": last_step - per_slot.shape[0] + 1, "last_step": last_step, **metrics}
