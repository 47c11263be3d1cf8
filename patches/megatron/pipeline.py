"""Seam: pipeline parallelism (PP > 1 through Megatron-core's pipeline schedules).

Each stage's model holds its transformer layers under stage-local module names (``decoder.layers.0`` is
global layer ``layer_number - 1``).  This module knows that naming and nothing else does:

* :func:`pipeline_stage`: the :class:`megatron_eplb.pipeline.PipelineStage` of a stage's MoE layers (MoE layer
  counts of every stage gathered over Megatron's pipeline group; collective), None with PP = 1;
* :func:`state_to_global` / :func:`state_to_stage`: a state dict (or any dict keyed by parameter name, e.g.
  the logical optimizer state) between the stage's names and the whole model's (the names of the model built
  with PP = 1), so logical checkpoints load across PP sizes; with tied word embeddings the last stage's copy
  (``output_layer.weight``, kept equal to the first stage's word embedding by Megatron) is not saved and is
  filled from ``embedding.word_embeddings.weight`` on load, as the model with PP = 1 has one tensor;
* :func:`finalize_grads`: what Megatron's ``finalize_model_grads`` does for a model that is not wrapped in
  Megatron's DDP (a plain torch optimizer loop): dense gradients averaged over data parallelism, expert
  gradients over expert data parallelism, the tied word embedding summed over the embedding group.

Virtual pipeline stages (interleaved 1F1B) are refused by :func:`pipeline_stage`.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from megatron_eplb.pipeline import PipelineStage

from .compat import EPLBPatchError

__all__ = ["finalize_grads", "pipeline_stage", "state_to_global", "state_to_stage"]

_EMBEDDING, _OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"
_LAYER_KEY = re.compile(r"^(?P<block>(?:[^.]+\.)*?layers\.)(?P<index>\d+)\.")


def pipeline_stage(num_moe_layers: int) -> PipelineStage | None:
    """This stage's place among the pipeline's MoE layers (``num_moe_layers``: this stage's count), or None
    with PP = 1.  Collective over Megatron's pipeline group.

    Raises:
        EPLBPatchError: virtual pipeline stages (interleaved schedule), which are not supported.
    """
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return None
    virtual = ps.get_virtual_pipeline_model_parallel_world_size()
    if virtual is not None and virtual > 1:
        raise EPLBPatchError(
            f"virtual pipeline parallel size {virtual} (interleaved 1F1B) is not supported; supported: PP >= 1 "
            "without virtual stages (Megatron's non-interleaved 1F1B schedule)"
        )
    group = ps.get_pipeline_model_parallel_group()
    counts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(counts, int(num_moe_layers), group=group)
    return PipelineStage(
        group,
        dist.get_rank(group),
        len(counts),
        tuple(int(c) for c in counts),
        ps.get_tensor_and_data_parallel_group(with_context_parallel=True),
    )


def _layer_names(model: torch.nn.Module) -> dict[str, int]:
    """``{"decoder.layers.0.": global index}`` for every transformer layer of this stage's ``model``."""
    out = {}
    for name, module in model.named_modules():
        number = getattr(module, "layer_number", None)
        match = re.fullmatch(r"(?:.*\.)?layers\.(\d+)", name)
        if match and isinstance(number, int):
            out[name + "."] = number - 1
    return out


def state_to_global(model: torch.nn.Module, state: dict) -> dict:
    """``state`` (keyed by this stage's names) keyed by the whole model's names: ``decoder.layers.{i}.`` of
    the stage becomes ``decoder.layers.{layer_number - 1}.``.  Pure."""
    names = _layer_names(model)
    out = {}
    for key, value in state.items():
        if key == _OUTPUT and _tied_copy(model):  # the first stage's word embedding is the whole model's
            continue
        match = _LAYER_KEY.match(key)
        local = match.group(0) if match else None
        if local in names:
            key = f"{match.group('block')}{names[local]}.{key[len(local) :]}"
        out[key] = value
    return out


def state_to_stage(model: torch.nn.Module, state: dict) -> dict:
    """The part of a whole-model ``state`` (:func:`state_to_global`) this stage holds, keyed by its names:
    its transformer layers renamed, other stages' layers dropped, and of the keys outside the layers those the
    stage's model has (the embedding on the first stage, the final norm and output layer on the last).
    Pure."""
    to_local = {}
    for local, index in _layer_names(model).items():
        match = _LAYER_KEY.match(local)
        to_local[f"{match.group('block')}{index}."] = local
    own = set(model.state_dict().keys()) | {name for name, _ in model.named_parameters()}
    out = {}
    for key, value in state.items():
        match = _LAYER_KEY.match(key)
        if match:
            local = to_local.get(match.group(0))
            if local is not None:
                out[local + key[len(match.group(0)) :]] = value
        elif key in own:
            out[key] = value
    if _tied_copy(model) and _OUTPUT not in out and _EMBEDDING in state:
        out[_OUTPUT] = state[_EMBEDDING]
    return out


def _tied_copy(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a last stage (not the first) holding a copy of the tied word embedding."""
    return bool(
        getattr(model, "share_embeddings_and_output_weights", False)
        and getattr(model, "post_process", False)
        and not getattr(model, "pre_process", True)
    )


def finalize_grads(model: torch.nn.Module) -> None:
    """Reduce the gradients of an unwrapped Megatron-core ``model`` after a pipeline schedule's backward, as
    Megatron's DDP + ``finalize_model_grads`` would: with TP > 1 the TP-replicated (sequence-parallel)
    parameters summed over the TP group, dense parameters averaged over the data-parallel group, expert
    parameters (``allreduce=False``) over the expert data-parallel group, and with PP > 1 the tied word
    embedding / output weight summed over the embedding group.  Collective over those groups."""
    from megatron.core import parallel_state as ps

    from . import tp

    tp.allreduce_tp_replicated_grads(*tp.tp_replicated_params(model))

    groups = {True: ps.get_data_parallel_group(), False: ps.get_expert_data_parallel_group()}
    for dense, group in groups.items():
        size = dist.get_world_size(group)
        grads = [
            p.grad
            for p in model.parameters()
            if p.grad is not None and getattr(p, "allreduce", True) == dense
        ]
        if size == 1 or not grads:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    shared = getattr(model, "share_embeddings_and_output_weights", False)
    if shared and ps.get_pipeline_model_parallel_world_size() > 1 and ps.is_rank_in_embedding_group():
        weight = model.shared_embedding_or_output_weight()
        if weight.grad is not None:
            dist.all_reduce(weight.grad, group=ps.get_embedding_group())
