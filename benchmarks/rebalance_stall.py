"""What rebalancing costs a training step on one GPU: the rebalance stall, planning steps, redundant-slot memory.

Usage::

    python benchmarks/rebalance_stall.py [--out DIR] [--canary off] [--more-canaries sampled,full] [--small]

Writes ``DIR/rebalance_stall.json`` (default ``benchmarks/results`` on CUDA) and prints a table.  Without CUDA
it runs tiny sizes on CPU (gloo), a smoke test of the script itself; its numbers mean nothing.

One process, one GPU, EP = 1: a Megatron-core GPTModel MoE (4 MoE layers, 16 experts + 4 redundant slots,
top-2, bf16, fused torch Adam) with :class:`EPLBManager`: dynamic EPLB off (baseline), dynamic with a policy
that rotates the slots every rebalance (forced moves, the stall), and with the default policy (planning in the
worker).  Every step ends with ``loss.item()`` (a host sync, as a training loop that logs does); step time is
the wall time between those syncs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import CUDA, count_calls, moe_config, run_one_gpu, time_stats  # noqa: E402


def permute_policy(load, num_slots, num_ranks, previous=None, **kwargs):
    """Test policy: rotate every layer's slots by one (every slot gets another expert: forced moves)."""
    return np.roll(previous.phy2log, 1, axis=1)


_EVENTS: dict[str, int] = {}


def _build_gpt(device, small: bool, redundant: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    dtype = torch.bfloat16 if CUDA else torch.float32
    if small:
        h, ffn, experts, layers, vocab, seq, mbs, heads = 64, 64, 8, 2, 128, 32, 2, 4
    else:
        h, ffn, experts, layers, vocab, seq, mbs, heads = 2048, 2048, 16, 4, 16384, 2048, 4, 16
    config = moe_config(h, ffn, experts, 2, dtype, layers=layers, heads=heads, dense_ffn=4 * h)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    torch.manual_seed(0)
    model = GPTModel(config, spec, vocab_size=vocab, max_sequence_length=seq).to(device)
    if CUDA:  # bf16 parameters: Megatron's Float16Module casts the float activations at the boundaries
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    setup = dict(
        hidden=h, moe_ffn=ffn, experts=experts, redundant=redundant, moe_layers=layers, topk=2,
        vocab=vocab, seq=seq, micro_batch=mbs, tokens=seq * mbs, dtype=str(dtype),
    )  # fmt: skip
    return model, setup, (vocab, seq, mbs)


def part_train(device, small: bool, canary: str = "off", more_canaries: tuple[str, ...] = ()) -> dict:
    from megatron_eplb.patches import megatron as eplb_mcore

    from megatron_eplb.config import EPLBConfig
    from megatron_eplb.manager import EPLBManager
    from megatron_eplb.transfer import TransferExecutor

    redundant = 4 if not small else 2
    model, setup, (vocab, seq, mbs) = _build_gpt(device, small, redundant)
    base_cfg = dict(
        init_redundancy_expert=redundant,
        num_iterations_eplb_update=10,
        num_wait_worker_iterations=2,
        eplb_window_size=10,
        eplb_layers_per_step=1,
        eplb_transfer_canary=canary,
        # --small (the CPU smoke run of this script): the due step waits for the plan, so a policy worker that
        # starts slowly on a loaded machine still plans within the short run
        **({"eplb_max_plan_wait": 25.0} if small else {}),
    )
    handle = eplb_mcore.apply(model, config=EPLBConfig.from_dict(base_cfg))
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, fused=CUDA)
    for name in ("gather_window", "_await_plan", "_start_planning"):
        count_calls(EPLBManager, name, _EVENTS)
    for name in ("start_layer", "finish_layer", "verify_layer"):
        count_calls(TransferExecutor, name, _EVENTS)
    count_calls(type(handle), "commit_layer", _EVENTS)
    peaks: list[int] = []
    original_init = TransferExecutor.__init__

    def init(self, *a, **k):
        original_init(self, *a, **k)
        peaks.append(self)

    TransferExecutor.__init__ = init
    gen = torch.Generator(device="cpu").manual_seed(0)
    position_ids = torch.arange(seq, device=device).expand(mbs, seq)
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device).tril().logical_not()

    def run(label: str, steps: int, skip: int, **cfg) -> dict:
        config = EPLBConfig.from_dict({**base_cfg, **{k: v for k, v in cfg.items() if k != "policy_fn"}})
        manager = EPLBManager(handle, config, opt, policy_fn=cfg.get("policy_fn"))
        rows = []
        for step in range(steps):
            tokens = torch.randint(0, vocab, (mbs, seq), generator=gen).to(device)
            _EVENTS.clear()
            phase_before = manager.phase.value
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = model(tokens, position_ids, mask, labels=tokens).float().mean()
            loss.backward()
            manager.before_optimizer_step()
            opt.step()
            record = manager.step()
            loss_value = loss.item()
            wall = (time.perf_counter() - t0) * 1e3
            rows.append(
                dict(step=step, ms=wall, before=phase_before, after=manager.phase.value, events=dict(_EVENTS),
                     completed=record.outcome if record is not None else None, loss=loss_value)
            )  # fmt: skip
        manager.close()
        hist = [r.as_dict() for r in manager.history]
        rows = rows[skip:]
        steady = [r["ms"] for r in rows if not r["events"] and r["before"] == r["after"] == "recording"]
        moving = [
            r["ms"]
            for r in rows
            if any(k in r["events"] for k in ("start_layer", "finish_layer", "commit_layer", "_await_plan"))
        ]
        gather = [r["ms"] for r in rows if "gather_window" in r["events"]]
        planning = [r["ms"] for r in rows if not r["events"] and r["before"] == r["after"] == "planning"]
        return {
            "label": label,
            "steps": steps,
            "skipped_warmup_steps": skip,
            "steady": time_stats(steady),
            "transfer_steps": time_stats(moving),
            "gather_steps": time_stats(gather),
            "planning_steps": time_stats(planning),
            "rebalances": len(hist),
            "outcomes": sorted({h["outcome"] for h in hist}),
            "moved_slots_total": int(sum(h["moved_slots"] for h in hist)),
            "moved_bytes_total": int(sum(h["moved_bytes"] for h in hist)),
            "seconds_last": hist[-1]["seconds"] if hist else {},
            "rows": rows,
        }

    steps, skip = (30, 12) if small else (150, 25)
    out = {"setup": setup}
    out["off"] = run("dynamic EPLB off", steps // 2 if not small else 20, skip // 2, dynamic_eplb=False)
    out["permute"] = run(
        "dynamic EPLB, rotate-slots test policy", steps, skip, dynamic_eplb=True, policy_fn=permute_policy
    )
    for other in more_canaries:  # the same forced moves with another canary setting, same model and baseline
        out[f"permute_canary_{other}"] = run(
            f"dynamic EPLB, rotate-slots test policy, canary {other}",
            steps,
            skip,
            dynamic_eplb=True,
            policy_fn=permute_policy,
            eplb_transfer_canary=other,
        )
    out["policy"] = run("dynamic EPLB, default policy", steps // 2 + 20, skip, dynamic_eplb=True)
    # Memory (per rank; EP = 1 here, so R/EP = R slots).
    slot_params = handle.slot_params(0, 0)
    weight_bytes = sum(sp.numel * sp.param.element_size() for sp in slot_params)
    state_bytes = sum(
        sp.numel * t.element_size()
        for sp in slot_params
        for t in opt.state.get(sp.param, {}).values()
        if torch.is_tensor(t) and t.shape == sp.param.shape
    )
    layers = handle.num_layers
    out["memory"] = {
        "slot_weight_bytes": weight_bytes,
        "slot_optimizer_state_bytes": state_bytes,
        "redundant_slots_per_rank_per_layer": redundant,
        "redundant_weight_bytes_per_rank": redundant * layers * weight_bytes,
        "redundant_optimizer_state_bytes_per_rank": redundant * layers * state_bytes,
        "peak_staging_bytes": max((ex.peak_staging_bytes for ex in peaks), default=0),
    }
    TransferExecutor.__init__ = original_init
    steady = out["off"]["steady"].get("median_ms")
    moving = out["permute"]["transfer_steps"].get("median_ms")
    out["rebalance_stall_ratio"] = moving / steady if steady and moving else None
    out["rebalance_stall_ratio_in_run"] = (
        moving / out["permute"]["steady"]["median_ms"] if moving and out["permute"]["steady"]["n"] else None
    )
    out["canary"] = canary
    for other in more_canaries:
        run_other = out[f"permute_canary_{other}"]
        moving_other = run_other["transfer_steps"].get("median_ms")
        out[f"rebalance_stall_ratio_canary_{other}"] = (
            moving_other / steady if steady and moving_other else None
        )
        out[f"rebalance_stall_ratio_in_run_canary_{other}"] = (
            moving_other / run_other["steady"]["median_ms"]
            if moving_other and run_other["steady"]["n"]
            else None
        )
    plan = out["policy"]["planning_steps"].get("median_ms")
    out["planning_step_ratio"] = plan / steady if plan and steady else None
    return out


def measure(device, small: bool, args) -> dict:
    more = tuple(c for c in args.more_canaries.split(",") if c)
    train = part_train(device, small, canary=args.canary, more_canaries=more)
    return {"train": train, "rebalance_stall_ratio": train["rebalance_stall_ratio"]}


def _table(r: dict) -> str:
    lines: list[str] = []
    t = r["train"]
    for key in [k for k in ("off", "permute", "policy") if k in t] + [
        k for k in t if k.startswith("permute_canary_")
    ]:
        run = t[key]
        parts = [
            f"{c} {run[c]['median_ms']:.1f} (n={run[c]['n']}, max {run[c]['max_ms']:.1f})"
            for c in ("steady", "transfer_steps", "gather_steps", "planning_steps")
            if run[c]["n"]
        ]
        lines.append(
            f"train {key}: " + "; ".join(parts) + f"; rebalances {run['rebalances']} {run['outcomes']}"
        )
    lines.append(
        f"rebalance_stall_ratio {t['rebalance_stall_ratio']}, in-run {t['rebalance_stall_ratio_in_run']}, "
        f"planning_step_ratio {t['planning_step_ratio']}"
    )
    lines.append(
        "canary stall ratios: "
        + json.dumps({k: v for k, v in t.items() if k.startswith("rebalance_stall_ratio")})
    )
    lines.append("memory: " + json.dumps(t["memory"]))

    return "\n".join(lines)


def _args(parser) -> None:
    parser.add_argument(
        "--canary", default="off", choices=("off", "sampled", "full"), help="eplb_transfer_canary of the runs"
    )
    parser.add_argument(
        "--more-canaries",
        default="",
        help="comma-separated canary settings to time too (rotate-slots runs only), e.g. full,off",
    )


def main(argv: list[str] | None = None) -> dict:
    return run_one_gpu("rebalance_stall.py", __doc__, _args, measure, _table, argv)


if __name__ == "__main__":
    main()
