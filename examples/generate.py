"""Static-EPLB inference from a checkpoint written by ``examples/train.py --save``, with a recorded expert map.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 examples/generate.py \\
        --load outputs/demo/checkpoint --expert-map-path outputs/demo/expert_map.json \\
        --num-layers 4 --hidden-size 64 --num-experts 16 --moe-router-topk 2

Every rank serves its own requests (greedy decoding, byte level); the experts are spread over the EP
ranks as the map says (replicas of hot experts included).  Reports TTFT p50/p99, TPOT mean and the
measured balancedness, next to the balancedness the default placement would have had on the same loads.
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
from train import add_model_args, build_model, causal_mask, init_parallel  # noqa: E402

from megatron_eplb.config import EPLBConfig, add_eplb_args  # noqa: E402

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
    g.add_argument("--tag", default=None)
    g.add_argument("--domain", default="wikipedia", help="where the prompts come from")
    g.add_argument("--requests", type=int, default=8, help="requests per rank")
    g.add_argument("--batch-size", type=int, default=2, help="requests decoded together")
    g.add_argument("--prompt-len", type=int, default=64)
    g.add_argument("--new-tokens", type=int, default=32)
    g.add_argument("--metrics-out", default=None)
    add_eplb_args(parser)
    return parser.parse_args(argv)


def _gather_floats(values: list[float]) -> list[float]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return [v for part in out for v in part]


def generate(args: argparse.Namespace) -> dict:
    from megatron_eplb.patches import megatron as eplb_mcore

    from megatron_eplb.checkpoint import load_expert_map
    from megatron_eplb.placement import ExpertPlacement
    from megatron_eplb.stats import balance_summary, balancedness

    ep = init_parallel(args.expert_model_parallel_size, args.seed)
    rank = dist.get_rank()
    load_dir = Path(args.load)
    tag = args.tag or (load_dir / "latest").read_text().strip()
    ckpt = load_dir / tag
    eplb = EPLBConfig.from_args(args)
    if eplb.expert_map_path is None:
        saved = load_expert_map(ckpt)
        if saved is None:
            raise FileNotFoundError(f"{ckpt}: no expert_map.json; pass --expert-map-path")
        placement = saved
        map_source = str(ckpt / "expert_map.json")
    else:
        placement = ExpertPlacement.from_json(eplb.expert_map_path, allow_same_rank_copies=True)
        map_source = eplb.expert_map_path
    model = build_model(args, ep)
    handle = eplb_mcore.apply(model, placement, eplb)
    payload = torch.load(ckpt / "model_logical.pt", map_location="cpu", weights_only=False)
    handle.load_logical_state_dict(payload["model"], strict=False)
    model.eval()
    if rank == 0:
        log.info(
            "static EPLB: %r from %s, checkpoint %s (step %s)",
            placement,
            map_source,
            ckpt,
            payload.get("global_steps"),
        )
    data = ByteBatches(
        load_domain(args.domain), args.batch_size, args.prompt_len, seed=args.seed + 7, rank=rank
    )
    ttft, tpot = [], []
    sample = ""
    handle.reset_loads()
    with torch.no_grad():
        for _ in range(max(1, args.requests // args.batch_size)):
            tokens, _ = data.next()
            dist.barrier()
            t0 = time.perf_counter()
            for i in range(args.new_tokens):
                n = tokens.shape[1]
                if n > args.seq_length:
                    tokens = tokens[:, -args.seq_length :]
                    n = args.seq_length
                pos = torch.arange(n)[None].expand(tokens.shape[0], -1)
                logits = model(tokens, pos, causal_mask(n))
                nxt = logits[:, -1].float().argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, nxt], dim=1)
                now = time.perf_counter()
                if i == 0:
                    ttft.extend([now - t0] * tokens.shape[0])
                    t_prev = now
                else:
                    tpot.append(now - t_prev)
                    t_prev = now
            sample = decode(tokens[0, -args.new_tokens :].tolist())
    slot = handle.slot_loads().clone()
    logical = handle.loads().clone()
    full = torch.zeros(handle.num_layers, handle.num_slots, dtype=torch.int64)
    s = handle.slots_per_rank
    full[:, handle.ep_rank * s : (handle.ep_rank + 1) * s] = slot
    dist.all_reduce(full)
    dist.all_reduce(logical)
    rank_load = full.reshape(handle.num_layers, handle.ep_size, s).sum(-1).numpy()
    measured = balancedness(rank_load)
    default = ExpertPlacement.default(handle.num_layers, handle.num_experts, handle.ep_size, 0)
    default_bal = balance_summary(default, logical.numpy())
    ttft_all, tpot_all = _gather_floats(ttft), _gather_floats(tpot)
    result = {
        "ttft_p50_ms": float(np.percentile(ttft_all, 50) * 1e3),
        "ttft_p99_ms": float(np.percentile(ttft_all, 99) * 1e3),
        "tpot_mean_ms": float(np.mean(tpot_all) * 1e3) if tpot_all else float("nan"),
        "requests": len(ttft_all),
        "balancedness": float(measured.mean()),
        "balancedness_per_layer": measured.tolist(),
        "balancedness_default_placement": default_bal["mean"],
        "expert_map": map_source,
        "sample": sample,
    }
    if rank == 0:
        log.info(
            "inference: %d requests | TTFT p50 %.1f ms p99 %.1f ms | TPOT mean %.1f ms | balancedness %.3f with the "
            "recorded map (default placement without replicas on the same loads: %.3f)",
            result["requests"],
            result["ttft_p50_ms"],
            result["ttft_p99_ms"],
            result["tpot_mean_ms"],
            result["balancedness"],
            result["balancedness_default_placement"],
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
    args = parse_args(argv)
    if int(os.environ.get("RANK", 0)) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    generate(args)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
