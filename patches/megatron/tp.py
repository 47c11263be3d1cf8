"""Seam: tensor parallelism (TP > 1 for attention and dense layers, expert TP = 1) outside Megatron's own DDP.

Megatron-core's ``finalize_model_grads`` does two TP jobs that a wrapper around a Megatron model (DeepSpeed)
must do itself, and a logical checkpoint needs a third:

* :func:`tp_replicated_params` / :func:`allreduce_tp_replicated_grads`: parameters kept whole on every TP
  rank whose gradients differ per TP rank (with sequence parallelism the layernorms and the router see only
  this rank's part of the sequence; q/k layernorms) are summed (or averaged) over the TP group, as
  ``_allreduce_non_tensor_model_parallel_grads`` does;
* :func:`counted_once`: a parameter counts once in a gradient norm summed over the TP group (the
  TP-sharded ones on every rank, the replicated ones on TP rank 0), as Megatron's
  ``param_is_not_tensor_parallel_duplicate``;
* :class:`SequenceParallelTorchNorm` / :func:`sequence_parallel_block_spec`: without Apex or Transformer
  Engine Megatron's only norm (``WrappedTorchNorm``) refuses sequence parallelism; this torch norm marks its
  parameters ``sequence_parallel`` as Apex's ``FusedLayerNorm`` does, so their gradients are summed over TP;
* :func:`gather_tp` / :func:`shard_tp`: a TP-sharded tensor (a weight or its optimizer state) as the model
  without TP has it and back, along the parameter's ``partition_dim`` with its ``partition_stride`` (2 for a
  gated MLP's ``linear_fc1``), so logical checkpoints load across TP sizes.

Expert parameters are never TP-sharded here (expert TP = 1 is checked by ``apply``).  Collective calls say so.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_eplb.comm import collective_device
from megatron_eplb.gradients import param_grad

__all__ = [
    "SequenceParallelTorchNorm",
    "allreduce_tp_replicated_grads",
    "counted_once",
    "gather_dense_state",
    "gather_tp",
    "is_tp_sharded",
    "routes_own_tokens",
    "sequence_parallel_block_spec",
    "shard_dense_state",
    "shard_tp",
    "tp_group",
    "tp_replicated_params",
    "tp_size",
]


def tp_group():
    """Megatron's tensor-parallel group, or None when TP = 1 (or Megatron's parallel state is not set up)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() == 1:
        return None
    return ps.get_tensor_model_parallel_group()


def tp_size() -> int:
    """The tensor-parallel size (1 without Megatron's parallel state)."""
    group = tp_group()
    return 1 if group is None else dist.get_world_size(group)


def is_tp_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is split over the TP group (Megatron's ``tensor_model_parallel`` attribute)."""
    return bool(getattr(p, "tensor_model_parallel", False))


def counted_once(p: torch.Tensor, group=None) -> bool:
    """Whether ``p`` counts on this rank in a sum over the TP group (sharded: every rank; else TP rank 0)."""
    group = tp_group() if group is None else group
    return group is None or is_tp_sharded(p) or dist.get_rank(group) == 0


def routes_own_tokens(layer: torch.nn.Module) -> bool:
    """Whether this rank's router (of MoE ``layer``) sees tokens no other rank of its TP group sees: TP = 1,
    sequence parallelism, or TP rank 0 (without sequence parallelism every TP rank routes the same tokens)."""
    if getattr(layer.config, "sequence_parallel", False):
        return True
    group = getattr(layer, "attn_tp_group", None) or tp_group()
    return group is None or dist.get_world_size(group) == 1 or dist.get_rank(group) == 0


def tp_replicated_params(model: torch.nn.Module, config=None) -> tuple[list, list]:
    """``(summed, averaged)``: the trainable parameters whose gradients are all-reduced over the TP group
    (sum: sequence-parallel ones and q/k layernorms; average: ``average_gradients_across_tp_domain``).
    Empty with TP = 1.  ``config``: the model's ``TransformerConfig`` (default ``model.config``)."""
    if tp_group() is None:
        return [], []
    config = config if config is not None else getattr(model, "config", None)
    sequence_parallel = bool(getattr(config, "sequence_parallel", False))
    qk_layernorm = bool(getattr(config, "qk_layernorm", False))
    summed, averaged = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "average_gradients_across_tp_domain", False):
            averaged.append(p)
        elif (sequence_parallel and getattr(p, "sequence_parallel", False)) or (
            qk_layernorm and ("q_layernorm" in name or "k_layernorm" in name)
        ):
            summed.append(p)
    return summed, averaged


def allreduce_tp_replicated_grads(summed: list, averaged: list, group=None) -> None:
    """All-reduce the gradients (``main_grad`` where Megatron keeps one, else ``grad``) of ``summed`` (sum) and
    ``averaged`` (mean) over the TP group, one flat buffer each.  Collective over the TP group."""
    group = tp_group() if group is None else group
    if group is None:
        return
    size = dist.get_world_size(group)
    for params, average in ((summed, False), (averaged, True)):
        grads = [g for g in (param_grad(p) for p in params) if g is not None]
        if not grads:
            continue
        device = collective_device(group)
        flat = torch.cat([g.reshape(-1).to(device) for g in grads])
        dist.all_reduce(flat, group=group)
        if average:
            flat.div_(size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


class SequenceParallelTorchNorm:
    """A torch ``LayerNorm`` / ``RMSNorm`` (Megatron's ``WrappedTorchNorm``) that allows sequence parallelism:
    its parameters are tagged ``sequence_parallel`` (gradients summed over the TP group, see
    :func:`tp_replicated_params`), as Apex's ``FusedLayerNorm`` tags them."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs) -> torch.nn.Module:
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization={config.normalization!r}; supported: LayerNorm, RMSNorm")
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm


def sequence_parallel_block_spec(layer_spec, num_layers: int):
    """A ``TransformerBlockSubmodules`` of ``num_layers`` copies of ``layer_spec`` (e.g.
    ``get_gpt_layer_local_spec(...)``) whose torch norms (input, pre-MLP, final) are
    :class:`SequenceParallelTorchNorm`: pass it as ``GPTModel(transformer_layer_spec=...)``."""
    import copy

    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    spec = copy.deepcopy(layer_spec)
    for field in ("input_layernorm", "pre_mlp_layernorm", "pre_cross_attn_layernorm"):
        if getattr(spec.submodules, field, None) is WrappedTorchNorm:
            setattr(spec.submodules, field, SequenceParallelTorchNorm)
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=SequenceParallelTorchNorm)


def gather_tp(p: torch.Tensor, local: torch.Tensor, group=None) -> torch.Tensor:
    """``local`` (shaped like ``p``'s TP shard: the weight or its optimizer state) as the model without TP has
    it: the shards of every TP rank joined along ``p.partition_dim`` with ``p.partition_stride``.  Unsharded
    parameters come back unchanged.  Collective over the TP group for a sharded ``p``."""
    group = tp_group() if group is None else group
    if group is None or not is_tp_sharded(p):
        return local
    dim, stride = int(p.partition_dim), int(getattr(p, "partition_stride", 1))
    device = collective_device(group)
    parts = [torch.empty_like(local, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous().to(device), group=group)
    parts = [t.to(local.device) for t in parts]
    if stride == 1:
        return torch.cat(parts, dim=dim)
    chunks = [t.chunk(stride, dim=dim) for t in parts]  # rank r holds chunks j*world + r, j < stride
    return torch.cat([c[j] for j in range(stride) for c in chunks], dim=dim)


def shard_tp(p: torch.Tensor, full: torch.Tensor, group=None) -> torch.Tensor:
    """This TP rank's shard of ``full`` (as :func:`gather_tp` returns it) for parameter ``p``.  Local."""
    group = tp_group() if group is None else group
    if group is None or not is_tp_sharded(p):
        return full
    dim, stride = int(p.partition_dim), int(getattr(p, "partition_stride", 1))
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    chunks = full.chunk(size * stride, dim=dim)
    return torch.cat([chunks[j * size + rank] for j in range(stride)], dim=dim).contiguous()


def gather_dense_state(model: torch.nn.Module, state: dict, skip: set[int]) -> dict:
    """``state`` (``model``'s own state dict) with every TP-sharded parameter not in ``skip`` (ids,
    e.g. the experts) joined over the TP group (:func:`gather_tp`).  Collective over the TP group."""
    for name, p in model.named_parameters():
        if name in state and id(p) not in skip and is_tp_sharded(p):
            state[name] = gather_tp(p, state[name])
    return state


def shard_dense_state(model: torch.nn.Module, state: dict, skip: set[int]) -> dict:
    """``state`` (a whole-model state dict, :func:`gather_dense_state`) with every TP-sharded parameter not in
    ``skip`` cut to this TP rank's shard (:func:`shard_tp`).  Local."""
    for name, p in model.named_parameters():
        if name in state and id(p) not in skip and is_tp_sharded(p) and torch.is_tensor(state[name]):
            state[name] = shard_tp(p, state[name])
    return state
