"""Train a small Megatron-core GPT MoE under DeepSpeed with EPLB, on real text (byte level).

Run with the DeepSpeed launcher (CPU: ``DS_ACCELERATOR=cpu``; gloo)::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 examples/train.py \\
        --deepspeed_config configs/ds_config.json --eplb-config configs/eplb_dynamic.yaml \\
        --num-layers 4 --hidden-size 64 --num-experts 16 --moe-router-topk 2 \\
        --expert-model-parallel-size 2 --init-redundancy-expert 2 --train-iters 200

EPLB flags are the config keys in kebab case (``--dynamic-eplb``, ``--num-iterations-eplb-update`` ...),
plus ``--eplb-config FILE.yaml`` and ``--additional-config JSON``; the ds_config ``"eplb"`` section is the
lowest-precedence source.  Half-way (``--switch-at``) the data switches domain (code -> Wikipedia prose),
which shifts the routing; every completed rebalance prints the balancedness before and after.

bf16 + ZeRO 1 + gradient accumulation: ``--deepspeed_config configs/ds_config_zero1_bf16.json --bf16``;
ZeRO 2: ``--deepspeed_config configs/ds_config_zero2.json``.  Tensor parallelism for attention and dense
layers (experts keep TP = 1): ``--tensor-model-parallel-size 2 --sequence-parallel``.
Resume on fewer ranks (e.g. one GPU lost): ``deepspeed --num_gpus 1 examples/train.py --load CKPT ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import VOCAB_SIZE, ByteBatches, available_domains, load_domain  # noqa: E402

from megatron_eplb.config import add_eplb_args  # noqa: E402

log = logging.getLogger("megatron_eplb.train")


# ============================================================================ arguments


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model (Megatron-style)")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--ffn-hidden-size", type=int, default=128, help="expert FFN size")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--num-experts", type=int, default=16)
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument(
        "--expert-model-parallel-size", type=int, default=None, help="EP size (default: world size)"
    )
    g.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="TP size of attention and dense layers (experts keep TP = 1); training with TP > 1 needs "
        "--sequence-parallel",
    )
    g.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism (TP > 1)")
    g.add_argument("--moe-token-dispatcher-type", default="alltoall", choices=["alltoall", "allgather"])
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0, help="0 keeps routing free to drift")
    g.add_argument("--moe-router-enable-expert-bias", action="store_true")
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--bf16", action="store_true", help="bf16 model (ds_config bf16 is switched on too)")
    g.add_argument("--seed", type=int, default=1234)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0))
    )
    parser.add_argument("--deepspeed_config", "--deepspeed-config", default="configs/ds_config.json")
    parser.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed compatibility")
    add_model_args(parser)
    t = parser.add_argument_group("training")
    t.add_argument("--train-iters", type=int, default=200)
    t.add_argument("--micro-batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=None,
        help="override ds_config gradient_accumulation_steps (EPLB steps at accumulation boundaries only)",
    )
    t.add_argument("--zero-stage", type=int, default=None, help="override zero_optimization.stage")
    t.add_argument(
        "--gradient-clipping", type=float, default=None, help="override ds_config gradient_clipping"
    )
    t.add_argument("--domains", default="code,wikipedia", help="first,second domain (switch at --switch-at)")
    t.add_argument("--switch-at", type=float, default=0.5, help="fraction of --train-iters")
    t.add_argument("--log-interval", type=int, default=10)
    t.add_argument("--no-eplb", action="store_true", help="DeepSpeed + Megatron MoE without EPLB (baseline)")
    t.add_argument("--save", default=None, help="checkpoint directory (logical experts + expert map)")
    t.add_argument(
        "--load",
        default=None,
        help="resume from a checkpoint written by --save (any EP size: at another EP size, e.g. one GPU "
        "lost, the placement is re-planned for the new EP size from the recorded load)",
    )
    t.add_argument("--output-dir", default="outputs/train")
    t.add_argument("--metrics-out", default=None, help="write losses/rebalances as JSON (rank 0)")
    t.add_argument(
        "--print-config", action="store_true", help="print the resolved EPLB config as JSON and exit"
    )
    t.add_argument("--no-wandb", action="store_true")
    add_eplb_args(parser)
    args = parser.parse_args(argv)
    if args.save and args.no_eplb:
        parser.error(
            "--save writes a logical EPLB checkpoint (every logical expert once + the expert map); the "
            "--no-eplb baseline keeps Megatron's own layout: drop --save or --no-eplb"
        )
    return args


# ============================================================================ model


def causal_mask(seq_len: int) -> torch.Tensor:
    """bool ``[1, 1, T, T]``, True = masked (Megatron's convention)."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)[None, None]


def device() -> torch.device:
    """This rank's device: its GPU under CUDA (set by :func:`init_parallel`), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_parallel(ep_size: int | None, seed: int = 1234, tp_size: int = 1) -> int:
    """NCCL (one GPU per process, ``LOCAL_RANK``) or gloo (CPU) process group and Megatron's parallel state
    (TP ``tp_size`` for attention and dense layers, expert TP 1); returns the EP size."""
    import deepspeed
    from megatron.core import parallel_state as ps
    from megatron_eplb.patches import megatron as eplb_mcore

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    eplb_mcore.enable_cpu()  # CPU + gloo only; on CUDA only the version fixes of ensure_compat()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    world = dist.get_world_size()
    ep = ep_size or world
    if world % tp_size:
        from megatron_eplb.patches.deepspeed import DeepSpeedEPLBError

        raise DeepSpeedEPLBError(
            f"--tensor-model-parallel-size {tp_size} does not divide the world size {world}; choose one of "
            f"{[d for d in range(1, world + 1) if world % d == 0]}"
        )
    if world % ep:
        from megatron_eplb.patches.deepspeed import DeepSpeedEPLBError

        raise DeepSpeedEPLBError(
            f"--expert-model-parallel-size {ep} does not divide the world size {world}; choose one of "
            f"{[d for d in range(1, world + 1) if world % d == 0]}"
        )
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp_size, expert_model_parallel_size=ep, expert_tensor_parallel_size=1
        )
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed)
    return ep


def build_model(args: argparse.Namespace, ep_size: int) -> torch.nn.Module:
    """A Megatron-core GPTModel with MoE in every layer (SequentialMLP experts), deterministic init:
    dense weights from ``seed``, logical expert ``e`` of layer ``l`` from ``(seed, l, e)`` on whichever
    EP rank holds it — so any EP size builds the same logical model."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    cfg = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        moe_ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_moe_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        expert_model_parallel_size=ep_size,
        expert_tensor_parallel_size=1,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_grouped_gemm=False,
        moe_router_load_balancing_type="aux_loss" if args.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        moe_router_score_function="sigmoid" if args.moe_router_enable_expert_bias else "softmax",
        moe_router_dtype="fp32",
        use_cpu_initialization=True,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=args.bf16,
        params_dtype=dtype,
        init_method_std=0.02,
    )
    spec = get_gpt_layer_local_spec(num_experts=args.num_experts, moe_grouped_gemm=False)
    if args.sequence_parallel:  # torch norms that allow sequence parallelism (no Apex / Transformer Engine)
        from megatron_eplb.patches.megatron.tp import sequence_parallel_block_spec

        spec = sequence_parallel_block_spec(spec, args.num_layers)
    torch.manual_seed(args.seed)
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=spec,
        vocab_size=VOCAB_SIZE,
        max_sequence_length=args.seq_length,
        position_embedding_type="learned_absolute",
    )
    ep_rank = ps.get_expert_model_parallel_rank()
    num_local = args.num_experts // ep_size
    with torch.no_grad():
        for layer_id, layer in enumerate(model.decoder.layers):
            for k, expert in enumerate(layer.mlp.experts.local_experts):
                g = torch.Generator().manual_seed(
                    args.seed * 100_003 + layer_id * 1009 + ep_rank * num_local + k
                )
                for p in expert.parameters():
                    p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    return model.to(device())


def ds_config_for(args: argparse.Namespace) -> dict:
    path = Path(args.deepspeed_config)
    cfg = json.loads(path.read_text())
    cfg["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    cfg.pop("train_batch_size", None)
    cfg.setdefault("gradient_accumulation_steps", 1)
    if args.gradient_accumulation_steps is not None:
        cfg["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    if args.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if args.gradient_clipping is not None:
        cfg["gradient_clipping"] = args.gradient_clipping
    if args.bf16:
        cfg["bf16"] = {"enabled": True}
    elif (cfg.get("bf16") or {}).get("enabled", False):
        args.bf16 = True  # a bf16 ds_config needs the bf16 model (build_model reads args.bf16)
    cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})["params"]["lr"] = args.lr
    return cfg


# ============================================================================ metrics


def make_monitor(args, run_name: str):
    if dist.get_rank() != 0:
        return None
    from megatron_eplb.monitor import Monitor

    return Monitor(
        out_dir=args.output_dir,
        run_name=run_name,
        use_wandb=not args.no_wandb,
        config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
    )


# ============================================================================ main


def train(args: argparse.Namespace) -> dict:
    from megatron_eplb.patches import deepspeed as eplb_ds

    from megatron_eplb.config import EPLBConfig

    ds_cfg = ds_config_for(args)
    if args.print_config:
        print("EPLB_CONFIG " + EPLBConfig.from_args(args, ds_cfg).to_json(), flush=True)
        return {}
    ep = init_parallel(args.expert_model_parallel_size, args.seed, args.tensor_model_parallel_size)
    rank = dist.get_rank()
    from megatron.core import parallel_state as ps

    data_rank = ps.get_data_parallel_rank()  # the TP ranks of one replica read the same batches
    model = build_model(args, ep)
    monitor = None if args.no_eplb else make_monitor(args, Path(args.output_dir).name)
    engine, _, _, _, manager = eplb_ds.initialize(
        model=model, config=ds_cfg, eplb=False if args.no_eplb else None, args=args, monitor=monitor
    )
    handle = engine.eplb_handle
    if args.load:
        eplb_ds.load_checkpoint(engine, manager, args.load)
    domains = args.domains.split(",")
    if rank == 0:
        log.info("text domains available: %s; training on %s", available_domains(), " -> ".join(domains))
    batches = [
        ByteBatches(load_domain(d), args.micro_batch_size, args.seq_length, seed=args.seed, rank=data_rank)
        for d in domains
    ]
    switch = int(args.train_iters * args.switch_at) if len(domains) > 1 else args.train_iters + 1
    dev = device()
    mask = causal_mask(args.seq_length).to(dev)
    pos = torch.arange(args.seq_length, device=dev)[None].expand(args.micro_batch_size, -1)
    losses, rebalances = [], []
    t_start = time.monotonic()
    for it in range(1, args.train_iters + 1):
        domain = 0 if it <= switch else 1
        if it == switch + 1 and rank == 0:
            log.info(
                "step %d: data switches domain %s -> %s (routing will shift)", it, domains[0], domains[1]
            )
        tokens, labels = (t.to(dev, non_blocking=True) for t in batches[domain].next())
        per_token = engine(tokens, pos, mask, labels=labels)
        loss = per_token.float().mean()
        engine.backward(loss)
        engine.step()
        value = loss.detach().clone()
        dist.all_reduce(value)
        value = float(value) / dist.get_world_size()
        losses.append(value)
        record = engine.eplb_last_record
        if record is not None:
            info = record.as_dict()
            rebalances.append(info)
            if rank == 0:
                log.info(
                    "step %d: rebalance %s: balancedness %.3f -> %.3f (predicted on the window), %d slots moved "
                    "(%.1f KiB), %s",
                    it,
                    record.outcome,
                    record.balancedness_before,
                    record.balancedness_after,
                    record.moved_slots,
                    record.moved_bytes / 1024,
                    ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in record.seconds.items()),
                )
        if it % args.log_interval == 0 or it == args.train_iters:
            scalars = {"loss": value, "domain": domain}
            if manager is not None and manager.realized:  # the manager's last eplb_log_interval steps
                scalars["balancedness"] = manager.realized[-1]["eplb/balancedness_realized"]
            if rank == 0:
                elapsed = time.monotonic() - t_start
                log.info(
                    "step %4d/%d | %s | loss %.4f | realized balancedness %s | %.2f s/step",
                    it,
                    args.train_iters,
                    domains[domain],
                    value,
                    f"{scalars['balancedness']:.3f}" if "balancedness" in scalars else "n/a",
                    elapsed / it,
                )
                if monitor is not None:
                    monitor.log(it, scalars)
    result = {
        "losses": losses,
        "rebalances": rebalances,
        "realized_balancedness": manager.realized if manager is not None else [],
        "switch_step": switch,
        "seconds": time.monotonic() - t_start,
        "placement": handle.placement.phy2log.tolist() if handle is not None else None,
        "eplb": manager.config.to_dict() if manager is not None else None,
        "zero_stage": engine.zero_optimization_stage(),
    }
    if args.save:
        path = eplb_ds.save_checkpoint(engine, manager, args.save, tag="final")
        if rank == 0:
            log.info("checkpoint saved to %s (logical experts + expert_map.json)", path)
    if rank == 0 and args.metrics_out:
        Path(args.metrics_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics_out).write_text(json.dumps(result, default=float))
    if manager is not None:
        manager.close()
    if monitor is not None:
        monitor.close()
    return result


def main(argv=None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    args = parse_args(argv)
    if int(os.environ.get("RANK", 0)) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    train(args)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
