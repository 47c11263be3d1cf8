"""EPLB inference from a checkpoint written by ``examples/train.py --save``: static (a recorded expert map)
or dynamic (``--dynamic-eplb``: the same manager as in training re-places experts while serving; it steps
once per forward pass).

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 examples/generate.py \\
        --load outputs/demo/checkpoint --expert-map-path outputs/demo/expert_map.json \\
        --num-layers 4 --hidden-size 64 --num-experts 16 --moe-router-topk 2

Every data-parallel replica serves its own requests (greedy decoding, byte level); the experts are spread
over the EP ranks as the map says (replicas of hot experts included).  ``--tensor-model-parallel-size 2``
serves with attention TP (without sequence parallelism: the prompts grow token by token); a checkpoint trained
under any TP / PP / EP loads (it is logical).  Pipeline stages are not used for serving (PP = 1).
``--deepspeed_config`` takes the training run's ds_config (ZeRO 2 included): its ``"eplb"`` section and bf16
apply.  Reports TTFT p50/p99, TPOT mean and the measured balancedness, next to the balancedness the default
placement would have had on the same loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import ByteBatches, decode, load_domain  # noqa: E402
from train import add_model_args, build_model, causal_mask, device, init_parallel, quiet_known_warnings  # noqa: E402

from megatron_eplb.config import EPLBConfig, add_eplb_args  # noqa: E402
from megatron_eplb.errors import EPLBConfigError, EPLBError  # noqa: E402

log = logging.getLogger("megatron_eplb.generate")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0))
    )
    add_model_args(parser)
    g = parser.add_argument_group("generation")
    g.add_argument("--load", required=True, help="checkpoint directory written by train.py --save")
    g.add_argument(
        "--tag", default=None, help="the tag to load from --load (default: the one in LOAD/latest)"
    )
    g.add_argument("--domain", default="wikipedia", help="where the prompts come from")
    g.add_argument("--requests", type=int, default=8, help="requests per rank")
    g.add_argument("--batch-size", type=int, default=2, help="requests decoded together")
    g.add_argument("--prompt-len", type=int, default=64)
    g.add_argument("--new-tokens", type=int, default=32)
    g.add_argument("--metrics-out", default=None)
    g.add_argument(
        "--no-eplb",
        action="store_true",
        help="baseline: Megatron's own expert layout (no EPLB patch), same checkpoint",
    )
    g.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        default=None,
        help='the training run\'s ds_config (e.g. configs/ds_config_zero2.json): its "eplb" section and bf16 '
        "apply; its ZeRO stage and optimizer do not (serving runs no optimizer)",
    )
    add_eplb_args(parser)
    args = parser.parse_args(argv)
    args.ds_config = None
    if args.deepspeed_config is not None:
        path = Path(args.deepspeed_config)
        if not path.is_file():
            parser.error(f"--deepspeed_config {path} does not exist")
        args.ds_config = json.loads(path.read_text())
        args.bf16 = args.bf16 or bool((args.ds_config.get("bf16") or {}).get("enabled", False))
    return args


def _gather_floats(values: list[float]) -> list[float]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return [v for part in out for v in part]


def resolve_placement(args: argparse.Namespace, ckpt: Path, map_sha256: str | None = None):
    """The static placement to serve with: ``--expert-map-path``, else the map saved beside the checkpoint
    (checked against the payload's ``map_sha256`` when given).  Returns ``(ExpertPlacement, where it came
    from)``."""
    from megatron_eplb.checkpoint import load_expert_map
    from megatron_eplb.placement import ExpertPlacement

    eplb = EPLBConfig.from_args(args, args.ds_config)
    if eplb.expert_map_path is None:
        saved = load_expert_map(ckpt, map_sha256)
        if saved is None:
            raise FileNotFoundError(f"{ckpt}: no expert_map.json; pass --expert-map-path")
        return saved, str(ckpt / "expert_map.json")
    return ExpertPlacement.from_json(eplb.expert_map_path, allow_same_rank_copies=True), eplb.expert_map_path


def load_unpatched(
    model: torch.nn.Module, logical_state: dict, source: str = "checkpoint", saved_facts: dict | None = None
) -> None:
    """Load a logical checkpoint into a model *without* EPLB: Megatron's own layout, logical expert ``e``
    on EP rank ``e // (E / EP)`` as its local expert ``e % (E / EP)`` (either expert class)."""
    from megatron_eplb.patches import megatron as eplb_mcore

    from megatron_eplb.checkpoint import check_state_fits

    state = eplb_mcore.unpatched_state_dict(model, logical_state)
    experts = {id(p) for _, layer in eplb_mcore.find_moe_layers(model) for p in layer.experts.parameters()}
    state = eplb_mcore.tp.shard_dense_state(model, state, experts)  # TP > 1: this rank's shards
    check_state_fits(state, model, source=source, saved_facts=saved_facts)
    model.load_state_dict(state, strict=False)


def load_model(args: argparse.Namespace, ep: int, ckpt: Path, placement=None, payload: dict | None = None):
    """Build the model and load the logical checkpoint ``ckpt`` into it (``payload``: already read).

    The file is read with its checksums verified, and the model's shape facts are compared with the ones it
    was trained with before anything is loaded.  With ``placement`` (static EPLB) the model is patched
    (``megatron.apply``) and every slot filled from its logical expert; with ``None`` it stays Megatron's own
    model.  Returns ``(model, handle or None, payload metadata)``."""
    from megatron_eplb.patches import megatron as eplb_mcore

    from megatron_eplb.checkpoint import CHECKPOINT_FILENAME, check_state_fits, read_logical_checkpoint

    payload = read_logical_checkpoint(ckpt) if payload is None else payload
    model = build_model(args, ep)
    source, saved_facts = str(ckpt / CHECKPOINT_FILENAME), payload.get("model_facts")
    facts = eplb_mcore.model_facts(model, len(eplb_mcore.find_moe_layers(model)))
    check_state_fits({}, model, source=source, saved_facts=saved_facts, facts=facts)
    handle = None
    if placement is not None:
        handle = eplb_mcore.apply(model, placement, EPLBConfig.from_args(args, args.ds_config))
        handle.load_logical_state_dict(payload["model"], strict=False)
    else:
        load_unpatched(model, payload["model"], source, saved_facts)
    model.eval()
    return model, handle, {k: v for k, v in payload.items() if k not in ("model", "optimizer", "checksums")}


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module, tokens: torch.Tensor, new_tokens: int, seq_length: int, after_forward=None
) -> tuple[torch.Tensor, list[float]]:
    """Greedy decoding (full recompute per token, window of ``seq_length``).

    Args:
        tokens: int64 ``[B, T]`` prompts.
        after_forward: called after every forward pass (dynamic EPLB: ``manager.step``).
    Returns:
        (int64 ``[B, T + new_tokens]``, ``[new_tokens]`` seconds from the start to each token).
    """
    times = []
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        window = tokens[:, -seq_length:]
        n = window.shape[1]
        pos = torch.arange(n, device=window.device)[None].expand(window.shape[0], -1)
        logits = model(
            window, pos, causal_mask(n).to(window.device), runtime_gather_output=True
        )  # TP: whole vocab
        if after_forward is not None:
            after_forward()
        nxt = logits[:, -1].float().argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
        if tokens.is_cuda:
            torch.cuda.synchronize()  # the token exists now, not only its kernels' launch
        times.append(time.perf_counter() - t0)
    return tokens, times


def generate(args: argparse.Namespace) -> dict:
    from megatron_eplb.placement import ExpertPlacement
    from megatron_eplb.stats import balance_summary, balancedness

    if args.pipeline_model_parallel_size > 1 or args.sequence_parallel:
        raise EPLBConfigError(
            "generate.py serves with --pipeline-model-parallel-size 1 and without --sequence-parallel (prompts grow "
            "by one token per step); supported: --tensor-model-parallel-size N with any EP. A checkpoint trained "
            "with pipeline stages or sequence parallelism loads into it (checkpoints are logical)"
        )
    ep = init_parallel(args.expert_model_parallel_size, args.seed, args.tensor_model_parallel_size)
    rank = dist.get_rank()
    from megatron.core import parallel_state as ps
    from megatron_eplb.patches.deepspeed import resolve_tag

    from megatron_eplb.checkpoint import read_logical_checkpoint

    load_dir = Path(args.load)
    ckpt = load_dir / resolve_tag(load_dir, args.tag)
    payload = read_logical_checkpoint(ckpt)
    placement, map_source = (
        (None, "none (--no-eplb)")
        if args.no_eplb
        else resolve_placement(args, ckpt, payload.get("expert_map_sha256"))
    )
    model, handle, meta = load_model(args, ep, ckpt, placement, payload)
    if rank == 0:
        log.info(
            "%s: %r from %s, checkpoint %s (step %s)",
            "no EPLB" if handle is None else "dynamic EPLB from" if args.dynamic_eplb else "static EPLB",
            placement,
            map_source,
            ckpt,
            meta.get("global_steps"),
        )
    data = ByteBatches(
        load_domain(args.domain),
        args.batch_size,
        args.prompt_len,
        seed=args.seed + 7,
        rank=ps.get_data_parallel_rank(),
    )
    ttft, tpot = [], []
    sample = ""
    manager = None
    if handle is not None:
        handle.reset_loads()
        eplb = EPLBConfig.from_args(args, args.ds_config)
        if eplb.dynamic_eplb or eplb.eplb_trace_path:  # a static map with a trace: the manager records only
            from megatron_eplb.manager import EPLBManager

            manager = EPLBManager(handle, eplb)
            manager.trace_meta.update(script="examples/generate.py", domains=[args.domain])
    for _ in range(max(1, args.requests // args.batch_size)):
        tokens = data.next()[0].to(device())
        dist.barrier()
        tokens, times = greedy_generate(
            model, tokens, args.new_tokens, args.seq_length, manager.step if manager else None
        )
        ttft.extend([times[0]] * tokens.shape[0])
        tpot.extend(np.diff(times).tolist())
        sample = decode(tokens[0, -args.new_tokens :].tolist())
    ttft_all, tpot_all = _gather_floats(ttft), _gather_floats(tpot)
    result = {
        "ttft_p50_ms": float(np.percentile(ttft_all, 50) * 1e3),
        "ttft_p99_ms": float(np.percentile(ttft_all, 99) * 1e3),
        "tpot_mean_ms": float(np.mean(tpot_all) * 1e3) if tpot_all else float("nan"),
        "requests": len(ttft_all),
        "expert_map": map_source,
        "sample": sample,
    }
    if manager is not None:  # loads of the manager's last window, placement as it is now
        logical_np, full_np = manager.gather_window()
        logical, full = torch.from_numpy(logical_np), torch.from_numpy(full_np)
        result["rebalances"] = [r.as_dict() for r in manager.history]
        manager.close()
    elif handle is not None:
        slot = handle.slot_loads().clone()
        logical = handle.loads().clone()
        full = torch.zeros(handle.num_layers, handle.num_slots, dtype=torch.int64, device=slot.device)
        s = handle.slots_per_rank
        full[:, handle.ep_rank * s : (handle.ep_rank + 1) * s] = slot
        dist.all_reduce(full)
        dist.all_reduce(logical)
        full, logical = full.cpu(), logical.cpu()
    if handle is not None:
        s = handle.slots_per_rank
        rank_load = full.reshape(handle.num_layers, handle.ep_size, s).sum(-1).numpy()
        measured = balancedness(rank_load)
        default = ExpertPlacement.default(handle.num_layers, handle.num_experts, handle.ep_size, 0)
        result["balancedness"] = float(measured.mean())
        result["balancedness_per_layer"] = measured.tolist()
        result["balancedness_default_placement"] = balance_summary(default, logical.numpy())["mean"]
    if rank == 0:
        log.info(
            "inference: %d requests | TTFT p50 %.1f ms p99 %.1f ms | TPOT mean %.1f ms%s",
            result["requests"],
            result["ttft_p50_ms"],
            result["ttft_p99_ms"],
            result["tpot_mean_ms"],
            ""
            if handle is None
            else f" | balancedness {result['balancedness']:.3f} with {'dynamic EPLB' if manager and manager.config.dynamic_eplb else 'the recorded map'}"
            f" (default placement without replicas on the same loads: "
            f"{result['balancedness_default_placement']:.3f})",
        )
        log.info("sample continuation: %r", sample)
        if args.metrics_out:
            Path(args.metrics_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.metrics_out).write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))
    quiet_known_warnings()
    args = parse_args(argv)
    if int(os.environ.get("RANK", 0)) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        generate(args)
    except EPLBError as exc:  # one line on rank 0; the traceback only at DEBUG
        log.debug("generate.py failed", exc_info=True)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"generate.py: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
