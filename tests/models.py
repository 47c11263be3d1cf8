"""The tiny Megatron-core models the multi-process tests build in every rank (CPU, gloo, fp32)."""

from __future__ import annotations

import torch

E = 8  # logical experts
H = 16  # hidden size
V = 32  # vocabulary
SEQ = 8  # sequence length


def init_megatron(ep: int) -> None:
    """CPU support, Megatron's parallel state with expert parallelism ``ep`` (TP = PP = 1), seeded RNG."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron_eplb.patches import megatron as eplb_mcore

    eplb_mcore.enable_cpu()
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_expert_model_parallel_world_size() == ep:
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(1234)


def tiny_gpt(ep: int, *, dispatcher: str = "allgather", seed: int = 0, **config):
    """A 3-layer GPTModel — dense, MoE, MoE (MoE layer ids count MoE layers only) — with ``E`` experts,
    top-2, no dropout, initialised from ``seed``. ``config`` overrides TransformerConfig fields."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        num_layers=3,
        hidden_size=H,
        num_attention_heads=2,
        num_moe_experts=E,
        moe_layer_freq=[0, 1, 1],
        moe_router_topk=2,
        moe_ffn_hidden_size=8,
        ffn_hidden_size=16,
        moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=ep,  # marks expert params allreduce=False (not data-parallel)
        use_cpu_initialization=True,
        add_bias_linear=False,
        moe_aux_loss_coeff=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    transformer_config = TransformerConfig(**{**fields, **config})
    spec = get_gpt_decoder_block_spec(transformer_config, use_transformer_engine=False)
    torch.manual_seed(seed)
    return GPTModel(transformer_config, spec, vocab_size=V, max_sequence_length=SEQ)


def copies_identical(handle) -> bool:
    """Every copy of an expert holds the same weights (gathered over the EP group; collective)."""
    for layer in range(handle.num_layers):
        local = torch.stack(
            [
                torch.cat([t.reshape(-1) for t in handle.slot_tensors(layer, k)])
                for k in range(handle.slots_per_rank)
            ]
        )
        parts = [torch.empty_like(local) for _ in range(handle.ep_size)]
        torch.distributed.all_gather(parts, local, group=handle.ep_group)
        every = torch.cat(parts)
        for e in range(handle.num_experts):
            copies = every[torch.as_tensor(handle.placement.phy2log[layer] == e)]
            if not torch.equal(copies, copies[:1].expand_as(copies)):
                return False
    return True
