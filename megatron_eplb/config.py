"""EPLBConfig: every EPLB key, its default and meaning, validated in one place.

Seed keys keep their seed names (SwiftBalancer / xLLM); our own keys start with ``eplb_``.  Every key is
also a command-line flag: the key in kebab case (``--dynamic-eplb``, ``--eplb-policy``).

Sources, lowest to highest precedence: defaults, ds_config ``"eplb"`` section, YAML file
(``--eplb-config``), the seed-style JSON string (``--additional-config``), individual flags.
Unknown keys are errors that name the closest valid key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import EPLBConfigError, ExpertMapError
from .placement import ExpertPlacement, nearest_valid_redundancy
from .policy import NODE_LOCALITY, policy_names

__all__ = ["EPLBConfig", "EPLBConfigError", "add_eplb_args", "POLICIES", "REPLICA_DISPATCH", "CANARY"]  # noqa: F822
__all__ += ["CAPACITY", "CROSS_NODE_MIN_TOKENS"]

# The choice lists of the keys below.  Policy names come from the policy registry
# (megatron_eplb.policy.policy_names) and node-locality modes from megatron_eplb.policy.NODE_LOCALITY; the
# other two are defined here, once: every user (the Megatron patch, the CLI, the docs) reads them from here.
REPLICA_DISPATCH = ("even", "local_first", "balanced")  # how tokens of a replicated expert pick a copy
CANARY = ("sampled", "full", "off")  # eplb_transfer_canary
CAPACITY = ("logical", "per_slot")  # eplb_capacity (DeepSpeed MoE layers)

#: The default of ``eplb_fast_cross_node_min_tokens``.  A per-step copy fetched across nodes moves its weights
#: there and its gradient back: 2 x 3 h f x 2 bytes (bf16 gated MLP) at B bytes/s of inter-node link per GPU; a
#: token taken off the busiest rank saves 18 h f flop of forward and backward at C flop/s.  h f cancels: the
#: copy pays from 2 C / (3 B) tokens on (``fast_replicas.cross_node_break_even``), whatever the expert's size.
#: 400 TFLOP/s over 50 GB/s (a 400 Gb/s NIC per GPU) is 5333 tokens, 700 over 25 GB/s 18667; the fetch overlaps
#: the token dispatch, which hides part of it, so the default sits at the low end, rounded to a power of two.
CROSS_NODE_MIN_TOKENS = 4096


log = logging.getLogger("megatron_eplb")


def __getattr__(name: str):
    if name == "POLICIES":  # live: the registry, including policies registered after import
        return policy_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _key(default: Any, doc: str, **meta: Any) -> Any:
    return field(default=default, metadata={"doc": doc, **meta})


@dataclass
class EPLBConfig:
    """Expert-parallel load balancing settings (one object for training and inference)."""

    dynamic_eplb: bool = _key(False, "Rebalance while running (record, plan, move, commit).")
    num_iterations_eplb_update: int = _key(400, "Steps between rebalances.", min=1)
    num_wait_worker_iterations: int = _key(
        30,
        "Steps the policy worker gets before its plan is awaited (a step waits at most eplb_max_plan_wait for it).",
        min=0,
    )
    gate_eplb: bool = _key(False, "Rebalance only once, then keep that placement.")
    expert_map_path: str | None = _key(
        None,
        "Start from (static) placement in this expert-map JSON file (record one with expert_map_record_path).",
    )
    expert_map_record_path: str | None = _key(
        None,
        "Write the placement and the [L, E] load heat map here whenever a rebalance completes (a file other "
        "than expert_map_path).",
    )
    init_redundancy_expert: int = _key(
        0,
        "Redundant physical slots per layer at start (R); (num_experts + R) must divide by the EP size.",
        min=0,
    )
    eplb_update_interval: float | None = _key(
        None,
        "Seconds between rebalances (alternative to num_iterations_eplb_update; whichever comes first).",
        gt=0,
    )
    eplb_update_threshold: float | None = _key(
        None,
        "Re-plan a layer only if cosine similarity(new load, load at its last update) < threshold (None: every layer).",
        min=0,
        max=1,
    )
    eplb_policy: str = _key(
        "auto", "Placement policy: " + ", ".join(policy_names()) + ".", choices=policy_names
    )
    eplb_num_nodes: int = _key(1, "Nodes the EP group spans (node-aware placement when > 1).", min=1)
    eplb_num_groups: int = _key(1, "Expert groups (group-limited routing) for node-aware placement.", min=1)
    eplb_node_locality: str = _key(
        "relaxed",
        "Node-aware placement: 'strict' keeps every copy on its group's node, 'relaxed' only the primary copy.",
        choices=NODE_LOCALITY,
    )
    eplb_time_resolved: bool = _key(
        False,
        "Plan from the window's per-step loads, not only their sum: per layer the placement with the lowest "
        "expected busiest rank per step under the balanced split (policy/time_resolved.py); a re-plan of a "
        "stationary workload moves nothing.",
    )
    eplb_window_size: int = _key(100, "Steps of load kept in the sliding window the planner sees.", min=1)
    eplb_worker_timeout: float = _key(
        30.0,
        "Seconds after its submission a plan may still arrive (training goes on meanwhile) before this "
        "rebalance is dropped; a worker that misses this deadline twice in a row is killed and replaced.",
        gt=0,
    )
    eplb_max_plan_wait: float = _key(
        1.0,
        "Seconds the step at which the plan is due (num_wait_worker_iterations after planning started) may "
        "wait for it; a plan not there by then is taken at the first later step it is ready, on every rank at "
        "once, and training goes on meanwhile (0 = never wait; no wait after a missed deadline).",
        min=0,
    )
    eplb_layers_per_step: int = _key(1, "MoE layers transferred and committed per step.", min=1)
    eplb_churn_weight: float = _key(
        0.01,
        "Moves-vs-balance knob: a move must cut the hottest rank's load by at least this fraction of the mean "
        "rank load (0 = chase balance, larger = fewer moves).",
        min=0,
    )
    eplb_replica_dispatch: str = _key(
        "balanced",
        "How tokens of a replicated expert pick a copy: 'balanced' (per-batch shares: each batch's exact global "
        "counts, one small all-gather per MoE layer and forward, split so that the batch's busiest rank is as "
        "light as the placement allows), 'even' round-robin, or 'local_first' (a copy on the token's rank).",
        choices=REPLICA_DISPATCH,
    )
    eplb_split_align: int = _key(
        0,
        "Round the balanced dispatch's per-batch cut points between an expert's copies to multiples of this many "
        "tokens, so a copy computes whole row tiles of the grouped GEMM (an unaligned cut costs a partial tile; "
        "each cut moves at most half of this). 0: 128 where the experts are on CUDA, 1 (exact) elsewhere.",
        min=0,
    )
    eplb_fast_replicas: bool = _key(
        False,
        "Per-step replicas (the fast timescale): every MoE layer forward, eplb_fast_replica_budget spare slots per "
        "rank take copies of that step's hottest experts, chosen from its exact global counts with the balanced "
        "split; their weights are fetched from a holder rank (one all-to-all over the EP group) and their "
        "gradients summed back into the holder's before the optimizer step (no optimizer state). Needs "
        "eplb_replica_dispatch='balanced'; Megatron-core SequentialMLP or GroupedMLP experts.",
    )
    eplb_fast_replica_budget: int = _key(
        1,
        "Spare slots per rank for eplb_fast_replicas: at most this many expert copies fetched per rank, MoE "
        "layer and step.",
        min=1,
    )
    eplb_fast_cross_node_min_tokens: int = _key(
        CROSS_NODE_MIN_TOKENS,
        "With eplb_fast_replicas and eplb_num_nodes > 1: a spare copy whose rank's node holds no persistent copy "
        "of the expert (fetched across nodes, its gradient sent back the same way) is taken only when it takes at "
        "least this many more tokens off the step's busiest rank than the best copy inside a node holding the "
        "expert; else that in-node copy. Break-even 2C/(3B) tokens for C flop/s of expert compute and B bytes/s "
        "of inter-node link per GPU (400 TFLOP/s over 50 GB/s: 5333). 0 = copies go anywhere.",
        min=0,
    )
    eplb_capacity: str = _key(
        "logical",
        "Capacity of deepspeed.moe layers with replicas: 'logical' (the gate's capacity per logical expert: "
        "exactly the tokens the unpatched layer drops are dropped) or 'per_slot' (each physical slot its own "
        "capacity: copies of a hot expert drop fewer tokens; changes the math). Megatron-core layers: 'logical'.",
        choices=CAPACITY,
    )
    eplb_log_interval: int = _key(
        10,
        "Steps between the manager's metric logs: realized per-step balancedness beside Megatron's default "
        "placement on the same steps.",
        min=1,
    )
    eplb_trace_path: str | None = _key(
        None,
        "Record every step's token counts per MoE layer, expert and source rank to this .npz trace (written by "
        "rank 0 when the manager closes) for `megatron-eplb replay`.",
    )
    eplb_transfer_canary: str = _key(
        "off",
        "After each layer's transfer compare every moved slot's checksum with its sender's and roll the layer "
        "back on a mismatch: 'sampled' (a strided sample of 65536 words per tensor), 'full' (every byte), or "
        "'off' (failed or timed-out receives still roll back). On the H100 (docs/gpu_perf.md) steps that move a "
        "layer take about 1.1x a steady step with 'sampled', 1.03x with 'off' (the default).",
        choices=CANARY,
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, _check_value(f, getattr(self, f.name)))
        if self.expert_map_path is not None and not Path(self.expert_map_path).is_file():
            raise EPLBConfigError(
                f"expert_map_path={self.expert_map_path!r} does not exist; record a map first by running with "
                "expert_map_record_path set (or `megatron-eplb plan ... --out MAP.json`)"
            )
        if self.eplb_fast_replicas and self.eplb_replica_dispatch != "balanced":
            raise EPLBConfigError(
                f"eplb_fast_replicas=true splits each step's tokens over all copies with the per-batch shares, but "
                f"eplb_replica_dispatch={self.eplb_replica_dispatch!r}; set eplb_replica_dispatch='balanced' (the "
                "default) or eplb_fast_replicas=false"
            )
        if self.gate_eplb and not self.dynamic_eplb:
            raise EPLBConfigError(
                "gate_eplb=true rebalances once, but dynamic_eplb is false, so no rebalance runs; set "
                "dynamic_eplb=true (record mode: rebalance once and record the map) or drop gate_eplb"
            )
        record = self.expert_map_record_path
        if record is not None and Path(record).is_dir():
            raise EPLBConfigError(
                f"expert_map_record_path={record!r} is a directory; give the map a file name (e.g. "
                f"{str(Path(record) / 'expert_map.json')!r})"
            )
        if (
            record is not None
            and self.expert_map_path is not None
            and _same_file(record, self.expert_map_path)
        ):
            suggestion = Path(record).with_name(Path(record).stem + ".recorded.json")
            raise EPLBConfigError(
                f"expert_map_record_path and expert_map_path are the same file ({record!r}): the first rebalance "
                f"would overwrite the map this run starts from; record to another file (e.g. {str(suggestion)!r}, "
                "or one under the run's output directory)"
            )

    def notes(self) -> list[str]:
        """Settings that are valid together but do less than they may seem to (the manager logs them once)."""
        out = []
        if self.expert_map_record_path is not None and not self.dynamic_eplb:
            out.append(
                f"expert_map_record_path={self.expert_map_record_path!r} is set but dynamic_eplb is false: no "
                "rebalance runs, so the map is written only where the run records it itself (examples/train.py: at "
                "the end and on a stop), not during the run"
            )
        return out

    # --------------------------------------------------------------- sources
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(
        cls, data: dict[str, Any] | None, *, base: EPLBConfig | None = None, source: str = "config"
    ) -> EPLBConfig:
        """Build from a mapping; keys must be valid (an unknown key names the closest one)."""
        data = dict(data or {})
        _check_keys(data, source)
        merged = {**(dataclasses.asdict(base) if base is not None else {}), **data}
        try:
            return cls(**merged)
        except EPLBConfigError as exc:
            raise EPLBConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_json(cls, text: str, *, base: EPLBConfig | None = None) -> EPLBConfig:
        """The seed-style ``--additional-config`` JSON string, e.g. ``'{"dynamic_eplb": true}'``."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EPLBConfigError(f"--additional-config is not valid JSON ({exc}): {text!r:.120}") from None
        if not isinstance(data, dict):
            raise EPLBConfigError(f"--additional-config must be a JSON object, got {type(data).__name__}")
        if isinstance(data.get("eplb"), dict):
            data = data["eplb"]
        return cls.from_dict(data, base=base, source="--additional-config")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, *, base: EPLBConfig | None = None) -> EPLBConfig:
        """A Megatron-style YAML file: an ``eplb:`` section, or EPLB keys at the top level.

        Within an ``eplb:`` section every key must be valid.  At the top level, keys that belong to
        Megatron are ignored, but a key that looks like an EPLB key and is not one is an error.
        """
        import yaml

        path = Path(path)
        if not path.is_file():
            raise EPLBConfigError(f"EPLB config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise EPLBConfigError(f"{path}: malformed YAML ({exc})") from None
        if not isinstance(data, dict):
            raise EPLBConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
        if "eplb" in data:
            section = data["eplb"] or {}
            if not isinstance(section, dict):
                raise EPLBConfigError(f"{path}: the 'eplb' section must be a mapping")
            return cls.from_dict(section, base=base, source=str(path))
        known = set(cls.keys())
        picked = {}
        for key, value in data.items():
            if key in known:
                picked[key] = value
            elif _looks_like_eplb_key(str(key)):
                _check_keys({key: value}, str(path))
        return cls.from_dict(picked, base=base, source=str(path))

    @classmethod
    def from_ds_config(
        cls, ds_config: dict | str | os.PathLike | None, *, base: EPLBConfig | None = None
    ) -> EPLBConfig:
        """The ``"eplb"`` section of a DeepSpeed config (a dict or a JSON file path)."""
        if ds_config is None:
            return base if base is not None else cls()
        if not isinstance(ds_config, dict):
            path = Path(ds_config)
            if not path.is_file():
                raise EPLBConfigError(f"ds_config {str(path)!r} does not exist")
            ds_config = json.loads(path.read_text())
        section = ds_config.get("eplb", {}) or {}
        if not isinstance(section, dict):
            raise EPLBConfigError("ds_config: the 'eplb' section must be an object")
        return cls.from_dict(section, base=base, source="ds_config 'eplb'")

    @classmethod
    def from_args(cls, args: argparse.Namespace, ds_config: dict | str | None = None) -> EPLBConfig:
        """All sources with their precedence: defaults < ds_config < YAML < --additional-config < flags.

        A source that changes a value a lower one set is logged on rank 0, naming both: a warning when it
        switches a feature off (e.g. ``--no-dynamic-eplb`` over a YAML's ``dynamic_eplb: true``), else info."""
        origin: dict[str, str] = {}

        def layer(new: EPLBConfig, old: EPLBConfig, source: str) -> EPLBConfig:
            for key in cls.keys():
                before, after = getattr(old, key), getattr(new, key)
                if before != after:
                    if (
                        key in origin and _is_rank0()
                    ):  # switching a feature off is a warning, other values info
                        log.log(
                            logging.WARNING if before is True and after is False else logging.INFO,
                            "megatron-eplb: %s sets %s=%r over %r from %s (the higher-precedence source wins)",
                            source,
                            key,
                            after,
                            before,
                            origin[key],
                        )
                    origin[key] = source
            return new

        cfg = layer(cls.from_ds_config(ds_config), cls(), "ds_config 'eplb'")
        yaml_path = getattr(args, "eplb_config", None)
        if yaml_path:
            cfg = layer(cls.from_yaml(yaml_path, base=cfg), cfg, str(yaml_path))
        extra = getattr(args, "additional_config", None)
        if extra:
            cfg = layer(cls.from_json(extra, base=cfg), cfg, "--additional-config")
        flags = {k: getattr(args, k) for k in cls.keys() if getattr(args, k, None) is not None}
        return layer(cls.from_dict(flags, base=cfg, source="command-line flags"), cfg, "the command line")

    # ---------------------------------------------------------------- output
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes: Any) -> EPLBConfig:
        return self.from_dict(changes, base=self, source="replace()")

    # ------------------------------------------------------- model-dependent
    def validate_for(self, num_layers: int, num_experts: int, ep_size: int, num_nodes: int = 1) -> EPLBConfig:
        """Check what needs the model: redundancy divides, topology fits, a given map matches."""
        if self.expert_map_path is not None:  # the map fixes the redundancy
            try:
                ExpertPlacement.from_json(self.expert_map_path, allow_same_rank_copies=True).validate(
                    num_layers=num_layers, num_experts=num_experts, num_ranks=ep_size
                )
            except ExpertMapError as exc:
                raise EPLBConfigError(f"expert_map_path={self.expert_map_path!r}: {exc}") from None
            given = ExpertPlacement.from_json(self.expert_map_path, allow_same_rank_copies=True).num_redundant
            if self.init_redundancy_expert not in (0, given):
                raise EPLBConfigError(
                    f"init_redundancy_expert={self.init_redundancy_expert} but the map at expert_map_path="
                    f"{self.expert_map_path!r} has {given} redundant slots per layer (the map fixes the redundancy): "
                    "drop init_redundancy_expert or use a map planned for it"
                )
        r = self.init_redundancy_expert
        if self.expert_map_path is None and (num_experts + r) % ep_size:
            raise EPLBConfigError(
                f"init_redundancy_expert={r}: {num_experts} experts + {r} redundant = {num_experts + r} slots do "
                f"not divide over EP size {ep_size}; use one of {nearest_valid_redundancy(num_experts, ep_size, r)}"
            )
        nodes = max(num_nodes, self.eplb_num_nodes)
        if ep_size % nodes:
            raise EPLBConfigError(f"eplb_num_nodes={nodes} does not divide the EP size {ep_size}")
        if self.eplb_policy == "deepseek":
            return self  # DeepSeek's eplb.py plans globally where the groups do not fit the nodes (docs/policy.md)
        if num_experts % self.eplb_num_groups:
            raise EPLBConfigError(
                f"eplb_num_groups={self.eplb_num_groups} does not divide the {num_experts} experts "
                "(eplb_policy: deepseek plans globally then, as DeepSeek's eplb.py does)"
            )
        if self.eplb_num_groups > 1 and self.eplb_num_groups % nodes:
            raise EPLBConfigError(
                f"eplb_num_groups={self.eplb_num_groups} must be a multiple of eplb_num_nodes={nodes}"
            )
        return self


def _is_rank0() -> bool:
    """Rank 0 of an initialised process group, else of the launcher's ``RANK`` (0 without one)."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (the same inode when both exist, else the same resolved path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _looks_like_eplb_key(key: str) -> bool:
    k = key.lower().replace("-", "_")
    if any(t in k for t in ("eplb", "expert_map", "redundan")):
        return True
    return bool(difflib.get_close_matches(k, EPLBConfig.keys(), n=1, cutoff=0.85))


def _check_keys(data: dict, source: str) -> None:
    valid = EPLBConfig.keys()
    for key in data:
        if key not in valid:
            norm = str(key).replace("-", "_").lstrip("_")
            close = difflib.get_close_matches(norm, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
            raise EPLBConfigError(f"{source}: unknown EPLB key {key!r}{hint}")


def _choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    """A key's valid values (a tuple, or a function returning one: the policy registry), else None."""
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


def _check_value(f: dataclasses.Field, value: Any) -> Any:
    meta = f.metadata
    name = f.name
    kind = f.type if isinstance(f.type, str) else str(f.type)
    optional = "None" in kind
    if value is None:
        if optional:
            return None
        raise EPLBConfigError(f"{name} must not be None")
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise EPLBConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise EPLBConfigError(f"{name} must be an integer, got {value!r}")
    elif kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EPLBConfigError(f"{name} must be a number, got {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise EPLBConfigError(f"{name} must be finite, got {value!r}")
    elif kind.startswith("str"):
        if not isinstance(value, (str, os.PathLike)):
            raise EPLBConfigError(f"{name} must be a string, got {value!r}")
        value = os.fspath(value)
        choices = _choices(f)
        if choices is not None and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.4)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EPLBConfigError(f"{name}={value!r} is not one of {', '.join(choices)}{hint}")
        if not value:
            raise EPLBConfigError(f"{name} must not be empty")
    if "min" in meta and value < meta["min"]:
        raise EPLBConfigError(f"{name}={value!r} must be >= {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise EPLBConfigError(f"{name}={value!r} must be <= {meta['max']}")
    if "gt" in meta and value <= meta["gt"]:
        raise EPLBConfigError(f"{name}={value!r} must be > {meta['gt']}")
    return value


def add_eplb_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every EPLB key as a flag (``--dynamic-eplb``, ``--eplb-policy`` ...), plus ``--eplb-config FILE``
    and ``--additional-config JSON``.  Flags default to None so that only given flags override."""
    group = parser.add_argument_group("EPLB (expert-parallel load balancing)")
    for f in fields(EPLBConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        doc = f"{f.metadata['doc']} (default: {f.default})"
        if kind.startswith("bool"):
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=doc
            )
        elif kind.startswith("int"):
            group.add_argument(flag, dest=f.name, type=int, default=None, help=doc)
        elif kind.startswith("float"):
            group.add_argument(flag, dest=f.name, type=float, default=None, help=doc)
        else:
            group.add_argument(flag, dest=f.name, type=str, default=None, choices=_choices(f), help=doc)
    group.add_argument(
        "--eplb-config", dest="eplb_config", default=None, help="Megatron-style YAML with EPLB keys"
    )
    group.add_argument(
        "--additional-config",
        dest="additional_config",
        default=None,
        help="seed-style JSON string of EPLB keys",
    )
    return parser
