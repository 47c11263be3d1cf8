"""The policy registry: name -> planning function.  A new policy is one file in this package.

A policy module registers its planner with :func:`register_policy`::

    from .common import Problem
    from .registry import Plan, PolicyOptions, register_policy

    @register_policy("my_policy")
    def plan_my_policy(problem: Problem, previous, options: PolicyOptions) -> Plan:
        phy2log = ...  # int64 [L, P], -1 on excluded ranks
        return Plan(phy2log, policy="my_policy")

Every module of ``megatron_eplb.policy`` is imported when the package is (see its ``__init__``), so the new
name is at once a valid ``rebalance(..., policy="my_policy")``, ``eplb_policy`` config value and
``megatron-eplb plan --policy`` choice.  ``auto`` is not a registered policy: it names one of them by its
rules (:func:`megatron_eplb.policy.resolve_policy`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import PolicyError
from ..placement import ExpertPlacement
from .common import Problem

__all__ = [
    "AUTO",
    "Plan",
    "PolicyFn",
    "PolicyOptions",
    "check_policy_name",
    "get_policy",
    "policy_names",
    "register_policy",
]

AUTO = "auto"


@dataclass(frozen=True)
class PolicyOptions:
    """The checked policy options of :func:`megatron_eplb.policy.rebalance` (``**options``).

    Attributes:
        churn_weight: a low_churn move must cut the hottest rank's load by at least this fraction of the
            mean rank load.
        node_locality: ``"relaxed"`` or ``"strict"`` (node-aware placement).
        max_moves_per_layer: low_churn cap on moves per layer (None: no cap).
    """

    churn_weight: float = 0.01
    node_locality: str = "relaxed"
    max_moves_per_layer: int | None = None


@dataclass
class Plan:
    """What a policy returns.

    Attributes:
        phy2log: int64 ``[L, P]`` logical expert of each physical slot (``-1`` on excluded ranks).
        policy: the name reported in ``info["policy"]`` (e.g. ``"low_churn(fresh)"`` when there was nothing
            to start from, ``"greedy"`` when ``hierarchical`` fell back to global placement).
        locality: ``"none"``, ``"strict"`` or ``"relaxed"``: the node rule the placement keeps.
        home_node: int ``[L, E]`` home node of each expert (node-aware placements), else None.
        allow_duplicates: the placement may hold two copies of one expert on a rank.
        info: further entries of ``info`` (``fallback``, ``changed_layers``, ``replanned_layers``).
    """

    phy2log: np.ndarray
    policy: str
    locality: str = "none"
    home_node: np.ndarray | None = None
    allow_duplicates: bool = False
    info: dict = field(default_factory=dict)


PolicyFn = Callable[[Problem, ExpertPlacement | None, PolicyOptions], Plan]

_POLICIES: dict[str, PolicyFn] = {}


def register_policy(name: str) -> Callable[[PolicyFn], PolicyFn]:
    """Decorator: register ``fn(problem, previous, options) -> Plan`` under ``name``.

    Args:
        name: the policy's name (``rebalance(..., policy=name)``, ``eplb_policy``); not ``"auto"``.
    Raises:
        PolicyError: the name is ``auto``, empty, or taken by another function.
    """
    if not isinstance(name, str) or not name or name == AUTO:
        raise PolicyError(f"cannot register a policy named {name!r}")

    def decorator(fn: PolicyFn) -> PolicyFn:
        known = _POLICIES.get(name)
        if known is not None and _qualified(known) != _qualified(fn):
            raise PolicyError(
                f"policy {name!r} is already registered ({known.__module__}.{known.__qualname__})"
            )
        _POLICIES[name] = fn
        return fn

    return decorator


def _qualified(fn) -> tuple[str, str]:
    return getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn))


def policy_names() -> tuple[str, ...]:
    """Every valid ``policy=`` value: ``auto``, then the registered policies in registration order."""
    return (AUTO, *_POLICIES)


def check_policy_name(policy: str) -> str:
    """``policy`` if it is a valid name, else :class:`PolicyError` naming the closest one."""
    names = policy_names()
    if policy not in names:
        close = difflib.get_close_matches(str(policy), names, n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PolicyError(f"unknown policy {policy!r}: choose one of {', '.join(names)}{hint}")
    return policy


def get_policy(name: str) -> PolicyFn:
    """The planning function registered under ``name`` (not ``auto``: resolve it first)."""
    check_policy_name(name)
    if name == AUTO:
        raise PolicyError("policy 'auto' is resolved to a concrete policy before planning (resolve_policy)")
    return _POLICIES[name]
