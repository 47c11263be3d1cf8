"""megatron_eplb.gradients: the logical gradient norm counts dense gradients and each expert once."""

import math

import torch

from megatron_eplb.gradients import logical_grad_norm


def test_replicas_and_non_primary_copies_are_not_counted_twice():
    torch.manual_seed(0)
    dense = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(2)]
    expert = torch.nn.Parameter(torch.randn(5))
    copy = torch.nn.Parameter(expert.detach().clone())  # a replica: same summed gradient
    grads = [(p, torch.randn_like(p)) for p in dense]
    g = torch.randn(5)
    grads += [(expert, g), (copy, g.clone())]
    flags = {id(expert): True, id(copy): False}
    want = math.sqrt(sum(float(x.double().pow(2).sum()) for _, x in grads[:3]))
    assert logical_grad_norm(grads, flags) == want
    # counting the copy too would be wrong by exactly its square
    wrong = logical_grad_norm(grads, {id(expert): True, id(copy): True})
    assert abs(wrong**2 - want**2 - float(g.double().pow(2).sum())) < 1e-9


def test_bf16_gradients_are_summed_in_float64():
    p = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    g = torch.full((4096,), 3.0, dtype=torch.bfloat16)
    assert logical_grad_norm([(p, g)], {}) == math.sqrt(4096 * 9.0)
