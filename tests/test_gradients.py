"""megatron_eplb.gradients: the logical gradient norm counts dense gradients and each expert once."""

import math

import numpy as np
import pytest
import torch

from megatron_eplb.gradients import clip_grad_norm_, handle_grad_norm, logical_grad_norm, param_grad
from megatron_eplb.slots import SlotParam


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


class _Handle:
    """One layer, 2 experts in 3 slots on one rank (expert 0 twice), one dense parameter."""

    def __init__(self):
        from megatron_eplb.placement import ExpertPlacement

        self.placement = ExpertPlacement(np.array([[0, 1, 0]]), 1, 2, allow_same_rank_copies=True)
        self.slots = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
        self.dense = torch.nn.Parameter(torch.zeros(2))
        self.model = torch.nn.ParameterList([self.dense, *self.slots])
        self.num_layers, self.ep_size, self.ep_group = 1, 1, None

    def local_slots(self):
        return [0, 1, 2]

    def slot_params(self, layer, k):
        return [SlotParam.whole(self.slots[k])]


def test_handle_grad_norm_and_clipping_count_each_logical_expert_once():
    h = _Handle()
    h.dense.grad = torch.full((2,), 1.0)
    h.slots[0].grad = torch.full((3,), 2.0)
    h.slots[1].grad = torch.full((3,), 3.0)
    h.slots[2].main_grad = torch.full((3,), 2.0)  # Megatron's main_grad is the one read
    h.slots[2].grad = torch.full((3,), 100.0)
    want = math.sqrt(2 * 1.0 + 3 * 4.0 + 3 * 9.0)  # dense, expert 0 once, expert 1
    assert param_grad(h.slots[2]) is h.slots[2].main_grad
    assert handle_grad_norm(h) == pytest.approx(want)
    assert clip_grad_norm_(h, 2 * want) == pytest.approx(want)  # under the limit: unchanged
    assert float(h.dense.grad[0]) == 1.0
    assert clip_grad_norm_(h, want / 2) == pytest.approx(want)
    assert float(h.dense.grad[0]) == pytest.approx(0.5, rel=1e-5)
