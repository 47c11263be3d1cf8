"""Expert placement: which logical expert each physical slot holds, and the expert-map JSON format.

Terms (used the same way everywhere): ``L`` MoE layers (dense layers are not counted), ``E`` logical
experts, ``N`` ranks of the expert-parallel group, ``P`` physical slots per layer (``P = E + R`` with ``R``
redundant slots), ``S = P / N`` slots per rank.  Slot ``s`` lives on rank ``s // S``.

The expert-map JSON is vllm-ascend's format (``layer_id`` counts MoE layers only; ``device_expert[k]`` is
the logical expert in local slot ``k``), with two optional keys of ours: ``num_logical_experts`` and
``expert_load`` (the ``[L, E]`` load the placement was planned from)::

    {"moe_layer_count": 1,
     "layer_list": [{"layer_id": 0, "device_count": 2,
                     "device_list": [{"device_id": 0, "device_expert": [7, 2, 0, 3, 5]},
                                     {"device_id": 1, "device_expert": [6, 1, 4, 7, 2]}]}]}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import ExpertMapError

__all__ = ["ExpertMapError", "ExpertPlacement", "build_log2phy"]


def build_log2phy(phy2log: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Invert a placement.

    Args:
        phy2log: int64 ``[L, P]``, logical expert of each physical slot (``-1`` = empty slot).
        num_experts: ``E``.
    Returns:
        log2phy: int64 ``[L, E, C]`` physical slots of each logical expert in ascending slot order,
            ``-1`` padded, ``C`` = the largest copy count (at least 1).
        replica_count: int64 ``[L, E]`` number of copies of each logical expert.
    """
    num_layers, num_slots = phy2log.shape
    valid = phy2log >= 0
    replica_count = np.zeros((num_layers, num_experts), dtype=np.int64)
    layer_idx = np.broadcast_to(np.arange(num_layers)[:, None], phy2log.shape)
    np.add.at(replica_count, (layer_idx[valid], phy2log[valid]), 1)
    max_copies = max(int(replica_count.max(initial=0)), 1)
    # Stable sort of slots by their expert gives, per expert, its slots in ascending order.
    key = np.where(valid, phy2log, num_experts)
    order = np.argsort(key, axis=1, kind="stable")
    sorted_experts = np.take_along_axis(key, order, axis=1)
    starts = np.zeros((num_layers, num_experts + 1), dtype=np.int64)
    starts[:, 1:] = np.cumsum(replica_count, axis=1)
    rank_in_expert = np.arange(num_slots)[None, :] - np.take_along_axis(
        starts, np.minimum(sorted_experts, num_experts), axis=1
    )
    log2phy = np.full((num_layers, num_experts + 1, max_copies), -1, dtype=np.int64)
    keep = sorted_experts < num_experts
    rows = np.broadcast_to(np.arange(num_layers)[:, None], order.shape)
    log2phy[rows[keep], sorted_experts[keep], rank_in_expert[keep]] = order[keep]
    return log2phy[:, :num_experts], replica_count


class ExpertPlacement:
    """Which logical expert each physical slot holds, for every MoE layer.

    Attributes:
        phy2log: int64 ``[L, P]``; ``-1`` marks an empty slot (allowed only on excluded ranks, i.e. ranks
            all of whose slots are empty in every layer).
        log2phy: int64 ``[L, E, C]`` slots of each expert, ``-1`` padded (derived).
        replica_count: int64 ``[L, E]`` copies of each expert (derived).
        num_ranks, num_experts, num_layers, num_slots, slots_per_rank, num_redundant.
        expert_load: optional float64 ``[L, E]``, the load this placement was planned from.
    """

    def __init__(
        self,
        phy2log: np.ndarray | Sequence,
        num_ranks: int,
        num_experts: int,
        *,
        expert_load: np.ndarray | None = None,
        allow_same_rank_copies: bool = False,
        validate: bool = True,
        num_experts_inferred: bool = False,
    ) -> None:
        if hasattr(phy2log, "detach"):  # torch tensor
            phy2log = phy2log.detach().cpu().numpy()
        arr = np.asarray(phy2log)
        if arr.ndim != 2:
            raise ExpertMapError(f"phy2log must be 2-D [layers, slots], got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            if not np.all(np.equal(np.mod(arr, 1), 0)):
                raise ExpertMapError("phy2log must hold integer expert ids")
        self.phy2log = np.ascontiguousarray(arr, dtype=np.int64)
        self.phy2log.setflags(write=False)
        self.num_ranks = int(num_ranks)
        self.num_experts = int(num_experts)
        self.allow_same_rank_copies = bool(allow_same_rank_copies)
        self.num_experts_inferred = bool(num_experts_inferred)
        self.expert_load = None if expert_load is None else np.asarray(expert_load, dtype=np.float64)
        if validate:
            self.validate()
        self.log2phy, self.replica_count = build_log2phy(self.phy2log, self.num_experts)
        self.log2phy.setflags(write=False)
        self.replica_count.setflags(write=False)

    # ------------------------------------------------------------------ shape
    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.num_ranks

    @property
    def num_redundant(self) -> int:
        return self.num_slots - self.num_experts

    @property
    def excluded_ranks(self) -> tuple[int, ...]:
        """Ranks whose slots are empty in every layer (failed or excluded GPUs)."""
        per_rank = self.phy2log.reshape(self.num_layers, self.num_ranks, self.slots_per_rank)
        return tuple(int(r) for r in np.nonzero((per_rank < 0).all(axis=(0, 2)))[0])

    def rank_of_slot(self) -> np.ndarray:
        """int64 ``[P]``: the rank each physical slot lives on."""
        return np.arange(self.num_slots) // self.slots_per_rank

    def primary_slots(self) -> np.ndarray:
        """bool ``[L, P]``: slot ``s`` holds the first copy (``log2phy[l, e, 0]``) of its expert.

        The one rule for "each logical expert once": its first copy is the one counted in the gradient
        norm and saved in logical checkpoints; the other copies hold identical values."""
        out = np.zeros(self.phy2log.shape, dtype=bool)
        first = self.log2phy[:, :, 0]
        layers = np.broadcast_to(np.arange(self.num_layers)[:, None], first.shape)
        valid = first >= 0
        out[layers[valid], first[valid]] = True
        return out

    def local_phy2log(self, rank: int) -> np.ndarray:
        """int64 ``[L, S]``: the experts held by ``rank``'s local slots."""
        s = self.slots_per_rank
        return self.phy2log[:, rank * s : (rank + 1) * s]

    # ------------------------------------------------------------ constructors
    @classmethod
    def default(
        cls, num_layers: int, num_experts: int, num_ranks: int, num_redundant: int = 0
    ) -> ExpertPlacement:
        """vllm-ascend's start layout: per layer ``concat(arange(E), arange(R) % E)``, slots in rank order."""
        if num_layers < 1 or num_experts < 1 or num_ranks < 1 or num_redundant < 0:
            raise ExpertMapError(
                f"invalid default placement: num_layers={num_layers}, num_experts={num_experts}, "
                f"num_ranks={num_ranks}, num_redundant={num_redundant}"
            )
        total = num_experts + num_redundant
        if total % num_ranks:
            raise ExpertMapError(
                f"{num_experts} experts + {num_redundant} redundant slots = {total} slots do not divide "
                f"over {num_ranks} ranks; choose num_redundant in {nearest_valid_redundancy(num_experts, num_ranks, num_redundant)}"
            )
        row = np.concatenate([np.arange(num_experts), np.arange(num_redundant) % num_experts])
        phy2log = np.tile(row, (num_layers, 1))
        placement = cls(phy2log, num_ranks, num_experts, validate=False)
        # The default layout may put a redundant copy on the rank that already holds its expert; that is
        # the documented start layout, so accept it instead of rejecting the user's configuration.
        placement.allow_same_rank_copies = True
        placement.validate()
        return placement

    # ---------------------------------------------------------------- checks
    def validate(
        self,
        *,
        num_layers: int | None = None,
        num_experts: int | None = None,
        num_ranks: int | None = None,
        slots_per_rank: int | None = None,
        allow_same_rank_copies: bool | None = None,
    ) -> ExpertPlacement:
        """Raise :class:`ExpertMapError` naming the first problem (layer/rank/slot); return ``self``.

        Optional arguments are what the model expects; a mismatch is an error.
        """
        p = self.phy2log
        num_layers_here, num_slots = p.shape
        if num_layers is not None and num_layers_here != num_layers:
            raise ExpertMapError(f"the map has {num_layers_here} MoE layers but the model has {num_layers}")
        if num_experts is not None and self.num_experts != num_experts:
            if self.num_experts_inferred:
                top = int(p.max())
                why = (
                    f"so experts {self.num_experts}..{num_experts - 1} have no copy in it"
                    if num_experts > self.num_experts
                    else f"which is out of range [0, {num_experts})"
                )
                raise ExpertMapError(
                    f"the map is for {self.num_experts} logical experts but the model has {num_experts}: the map "
                    f"does not say num_logical_experts and its highest expert id is {top}, {why}"
                )
            raise ExpertMapError(
                f"the map is for {self.num_experts} logical experts but the model has {num_experts}"
            )
        if num_ranks is not None and self.num_ranks != num_ranks:
            raise ExpertMapError(
                f"the map is for {self.num_ranks} ranks (devices) but the expert-parallel size is {num_ranks}"
            )
        if num_layers_here < 1:
            raise ExpertMapError("the map has no layers")
        if self.num_ranks < 1 or self.num_experts < 1:
            raise ExpertMapError(
                f"num_ranks={self.num_ranks} and num_experts={self.num_experts} must be >= 1"
            )
        if num_slots % self.num_ranks:
            raise ExpertMapError(
                f"{num_slots} slots per layer do not divide equally over {self.num_ranks} ranks"
            )
        spr = num_slots // self.num_ranks
        if slots_per_rank is not None and spr != slots_per_rank:
            raise ExpertMapError(f"the map has {spr} slots per rank but the model has {slots_per_rank}")
        bad = np.argwhere((p < -1) | (p >= self.num_experts))
        if len(bad):
            layer, slot = (int(v) for v in bad[0])
            raise ExpertMapError(
                f"layer {layer} rank {slot // spr} slot {slot % spr}: expert id {int(p[layer, slot])} is out "
                f"of range [0, {self.num_experts})"
            )
        per_rank = p.reshape(num_layers_here, self.num_ranks, spr)
        empty = per_rank < 0
        excluded = empty.all(axis=(0, 2))
        if excluded.all():
            raise ExpertMapError("every rank is empty: nothing holds an expert")
        stray = np.argwhere(empty & ~excluded[None, :, None])
        if len(stray):
            layer, rank, k = (int(v) for v in stray[0])
            raise ExpertMapError(
                f"layer {layer} rank {rank} slot {k}: empty slot (-1) on a rank that holds experts; empty "
                f"slots are allowed only on excluded ranks (all of whose slots are empty)"
            )
        counts = np.zeros((num_layers_here, self.num_experts), dtype=np.int64)
        valid = p >= 0
        np.add.at(counts, (np.nonzero(valid)[0], p[valid]), 1)
        missing = np.argwhere(counts == 0)
        if len(missing):
            layer, expert = (int(v) for v in missing[0])
            hint = (
                f" (the map does not say num_logical_experts: {self.num_experts} experts inferred from its highest "
                f"expert id {self.num_experts - 1}; is that id a typo?)"
                if self.num_experts_inferred
                else ""
            )
            raise ExpertMapError(f"layer {layer}: logical expert {expert} has no copy on any rank{hint}")
        allow = self.allow_same_rank_copies if allow_same_rank_copies is None else allow_same_rank_copies
        if not allow and spr <= self.num_experts:
            sorted_ranks = np.sort(per_rank, axis=2)
            dup = (sorted_ranks[:, :, 1:] == sorted_ranks[:, :, :-1]) & (sorted_ranks[:, :, 1:] >= 0)
            where = np.argwhere(dup)
            if len(where):
                layer, rank, _ = (int(v) for v in where[0])
                expert = int(sorted_ranks[layer, rank, where[0][2] + 1])
                k = int(np.nonzero(per_rank[layer, rank] == expert)[0][1])
                raise ExpertMapError(
                    f"layer {layer} rank {rank} slot {k}: a second copy of expert {expert} on the same rank "
                    f"(a replica there adds no capacity; pass allow_same_rank_copies=True to accept it)"
                )
        if self.expert_load is not None and self.expert_load.shape != (num_layers_here, self.num_experts):
            raise ExpertMapError(
                f"expert_load has shape {list(self.expert_load.shape)}, expected "
                f"[{num_layers_here}, {self.num_experts}]"
            )
        if self.expert_load is not None:
            bad = np.argwhere(~np.isfinite(self.expert_load) | (self.expert_load < 0))
            if len(bad):
                layer, expert = (int(v) for v in bad[0])
                raise ExpertMapError(
                    f"expert_load[{layer}, {expert}] = {float(self.expert_load[layer, expert])}: loads must be finite "
                    "and >= 0"
                )
        return self

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        """The expert-map JSON object (vllm-ascend format plus our optional keys)."""
        spr = self.slots_per_rank
        layers = []
        for layer in range(self.num_layers):
            devices = [
                {
                    "device_id": r,
                    "device_expert": [int(x) for x in self.phy2log[layer, r * spr : (r + 1) * spr]],
                }
                for r in range(self.num_ranks)
            ]
            layers.append({"layer_id": layer, "device_count": self.num_ranks, "device_list": devices})
        out: dict = {"moe_layer_count": self.num_layers, "layer_list": layers}
        out["num_logical_experts"] = self.num_experts
        if self.expert_load is not None:
            out["expert_load"] = [[_num(x) for x in row] for row in self.expert_load]
        return out

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Serialise to the expert-map JSON; write it to ``path`` (atomically) when given. Returns the text."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            path = Path(path)
            if path.is_dir():
                raise ExpertMapError(
                    f"{str(path)!r} is a directory; give the map a file name (e.g. {str(path / 'expert_map.json')!r})"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
            try:
                tmp.write_text(text)
                os.replace(tmp, path)
            finally:
                if tmp.exists():
                    tmp.unlink()
        return text

    @classmethod
    def from_dict(
        cls, data: dict, *, allow_same_rank_copies: bool = False, source: str = "expert map"
    ) -> ExpertPlacement:
        if not isinstance(data, dict):
            raise ExpertMapError(f"{source}: expected a JSON object, got {type(data).__name__}")
        for key in ("moe_layer_count", "layer_list"):
            if key not in data:
                raise ExpertMapError(f"{source}: missing key {key!r}")
        layer_list = data["layer_list"]
        if not isinstance(layer_list, list) or not layer_list:
            raise ExpertMapError(f"{source}: 'layer_list' must be a non-empty list")
        if data["moe_layer_count"] != len(layer_list):
            raise ExpertMapError(
                f"{source}: moe_layer_count is {data['moe_layer_count']} but layer_list has {len(layer_list)} layers"
            )
        layers = sorted(layer_list, key=lambda d: d.get("layer_id", -1) if isinstance(d, dict) else -1)
        rows = []
        num_ranks = None
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict) or layer.get("layer_id") != i:
                raise ExpertMapError(
                    f"{source}: layer ids must be 0..{len(layers) - 1}; layer entry {i} is {layer!r:.80}"
                )
            devices = layer.get("device_list")
            if not isinstance(devices, list) or not devices:
                raise ExpertMapError(f"{source}: layer {i}: 'device_list' must be a non-empty list")
            if layer.get("device_count", len(devices)) != len(devices):
                raise ExpertMapError(
                    f"{source}: layer {i}: device_count is {layer.get('device_count')} but device_list has {len(devices)}"
                )
            num_ranks = len(devices) if num_ranks is None else num_ranks
            if len(devices) != num_ranks:
                raise ExpertMapError(
                    f"{source}: layer {i} has {len(devices)} devices, layer 0 has {num_ranks}"
                )
            devices = sorted(devices, key=lambda d: d.get("device_id", -1) if isinstance(d, dict) else -1)
            row = []
            for r, dev in enumerate(devices):
                if not isinstance(dev, dict) or dev.get("device_id") != r:
                    raise ExpertMapError(f"{source}: layer {i}: device ids must be 0..{num_ranks - 1}")
                experts = dev.get("device_expert")
                if not isinstance(experts, list) or not all(
                    isinstance(x, int) and not isinstance(x, bool) for x in experts
                ):
                    raise ExpertMapError(
                        f"{source}: layer {i} rank {r}: 'device_expert' must be a list of integers"
                    )
                if row and len(experts) != len(row[0]):
                    raise ExpertMapError(
                        f"{source}: layer {i} rank {r} has {len(experts)} slots, rank 0 has {len(row[0])}: "
                        "every rank needs the same number of slots"
                    )
                row.append(experts)
            rows.append([x for dev in row for x in dev])
        widths = {len(r) for r in rows}
        if len(widths) != 1:
            raise ExpertMapError(f"{source}: layers have different slot counts {sorted(widths)}")
        phy2log = np.asarray(rows, dtype=np.int64)
        load = data.get("expert_load")
        if load is not None:
            try:
                load = np.asarray(load, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise ExpertMapError(f"{source}: expert_load is not a numeric [L, E] array") from exc
        num_experts = data.get("num_logical_experts")
        inferred = num_experts is None
        if inferred and load is not None and load.ndim == 2 and load.shape[1] >= 1:
            num_experts, inferred = int(load.shape[1]), False  # the load's [L, E] says how many experts
        elif inferred:
            num_experts = int(phy2log.max()) + 1
        elif isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ExpertMapError(
                f"{source}: num_logical_experts must be a positive integer, got {num_experts!r}"
            )
        try:
            return cls(
                phy2log,
                num_ranks,
                num_experts,
                expert_load=load,
                allow_same_rank_copies=allow_same_rank_copies,
                num_experts_inferred=inferred,
            )
        except ExpertMapError as exc:
            raise ExpertMapError(f"{source}: {exc}") from None

    @classmethod
    def from_json(
        cls,
        path_or_text: str | os.PathLike,
        *,
        allow_same_rank_copies: bool = False,
        source: str | None = None,
    ) -> ExpertPlacement:
        """Read an expert map from a file path or from JSON text (``source`` names the text in errors)."""
        if source is not None and isinstance(path_or_text, str):
            text = path_or_text
        elif isinstance(path_or_text, str) and path_or_text.lstrip().startswith("{"):
            text, source = path_or_text, "expert map"
        else:
            path = Path(path_or_text)
            if not path.is_file():
                raise ExpertMapError(
                    f"expert map {str(path)!r} does not exist; record one first by running with "
                    "expert_map_record_path set (or `megatron-eplb plan ... --out MAP.json`)"
                )
            text, source = path.read_text(), str(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ExpertMapError(f"{source}: malformed JSON ({exc})") from None
        return cls.from_dict(data, allow_same_rank_copies=allow_same_rank_copies, source=source)

    # ----------------------------------------------------------------- misc
    def with_load(self, expert_load: np.ndarray | None) -> ExpertPlacement:
        """A copy carrying ``expert_load`` ``[L, E]``."""
        return ExpertPlacement(
            self.phy2log,
            self.num_ranks,
            self.num_experts,
            expert_load=expert_load,
            allow_same_rank_copies=True,
            validate=False,
        )

    def select_layers(self, layers: slice | list[int]) -> ExpertPlacement:
        """The placement of some of its layers (``phy2log [L, P]`` -> ``[L', P]``; ``layers`` a slice or layer
        ids), their rows taken as they are (unchecked: rows of a checked map), without ``expert_load``."""
        return ExpertPlacement(
            self.phy2log[layers],
            self.num_ranks,
            self.num_experts,
            allow_same_rank_copies=True,
            validate=False,
        )

    def with_layers(self, layers: slice | list[int], rows: ExpertPlacement) -> ExpertPlacement:
        """A copy with the layers ``layers`` replaced by ``rows`` (a placement of those layers, as
        :meth:`select_layers` cuts them), checked like a whole map (copies of one expert on one rank allowed),
        without ``expert_load``."""
        phy2log = self.phy2log.copy()
        phy2log[layers] = rows.phy2log
        return ExpertPlacement(phy2log, self.num_ranks, self.num_experts, allow_same_rank_copies=True)

    def with_layer(self, layer: int, phy2log_row: np.ndarray) -> ExpertPlacement:
        """A copy with layer ``layer``'s row replaced by ``phy2log_row`` (``[P]``), validated like the whole map.

        Raises:
            ExpertMapError: ``layer`` out of range, a row of another length, or a row the map rejects.
        """
        if not 0 <= layer < self.num_layers:
            raise ExpertMapError(f"layer {layer} out of range [0, {self.num_layers})")
        row = np.asarray(phy2log_row, dtype=np.int64).reshape(-1)
        if row.shape[0] != self.num_slots:
            raise ExpertMapError(
                f"layer {layer}: phy2log row has {row.shape[0]} slots, the model has {self.num_slots}"
            )
        phy2log = self.phy2log.copy()
        phy2log[layer] = row
        try:
            return ExpertPlacement(
                phy2log,
                self.num_ranks,
                self.num_experts,
                expert_load=self.expert_load,
                allow_same_rank_copies=self.allow_same_rank_copies,
            )
        except ExpertMapError as exc:
            raise ExpertMapError(f"layer {layer}: {exc}") from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExpertPlacement):
            return NotImplemented
        return (
            self.num_ranks == other.num_ranks
            and self.num_experts == other.num_experts
            and np.array_equal(self.phy2log, other.phy2log)
        )

    __hash__ = None  # mutable-looking container; compare with ==

    def __repr__(self) -> str:
        return (
            f"ExpertPlacement(layers={self.num_layers}, experts={self.num_experts}, ranks={self.num_ranks}, "
            f"slots_per_rank={self.slots_per_rank}, redundant={self.num_redundant})"
        )


def nearest_valid_redundancy(num_experts: int, num_ranks: int, wanted: int) -> list[int]:
    """The redundancy values closest to ``wanted`` for which ``(E + R) % N == 0`` (R >= 0)."""
    below = wanted - ((num_experts + wanted) % num_ranks)
    above = below + num_ranks
    return [r for r in (below, above) if r >= 0]


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)
