"""Per-slot optimizer tensors under DeepSpeed: :class:`DeepSpeedSlotState`.

The same :class:`megatron_eplb.protocols.OptimizerSlots` interface, with the same rules, as the plain torch
``megatron_eplb.optimizer_state.OptimizerSlotState``: slot state is what is shaped like the parameter (fp32
master under ``"fp32"`` where DeepSpeed keeps one, then the moments, keys sorted), and Adam's ``step`` is
one count per optimizer (``optimizer_step`` / ``set_optimizer_step``), never slot state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_eplb.comm import collective_device
from megatron_eplb.optimizer_state import MASTER_KEY, OptimizerSlotState, param_shaped_state
from megatron_eplb.slots import SlotParam, as_slot_params

__all__ = ["DeepSpeedSlotState"]

_OPTIM_KEYS = ("exp_avg", "exp_avg_sq")


class DeepSpeedSlotState:
    """Per-slot optimizer tensors under DeepSpeed, for each of the optimizers it builds at ZeRO 0, 1 and 2.

    ``tensors(params)`` returns tensors that *are* the optimizer's storage (writing them writes the state):

    * ZeRO 0, fp32 (a plain torch optimizer): its per-parameter state (``exp_avg``, ``exp_avg_sq``);
    * ZeRO 0, bf16 (DeepSpeed's ``FP16_UnfusedOptimizer`` in bf16): each parameter's fp32 master copy
      (``optimizer.fp32_groups``) and the torch optimizer's state of that master;
    * ZeRO 1 and 2, fp32 or bf16 (``DeepSpeedZeroOptimizer``): for each parameter its fp32 master fragment
      (``param._hp_mapping``, what ``deepspeed.utils.safe_get_full_fp32_param`` reads) and the matching
      slices of the Adam moments of DeepSpeed's flat fp32 partition (``safe_get_full_optimizer_state``'s
      source).  Fragments of one (layer, slot) have the same shape on every EP rank (identical parameter
      layout), so they are exchanged between EP ranks in place — as long as every slot of a layer has the
      same fragments on this rank.  Where the data-parallel partitions cut through a layer's slots (ZeRO 1
      and 2 with expert-DP > 1: slot ``k``'s pieces on one DP rank, slot ``k'``'s on another) a moved slot's
      pieces must come from other DP ranks: :meth:`begin_layer` then assembles the layer's whole fp32
      masters and moments (one all-reduce over the expert-DP group), ``tensors`` returns those while the
      layer is in flight, and :meth:`end_layer` writes each rank's own pieces back.

    Per parameter the order is ``fp32`` (when there is a master) then the moment keys sorted (ZeRO 1: the
    fragment keys sorted), the same on every rank.  ``full_state`` / ``set_full_state`` read/write whole
    tensors (collective over the parameter's DeepSpeed DP group under ZeRO) for logical checkpoints;
    ``optimizer_step`` / ``set_optimizer_step`` the one step count of the torch optimizer inside.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._group_of: dict[int, int] | None = None
        self._master_of: dict[int, torch.Tensor] | None = None
        self._state_ensured = False
        # id(param) -> {key: whole flat fp32 tensor} of the layers in flight (begin_layer .. end_layer)
        self._whole: dict[int, dict[str, torch.Tensor]] = {}
        self._whole_params: dict[int, list[torch.Tensor]] = {}

    # ----------------------------------------------------------- layouts
    @property
    def _inner(self) -> OptimizerSlotState:
        """The torch optimizer inside DeepSpeed's wrapper (the engine's optimizer itself at ZeRO 0 fp32)."""
        opt = self.engine.optimizer
        return OptimizerSlotState(getattr(opt, "optimizer", opt))

    def _torch_optimizer(self) -> OptimizerSlotState | None:
        """The torch optimizer whose ``state`` is keyed by the model's own parameters (ZeRO 0 fp32)."""
        opt = self.engine.optimizer
        if hasattr(opt, "bit16_groups") or hasattr(opt, "fp32_groups"):
            return None
        return OptimizerSlotState(opt) if isinstance(getattr(opt, "state", None), dict) else None

    def master(self, p) -> torch.Tensor | None:
        """The fp32 master copy of ``p`` kept per parameter (ZeRO 0 bf16), else None."""
        if self._master_of is None:
            opt = self.engine.optimizer
            self._master_of = {}
            lp_groups, hp_groups = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
            if isinstance(lp_groups, list) and isinstance(hp_groups, list):
                for lp_group, hp_group in zip(lp_groups, hp_groups):
                    if not isinstance(hp_group, (list, tuple)):
                        continue  # the fused FP16_Optimizer keeps flat groups: not a per-parameter layout
                    for lp, hp in zip(lp_group, hp_group):
                        if hp.shape == lp.shape:
                            self._master_of[id(lp)] = hp
        return self._master_of.get(id(p))

    def _flat_state(self, p) -> tuple[torch.Tensor | None, dict]:
        opt = self.engine.optimizer
        if self._group_of is None:
            self._group_of = {
                id(q): i for i, group in enumerate(getattr(opt, "bit16_groups", [])) for q in group
            }
        i = self._group_of.get(id(p))
        if i is None:
            return None, {}
        flat = opt.single_partition_of_fp32_groups[i]
        return flat, opt.optimizer.state.get(flat, {})

    def state_keys(self) -> list[str]:
        """Moment keys of DeepSpeed's flat partitions (same on every rank; empty before the first step)."""
        opt = self.engine.optimizer
        for flat in getattr(opt, "single_partition_of_fp32_groups", []):
            keys = list(param_shaped_state(opt.optimizer.state.get(flat, {}), flat))
            if keys:
                return keys
        return []

    def ensure_state(self, step: int = 0, keys: tuple[str, ...] = _OPTIM_KEYS) -> None:
        """Create zero Adam moments on DeepSpeed's flat partitions when none exist yet (before the first
        step), so that a checkpoint can be loaded into them (``step``: their step count; a load sets it with
        :meth:`set_optimizer_step`); relinks the fragments, once per instance."""
        if self._state_ensured:
            return
        self._state_ensured = True
        opt = self.engine.optimizer
        for flat in getattr(opt, "single_partition_of_fp32_groups", []):
            state = opt.optimizer.state[flat]
            if not state:
                state["step"] = torch.tensor(float(step))
                for key in keys:
                    state[key] = torch.zeros_like(flat)
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def fragments(self, p) -> dict[str, torch.Tensor]:
        """``{"fp32": master, "exp_avg": ..., ...}``: this rank's in-place fragments of ``p`` (ZeRO)."""
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return {}
        out = {MASTER_KEY: mapping.get_hp_fragment()}
        flat, state = self._flat_state(p)
        addr = mapping.get_hp_fragment_address()
        for key in self.state_keys():
            value = state.get(key)
            if torch.is_tensor(value) and flat is not None and value.shape == flat.shape:
                out[key] = value.narrow(0, addr.start, addr.numel)
        return out

    # ----------------------------------------------------------- a layer in flight
    def begin_layer(self, layer: int, slots: list[list[torch.Tensor | SlotParam]]) -> None:
        """Before a transfer of MoE layer ``layer`` (``slots[k]``: local slot ``k``'s tensors): where
        DeepSpeed's data-parallel partitions hold different pieces of different slots, assemble every slot's
        whole fp32 master and moments (one all-reduce over the parameters' DP group; :meth:`tensors` returns
        them until :meth:`end_layer`).  Collective over that group; a no-op where fragments are whole."""
        params = list({id(sp.param): sp.param for slot in slots for sp in as_slot_params(slot)}.values())
        if not params or not all(hasattr(p, "_hp_mapping") for p in params):  # ZeRO's partitioned layout only
            return
        group = getattr(params[0], "_dp_group", None)
        if group is None or dist.get_world_size(group) == 1:
            return
        keys = [MASTER_KEY, *self.state_keys()]
        flat = torch.zeros(
            len(keys), sum(p.numel() for p in params), dtype=torch.float32, device=params[0].device
        )
        offset = 0
        for p in params:
            frags = self.fragments(p)
            if not frags:  # no piece of p in this rank's partition
                offset += p.numel()
                continue
            addr = p._hp_mapping.lp_fragment_address
            for i, key in enumerate(keys):
                if key in frags:
                    flat[i, offset + addr.start : offset + addr.start + addr.numel].copy_(
                        frags[key].reshape(-1)
                    )
            offset += p.numel()
        device = collective_device(group)
        reduced = flat.to(device)
        dist.all_reduce(reduced, group=group)
        flat = reduced.to(flat.device)
        offset = 0
        for p in params:
            self._whole[id(p)] = {key: flat[i, offset : offset + p.numel()] for i, key in enumerate(keys)}
            offset += p.numel()
        self._whole_params[layer] = params

    def end_layer(self, layer: int) -> None:
        """After layer ``layer``'s transfer committed or rolled back: write this rank's own pieces of the
        whole tensors :meth:`begin_layer` assembled back into DeepSpeed's partitions, then drop them.  Local."""
        for p in self._whole_params.pop(layer, []):
            whole = self._whole.pop(id(p))
            frags = self.fragments(p)
            if not frags:
                continue
            addr = p._hp_mapping.lp_fragment_address
            with torch.no_grad():
                for key, frag in frags.items():
                    frag.copy_(whole[key].narrow(0, addr.start, addr.numel).view_as(frag))

    # ----------------------------------------------------------- in place
    def tensors(self, params: list[torch.Tensor | SlotParam]) -> list[torch.Tensor]:
        """The optimizer storage of ``params`` (masters and moments), in a fixed order; a
        :class:`~megatron_eplb.slots.SlotParam` that is a block of its parameter gets that block of each
        (under ZeRO: of this rank's fragment, possibly empty; while a layer is in flight between
        :meth:`begin_layer` and :meth:`end_layer`: of its whole tensors, written back after)."""
        out: list[torch.Tensor] = []
        for sp in as_slot_params(params):
            p = sp.param
            whole = self._whole.get(id(p))
            if whole is not None:
                out.extend(sp.of(whole[k].view(p.shape)) for k in sorted(whole))
                continue
            if hasattr(p, "_hp_mapping"):
                frags = self.fragments(p)
                if frags:
                    start = p._hp_mapping.lp_fragment_address.start
                    out.extend(sp.of_fragment(frags[k], start) for k in sorted(frags))
                continue
            hp = self.master(p)
            if hp is not None:
                out.append(sp.of(hp.data))
                out.extend(sp.of(t) for t in self._inner.tensors([hp]))
                continue
            opt = self._torch_optimizer()
            if opt is not None:
                out.extend(opt.tensors([sp]))
        return out

    # ---------------------------------------------------------- whole tensors
    def full_state(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """Full fp32 master and moments of ``p`` (copies; collective over ``p._dp_group`` under ZeRO)."""
        if hasattr(p, "_hp_mapping"):
            frags = self.fragments(p)
            out = {}
            for key in [MASTER_KEY, *self.state_keys()]:
                buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                if key in frags:
                    addr = p._hp_mapping.lp_fragment_address
                    buf.narrow(0, addr.start, addr.numel).copy_(frags[key].reshape(-1))
                dist.all_reduce(buf, group=p._dp_group)
                out[key] = buf.reshape(p.shape)
            return out
        hp = self.master(p)
        if hp is not None:
            return {MASTER_KEY: hp.detach().clone(), **self._inner.full_state(hp)}
        opt = self._torch_optimizer()
        return opt.full_state(p) if opt is not None else {}

    def set_full_state(self, p: torch.nn.Parameter, values: dict[str, torch.Tensor]) -> None:
        """Write full tensors (as :meth:`full_state` returns) into this rank's fragments / state. Local."""
        if hasattr(p, "_hp_mapping"):
            self.ensure_state()
            frags = self.fragments(p)
            if not frags:
                return  # no fragment of p in this rank's partition
            addr = p._hp_mapping.lp_fragment_address
            for key, value in values.items():
                if key in frags:
                    frags[key].copy_(value.reshape(-1).narrow(0, addr.start, addr.numel).to(frags[key].dtype))
            return
        hp = self.master(p)
        if hp is not None:
            if MASTER_KEY in values:
                hp.data.copy_(values[MASTER_KEY].reshape(hp.shape))
            self._inner.set_full_state(hp, values)
            return
        opt = self._torch_optimizer()
        if opt is not None:
            opt.set_full_state(p, values)

    # ---------------------------------------------------------- the step count
    def optimizer_step(self) -> int:
        """The step count of the torch optimizer inside DeepSpeed's (0 before its first step)."""
        return self._inner.optimizer_step()

    def set_optimizer_step(self, step: int) -> None:
        """Set the step count in every state of the torch optimizer inside DeepSpeed's."""
        self._inner.set_optimizer_step(step)
