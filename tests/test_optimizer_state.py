"""megatron_eplb/optimizer_state.py: the plain torch optimizer's per-slot state (``OptimizerSlotState``) and
Adam's ``step`` rule (one count per optimizer, never a per-slot tensor), in process."""

from __future__ import annotations

import torch

from megatron_eplb.optimizer_state import OptimizerSlotState
from megatron_eplb.protocols import OptimizerSlots


def _adam(seed: int = 0, steps: int = 3):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.Adam(params, lr=0.1)
    for i in range(steps):
        opt.zero_grad()
        sum((p * (i + 1 + k)).pow(2).sum() for k, p in enumerate(params)).backward()
        opt.step()
    return params, opt


def test_slot_state_carries_moments_not_step():
    params, opt = _adam()
    slots = OptimizerSlotState(opt)
    assert isinstance(slots, OptimizerSlots)
    # tensors: the optimizer's own storage, param-shaped, keys sorted; never the scalar step
    tensors = slots.tensors(params)
    assert [t.shape for t in tensors] == [params[0].shape] * 2 + [params[1].shape] * 2
    assert tensors[0].data_ptr() == opt.state[params[0]]["exp_avg"].data_ptr()
    assert sorted(slots.full_state(params[0])) == ["exp_avg", "exp_avg_sq"]
    assert slots.optimizer_step() == 3


def test_resumed_adam_continues_with_the_saved_step_count():
    params, opt = _adam()
    slots = OptimizerSlotState(opt)
    saved = [slots.full_state(p) for p in params]
    step = slots.optimizer_step()
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = torch.optim.Adam(fresh, lr=0.1)
    slots2 = OptimizerSlotState(opt2)
    for p, values in zip(fresh, saved):
        slots2.set_full_state(p, {**values, "fp32": p.detach().float()})  # no master here: ignored
    slots2.set_optimizer_step(step)
    assert slots2.optimizer_step() == 3 and all(float(opt2.state[p]["step"]) == 3 for p in fresh)
    for o, ps in ((opt, params), (opt2, fresh)):  # one more step of each: identical (bias correction at 4)
        o.zero_grad()
        sum((p * 7).pow(2).sum() for p in ps).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, fresh))
    assert slots2.optimizer_step() == 4
