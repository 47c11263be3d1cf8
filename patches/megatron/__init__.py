"""Placement-aware Megatron-core MoE layers, and CPU/gloo support for Megatron-core MoE.

Usage::

    from megatron_eplb.patches import megatron as eplb_mcore

    eplb_mcore.enable_cpu()                      # no-op where CUDA is available
    handle = eplb_mcore.apply(model, placement)  # after parallel_state is initialised, before the optimizer
    ...
    loss.backward()
    handle.sum_replica_grads()                   # copies of one expert take the same update
    optimizer.step()
    handle.loads()                               # [L, E] tokens routed per logical expert on this rank

What :func:`apply` changes in each ``MoELayer`` (MoE layer ids ``l`` count MoE layers only, in module order):

* the router stays logical (weight ``[E, H]``, aux losses, capacity, expert bias untouched);
* ``MoELayer.route`` is wrapped: it records the routed (token, expert) pairs (padding tokens excluded,
  activation-recompute re-runs skipped) into an int64 ``[L, E]`` buffer, then maps the logical
  ``[T, E]`` routing map and probabilities to the ``[T, P]`` physical slots: the pairs of an expert are
  split round-robin over its copies (``even``), go to a copy on this rank when there is one
  (``local_first``), or are split by per-batch shares from this batch's global counts, gathered over the EP
  group, so that the batch's busiest rank is as light as the placement allows (``balanced``,
  :mod:`megatron_eplb.replica_split`);
* the token dispatcher is rebuilt for ``P`` "experts" with ``S = P / EP`` local ones, and the experts
  module (``SequentialMLP``, or the legacy ``GroupedMLP`` whose stacked weights hold the slots as blocks) for
  ``S`` local slots whose weights are filled from their logical experts;
* a forward pre-hook on the experts module counts the tokens each local slot computes (``[L, S]``);
* the experts module's ``sharded_state_dict`` (Megatron dist checkpointing) gives the logical layout: each
  logical expert once, keyed and offset as the unpatched model keys it (the first copy is the saved main
  replica, copies on other ranks load it too); a load-state-dict pre-hook fills a second copy on one rank.
  So checkpoints load across placements, EP sizes and the unpatched model.

Supported: megatron-core 0.16–0.19, ``SequentialMLP`` and ``GroupedMLP`` experts (GroupedMLP without the
``grouped_gemm`` package: :func:`grouped_gemm.install` before building the model), ``allgather`` and
``alltoall`` dispatchers, TP >= 1 (sequence parallelism on or off) with expert-TP = 1, PP >= 1 through Megatron's
schedules (no virtual stages), dropless or capacity-dropping routers without padding to capacity.

One module per seam (a new expert class is one new file in ``experts/``; a new dispatcher is one entry in
``dispatchers.py``):

* ``compat.py``: megatron-core versions, version fixes (:func:`ensure_compat`), :class:`EPLBPatchError`;
* ``cpu.py``: :func:`enable_cpu` and its CPU/gloo shims;
* ``experts/``: expert storage, one module per expert class (``sequential.py``: ``SequentialMLP``;
  ``grouped.py``: ``GroupedMLP``);
* ``grouped_gemm.py``: :func:`grouped_gemm.install`, the ``grouped_gemm.ops.gmm`` drop-in on
  ``torch._grouped_mm``;
* ``unpatched.py``: :func:`unpatched_state_dict`, a logical checkpoint for a model without EPLB;
* ``dispatchers.py``: dispatcher adapters (allgather, alltoall) and :func:`route_to_slots`;
* ``dist_ckpt.py``: Megatron dist checkpointing in the logical layout;
* ``tp.py``: tensor parallelism outside Megatron's DDP (TP-replicated gradients, TP shards of checkpoints);
* ``pipeline.py``: pipeline stages (the stage's MoE layers among the model's, stage <-> whole-model names,
  ``finalize_grads`` for an unwrapped model);
* ``handle.py``: :class:`MegatronEPLB`, the model side (:class:`megatron_eplb.protocols.ExpertModel`);
* ``apply.py``: :func:`apply`, :func:`find_moe_layers` and the checks.
"""

from __future__ import annotations

from . import grouped_gemm
from . import pipeline as pipeline
from . import tp as tp
from .apply import REPLICA_DISPATCH as REPLICA_DISPATCH  # re-exported (not in __all__), as before the split
from .apply import apply, find_moe_layers
from .compat import SUPPORTED_MCORE_VERSIONS, EPLBPatchError, ensure_compat, mcore_version, model_facts
from .cpu import enable_cpu
from .dispatchers import SUPPORTED_DISPATCHERS
from .dispatchers import route_to_slots as route_to_slots
from .handle import MegatronEPLB
from .unpatched import unpatched_state_dict

__all__ = [
    "EPLBPatchError",
    "MegatronEPLB",
    "SUPPORTED_DISPATCHERS",
    "SUPPORTED_MCORE_VERSIONS",
    "apply",
    "enable_cpu",
    "ensure_compat",
    "find_moe_layers",
    "grouped_gemm",
    "mcore_version",
    "model_facts",
    "unpatched_state_dict",
]
