"""DeepSpeed's expert groups made from Megatron's, and every write into DeepSpeed's private group dicts.

DeepSpeed keeps its expert-parallel and expert-data-parallel groups in private module dicts of
``deepspeed.utils.groups`` keyed by a group name (``ep_size_<EP>``, whose EP size it parses back out).
This module is the only place that touches them: Megatron's EP / expert-DP groups are registered under that
name, and every expert parameter is tagged ``allreduce=False`` with that ``group_name``, so its gradient is
reduced over the expert-DP group only and the engine's initial broadcast does not overwrite other ranks'
experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .errors import DeepSpeedEPLBError

__all__ = [
    "MegatronMPU",
    "dense_dp_group",
    "expert_group_name",
    "megatron_groups",
    "register_expert_groups",
    "routing_group",
    "tag_expert_params",
]


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for an expert group (it parses the EP size out of it)."""
    return f"ep_size_{ep_size}"


def megatron_groups():
    """``(expert-parallel group, expert-data-parallel group)`` of Megatron's ``parallel_state``."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise DeepSpeedEPLBError(
            "Megatron's parallel_state is not initialised: call deepspeed.init_distributed() and "
            "megatron.core.parallel_state.initialize_model_parallel(expert_model_parallel_size=EP) first"
        )
    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise DeepSpeedEPLBError(
            f"pipeline parallel size {ps.get_pipeline_model_parallel_world_size()} is not supported under "
            "DeepSpeed; supported: PP = 1 under the DeepSpeed engine (with TP > 1 + sequence parallelism, "
            "expert TP = 1, ZeRO 0/1/2; the engine cannot run Megatron's pipeline schedules). PP > 1 is "
            "supported without the engine, through Megatron's schedules (get_forward_backward_func) with a "
            "torch optimizer and EPLBManager: per stage eplb_mcore.apply(stage_model), then per step the "
            "schedule, patches.megatron.pipeline.finalize_grads(stage_model), manager.before_optimizer_step(), "
            "optimizer.step(), manager.step() (megatron_eplb.pipeline; the recipe is examples/train_pipeline.py, "
            "which examples/train.py --pipeline-model-parallel-size N runs)"
        )
    if ps.get_context_parallel_world_size() > 1:
        raise DeepSpeedEPLBError("context parallel size > 1 is not supported; supported: CP = 1")
    if ps.get_expert_tensor_parallel_world_size() > 1:
        raise DeepSpeedEPLBError(
            f"expert tensor parallel size {ps.get_expert_tensor_parallel_world_size()} is not supported; "
            "supported: 1 (initialize_model_parallel(..., expert_tensor_parallel_size=1))"
        )
    return ps.get_expert_model_parallel_group(), ps.get_expert_data_parallel_group()


def routing_group():
    """Every rank that routes tokens through the same MoE layers: Megatron's tensor x data parallel group
    (the whole world at PP = 1).  Loads are summed and commits voted over it, so the TP ranks of one
    data-parallel replica (which route different parts of the sequence under sequence parallelism) and
    every expert-DP copy agree."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_and_data_parallel_group(with_context_parallel=True)


class MegatronMPU:
    """Megatron's ``parallel_state`` under the names DeepSpeed's ``mpu=`` argument calls (read live, so one
    object serves every layout a process sets up): DeepSpeed then reduces dense gradients over Megatron's
    data-parallel group, not over the TP ranks that hold different shards."""

    @staticmethod
    def _ps():
        from megatron.core import parallel_state as ps

        return ps

    def get_data_parallel_group(self):
        return self._ps().get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self._ps().get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps().get_data_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps().get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.get_model_parallel_group())

    def get_tensor_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps().get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_group(self):
        return self._ps().get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ps().get_pipeline_model_parallel_world_size()


def register_expert_groups(ep_group, expert_dp_group) -> str:
    """Make Megatron's EP / expert-DP groups DeepSpeed's expert groups; return the group name."""
    from deepspeed.utils import groups

    ep_size = dist.get_world_size(ep_group)
    name = expert_group_name(ep_size)
    groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ep_group)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = expert_dp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(expert_dp_group)
    return name


def dense_dp_group():
    """DeepSpeed's data-parallel group of the dense parameters (every rank that routes tokens)."""
    from deepspeed.utils import groups

    return groups._get_data_parallel_group()


def tag_expert_params(model: torch.nn.Module, group_name: str) -> tuple[int, int]:
    """Tag every expert parameter for DeepSpeed; return (MoE layers, experts per layer)."""
    from megatron_eplb.patches.megatron import find_moe_layers

    layers = find_moe_layers(model)
    if not layers:
        raise DeepSpeedEPLBError(f"{type(model).__name__} has no Megatron-core MoELayer")
    for _, layer in layers:
        for p in layer.experts.parameters():
            p.allreduce = False
            p.group_name = group_name
    return len(layers), int(layers[0][1].config.num_moe_experts)
