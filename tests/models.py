"""The tiny Megatron-core models the multi-process tests build in every rank (CPU, gloo, fp32).

Expert kinds (``experts=``): ``"sequential"`` (``SequentialMLP``) and ``"grouped"`` (the legacy ``GroupedMLP``,
through ``megatron_eplb.patches.megatron.grouped_gemm.install()`` where the ``grouped_gemm`` package is
missing).  ``GroupedMLP`` asserts ``config.bf16`` in its forward; to compare in fp32 the tests give its
experts module a copy of the config with ``bf16=True`` (:func:`fp32_grouped`; nothing else reads it there),
which the patch carries over (it builds the new experts module from the old one's config).
"""

from __future__ import annotations

import copy

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


EXPERT_KINDS = ("sequential", "grouped")


def fp32_grouped(model: torch.nn.Module) -> torch.nn.Module:
    """Let every ``GroupedMLP`` of ``model`` run in fp32 (see the module docstring); returns ``model``."""
    from megatron.core.transformer.moe.experts import GroupedMLP

    for m in model.modules():
        if isinstance(m, GroupedMLP) and not m.config.bf16:
            m.config = copy.copy(m.config)
            m.config.bf16 = True
    return model


def expert_kind_config(experts: str) -> dict:
    """TransformerConfig fields of an expert kind (and, for ``grouped``, the grouped GEMM installed)."""
    if experts not in EXPERT_KINDS:
        raise ValueError(f"experts={experts!r}; one of {EXPERT_KINDS}")
    if experts == "grouped":
        from megatron_eplb.patches.megatron import grouped_gemm

        grouped_gemm.install()
    return {"moe_grouped_gemm": experts == "grouped"}


def local_expert_tensors(experts_module: torch.nn.Module, get=None) -> torch.Tensor:
    """``[S, n]``: each local expert's tensors flattened (``get(param)``, shaped like the parameter: default
    its weights; e.g. its gradient or an Adam moment), read as Megatron's forward reads the weights:
    ``SequentialMLP``'s modules, ``GroupedMLP``'s ``weight1.view(S, H, -1)`` / ``weight2.view(S, -1, H)``."""
    from megatron.core.transformer.moe.experts import GroupedMLP

    get = get or (lambda p: p)
    if isinstance(experts_module, GroupedMLP):
        s, h = experts_module.num_local_experts, experts_module.config.hidden_size
        w1 = get(experts_module.weight1).detach().reshape(s, h, -1).reshape(s, -1)
        w2 = get(experts_module.weight2).detach().reshape(s, -1, h).reshape(s, -1)
        return torch.cat([w1, w2], dim=1)
    return torch.stack(
        [
            torch.cat([get(p).detach().reshape(-1) for p in m.parameters()])
            for m in experts_module.local_experts
        ]
    )


def tiny_gpt(ep: int, *, dispatcher: str = "allgather", seed: int = 0, experts: str = "sequential", **config):
    """A 3-layer GPTModel — dense, MoE, MoE (MoE layer ids count MoE layers only) — with ``E`` experts
    (``experts``: ``sequential`` or ``grouped``), top-2, no dropout, initialised from ``seed``. ``config``
    overrides TransformerConfig fields."""
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
        **expert_kind_config(experts),
    )
    transformer_config = TransformerConfig(**{**fields, **config})
    spec = get_gpt_decoder_block_spec(transformer_config, use_transformer_engine=False)
    torch.manual_seed(seed)
    return fp32_grouped(GPTModel(transformer_config, spec, vocab_size=V, max_sequence_length=SEQ))


def copies_identical(handle, optimizer_state=None) -> bool:
    """Every copy of an expert holds the same weights (gathered over the EP group; collective), bitwise.

    ``optimizer_state``: an optimizer-slot view with ``full_state(param) -> {key: tensor}`` (e.g.
    ``DeepSpeedSlotState(engine)``: the fp32 master and Adam moments, under ZeRO assembled from the
    data-parallel ranks' partition pieces; collective there): every copy's optimizer state must match too, and
    a slot without any state is an error (the comparison would be empty)."""
    for layer in range(handle.num_layers):
        local = []
        for k in range(handle.slots_per_rank):
            tensors = list(handle.slot_tensors(layer, k))
            for sp in handle.slot_params(layer, k) if optimizer_state is not None else ():
                state = optimizer_state.full_state(sp.param)
                if not state:
                    raise ValueError(f"layer {layer} slot {k}: no optimizer state to compare")
                # the slot's block of each state tensor (the whole of it for a slot with its own parameter)
                tensors += [state[key].reshape(-1)[sp.offset : sp.offset + sp.numel] for key in sorted(state)]
            local.append(torch.cat([t.detach().reshape(-1).float() for t in tensors]))
        local = torch.stack(local)
        parts = [torch.empty_like(local) for _ in range(handle.ep_size)]
        torch.distributed.all_gather(parts, local, group=handle.ep_group)
        every = torch.cat(parts)
        for e in range(handle.num_experts):
            copies = every[torch.as_tensor(handle.placement.phy2log[layer] == e)]
            if not torch.equal(copies, copies[:1].expand_as(copies)):
                return False
    return True


def engine_train_step(
    engine, tokens: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor
) -> tuple[float, bool]:
    """One training step of a DeepSpeed engine around a GPT model on ``tokens [b, t + 1]`` (next-token labels;
    ``pos [b, t]``, ``mask``: the attention mask): returns the loss averaged over every rank and whether a
    rebalance completed at this step (``engine.eplb_last_record``).  Collective over the world."""
    loss = engine(tokens[:, :-1], pos, mask, labels=tokens[:, 1:]).float().mean()
    engine.backward(loss)
    engine.step()
    value = loss.detach().clone()
    torch.distributed.all_reduce(value)
    return float(value) / torch.distributed.get_world_size(), engine.eplb_last_record is not None
