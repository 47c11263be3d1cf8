"""Train a small GPT whose MoE layers are DeepSpeed's own (``deepspeed.moe.layer.MoE``, as Megatron-DeepSpeed
builds them) under the ``deepspeed`` launcher, with dynamic EPLB, on real text (byte level).

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 examples/train_deepspeed_moe.py \\
        --deepspeed_config configs/ds_config.json --eplb-config configs/eplb_dynamic.yaml \\
        --num-experts 16 --moe-top-k 2 --capacity-factor 1.0 --train-iters 200

The model: token + position embeddings, ``--num-layers`` blocks of (attention, ``MoE``) and a head; every
``MoE`` has ``TopKGate`` (top-1 or top-2, ``--capacity-factor``, ``--no-drop-tokens``, random token
selection) → ``MOELayer`` → ``Experts``, expert-parallel over ``--ep-size`` ranks (default: all) with
DeepSpeed's expert-data-parallel groups beside.  The only EPLB line is ``eplb_dsmoe.initialize(...)``
instead of ``deepspeed.initialize(...)``; ``engine.save_checkpoint`` / ``engine.load_checkpoint`` keep
working (``--save`` / ``--load``).  Half-way (``--switch-at``) the data switches domain, which shifts the
routing; at the end rank 0 prints the realized balance summary (the Megatron demo's) and the share of
(token, expert) pairs the capacity dropped.  ``--eplb-capacity per_slot`` gives every physical slot its own
capacity (fewer drops; changes the math).
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import VOCAB_SIZE, ByteBatches, load_domain  # noqa: E402

from megatron_eplb.config import add_eplb_args  # noqa: E402

log = logging.getLogger("megatron_eplb.train_deepspeed_moe")


# ============================================================================ arguments


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model (deepspeed.moe.layer.MoE)")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--ffn-hidden-size", type=int, default=128, help="expert FFN size")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--num-experts", type=int, default=16)
    g.add_argument("--moe-top-k", type=int, default=2, choices=[1, 2], help="TopKGate k")
    g.add_argument("--ep-size", type=int, default=None, help="expert-parallel size (default: world size)")
    g.add_argument("--capacity-factor", type=float, default=1.0)
    g.add_argument("--eval-capacity-factor", type=float, default=None, help="default: --capacity-factor")
    g.add_argument("--min-capacity", type=int, default=4)
    g.add_argument("--no-drop-tokens", action="store_true", help="drop_tokens=False (dropless)")
    g.add_argument("--no-rts", action="store_true", help="use_rts=False (top-1 drops by position)")
    g.add_argument("--aux-loss-coeff", type=float, default=0.0, help="0 keeps routing free to drift")
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
    t.add_argument("--zero-stage", type=int, default=None, help="override zero_optimization.stage")
    t.add_argument(
        "--gradient-clipping", type=float, default=None, help="override ds_config gradient_clipping"
    )
    t.add_argument("--domains", default="code,wikipedia", help="first,second domain (switch at --switch-at)")
    t.add_argument("--switch-at", type=float, default=0.5, help="fraction of --train-iters")
    t.add_argument("--log-interval", type=int, default=10)
    t.add_argument("--no-eplb", action="store_true", help="the same model and engine without EPLB (baseline)")
    t.add_argument("--save", default=None, help="engine.save_checkpoint directory (tag 'final')")
    t.add_argument("--load", default=None, help="engine.load_checkpoint directory (its 'latest' tag)")
    t.add_argument("--output-dir", default="outputs/train_deepspeed_moe")
    t.add_argument("--metrics-out", default=None, help="write losses/rebalances/drops as JSON (rank 0)")
    t.add_argument("--no-wandb", action="store_true")
    add_eplb_args(parser)
    return parser.parse_args(argv)


# ============================================================================ model


class ExpertMLP(nn.Module):
    """One expert: ``fc2(gelu(fc1(x)))``."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm attention, then a DeepSpeed ``MoE`` in place of the MLP."""

    def __init__(self, args: argparse.Namespace, ep_size: int) -> None:
        from deepspeed.moe.layer import MoE

        super().__init__()
        h = args.hidden_size
        self.ln1 = nn.LayerNorm(h)
        self.attn = nn.MultiheadAttention(h, args.num_attention_heads, batch_first=True)
        self.ln2 = nn.LayerNorm(h)
        self.moe = MoE(
            h,
            ExpertMLP(h, args.ffn_hidden_size),
            num_experts=args.num_experts,
            ep_size=ep_size,
            k=args.moe_top_k,
            capacity_factor=args.capacity_factor,
            eval_capacity_factor=args.eval_capacity_factor or args.capacity_factor,
            min_capacity=args.min_capacity,
            drop_tokens=not args.no_drop_tokens,
            use_rts=not args.no_rts,
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.ln1(x)
        x = x + self.attn(y, y, y, attn_mask=mask, need_weights=False)[0]
        out, l_aux, _ = self.moe(self.ln2(x))
        return x + out, l_aux


class GPT(nn.Module):
    """A small GPT with a ``deepspeed.moe`` layer in every block; ``forward(tokens, labels)`` is the loss
    (cross entropy + ``aux_loss_coeff`` x the gates' aux losses), ``forward(tokens)`` the logits."""

    def __init__(self, args: argparse.Namespace, ep_size: int) -> None:
        super().__init__()
        self.aux_loss_coeff = args.aux_loss_coeff
        self.tok = nn.Embedding(VOCAB_SIZE, args.hidden_size)
        self.pos = nn.Embedding(args.seq_length, args.hidden_size)
        self.blocks = nn.ModuleList([Block(args, ep_size) for _ in range(args.num_layers)])
        self.ln_f = nn.LayerNorm(args.hidden_size)
        self.head = nn.Linear(args.hidden_size, VOCAB_SIZE, bias=False)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tokens.device), diagonal=1)
        aux = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x, l_aux = block(x, mask)
            aux = aux + l_aux.float()
        logits = self.head(self.ln_f(x)).float()
        if labels is None:
            return logits
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return loss + self.aux_loss_coeff * aux


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed() -> None:
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def build_model(args: argparse.Namespace, ep_size: int, use_data_before_expert_parallel: bool = False) -> GPT:
    """The GPT with deterministic weights: dense ones from ``seed``, logical expert ``e`` of layer ``l`` from
    ``(seed, l, e)`` on whichever EP rank holds it, so every EP size builds the same logical model (DeepSpeed
    puts expert ``r * E / EP + k`` on EP rank ``r``).  DeepSpeed's expert groups are created here, as the
    engine would create them (ds_config ``use_data_before_expert_parallelism``)."""
    from megatron_eplb.patches.deepspeed_moe import expert_groups

    ep_group, _ = expert_groups(ep_size, use_data_before_expert_parallel)
    torch.manual_seed(args.seed)
    model = GPT(args, ep_size)
    ep_rank = dist.get_rank(ep_group)
    num_local = args.num_experts // ep_size
    with torch.no_grad():
        for layer_id, block in enumerate(model.blocks):
            for k, expert in enumerate(block.moe.deepspeed_moe.experts.deepspeed_experts):
                g = torch.Generator().manual_seed(
                    args.seed * 100_003 + layer_id * 1009 + ep_rank * num_local + k
                )
                for p in expert.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.to(device())


def ds_config_for(args: argparse.Namespace) -> dict:
    cfg = json.loads(Path(args.deepspeed_config).read_text())
    cfg["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    cfg.pop("train_batch_size", None)
    cfg.setdefault("gradient_accumulation_steps", 1)
    if args.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if args.gradient_clipping is not None:
        cfg["gradient_clipping"] = args.gradient_clipping
    if args.bf16:
        cfg["bf16"] = {"enabled": True}
    cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})["params"]["lr"] = args.lr
    return cfg


def drop_rate(handle) -> float:
    """Share of the (token, expert) pairs routed since the last reset that the capacity dropped, over every
    rank (collective)."""
    from megatron_eplb.comm import collective_device

    counts = handle.drop_counts().sum(dim=0).to(collective_device(None))
    dist.all_reduce(counts)
    routed, dropped = (int(x) for x in counts.tolist())
    return dropped / routed if routed else 0.0


# ============================================================================ main


def train(args: argparse.Namespace) -> dict:
    from train import output_problems  # examples/train.py: the same checks of the output paths

    problems = output_problems(args)  # before DeepSpeed, the process group or the model start
    if problems:
        raise SystemExit("train_deepspeed_moe.py: error: " + "; ".join(problems))
    import deepspeed
    from megatron_eplb.patches import deepspeed_moe as eplb_dsmoe

    init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    ep = args.ep_size or world
    ds_cfg = ds_config_for(args)
    model = build_model(args, ep, bool(ds_cfg.get("use_data_before_expert_parallelism", False)))
    monitor = None
    if rank == 0 and not args.no_eplb:
        from megatron_eplb.monitor import Monitor

        monitor = Monitor(
            out_dir=args.output_dir, run_name=Path(args.output_dir).name, use_wandb=not args.no_wandb
        )
    engine, _, _, _, manager = eplb_dsmoe.initialize(
        model=model, config=ds_cfg, eplb=False if args.no_eplb else None, args=args, monitor=monitor
    )
    handle = engine.eplb_handle
    if args.load:
        engine.load_checkpoint(args.load)
    domains = args.domains.split(",")
    batches = [
        ByteBatches(load_domain(d), args.micro_batch_size, args.seq_length, seed=args.seed, rank=rank)
        for d in domains
    ]
    switch = int(args.train_iters * args.switch_at) if len(domains) > 1 else args.train_iters + 1
    dev = device()
    losses, rebalances, drops = [], [], []
    t0 = time.monotonic()
    for it in range(1, args.train_iters + 1):
        domain = 0 if it <= switch else 1
        if it == switch + 1 and rank == 0:
            log.info(
                "step %d: data switches domain %s -> %s (routing will shift)", it, domains[0], domains[1]
            )
        tokens, labels = (t.to(dev) for t in batches[domain].next())
        handle.reset_drop_counts()
        loss = engine(tokens, labels)
        engine.backward(loss)
        drops.append(drop_rate(handle))
        engine.step()
        value = loss.detach().float().clone()
        dist.all_reduce(value)
        losses.append(float(value) / world)
        record = engine.eplb_last_record
        if record is not None:
            rebalances.append(record.as_dict())
            if rank == 0:
                log.info(
                    "step %d: rebalance %s: balancedness %.3f -> %.3f (predicted on the window), %d slots moved",
                    it, record.outcome, record.balancedness_before, record.balancedness_after, record.moved_slots,
                )  # fmt: skip
        if rank == 0 and (it % args.log_interval == 0 or it == args.train_iters):
            realized = (
                manager.realized[-1]["eplb/balancedness_realized"] if manager and manager.realized else None
            )
            log.info(
                "step %4d/%d | %s | loss %.4f | dropped %.3f | realized balancedness %s | %.2f s/step",
                it, args.train_iters, domains[domain], losses[-1], drops[-1],
                "n/a" if realized is None else f"{realized:.3f}", (time.monotonic() - t0) / it,
            )  # fmt: skip
            if monitor is not None:
                monitor.log(it, {"loss": losses[-1], "eplb/drop_rate": drops[-1]})
    result = {
        "losses": losses,
        "drop_rates": drops,
        "rebalances": rebalances,
        "realized_balancedness": manager.realized if manager is not None else [],
        "switch_step": switch,
        "seconds": time.monotonic() - t0,
        "placement": handle.placement.phy2log.tolist(),
        "eplb": manager.config.to_dict() if manager is not None else None,
        "zero_stage": engine.zero_optimization_stage(),
        "deepspeed": deepspeed.__version__,
    }
    if args.save:
        engine.save_checkpoint(args.save, tag="final")
    if rank == 0:
        for line in summary(result):
            print(line, flush=True)
        if args.metrics_out:
            Path(args.metrics_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.metrics_out).write_text(json.dumps(result, default=float))
    if manager is not None:
        manager.close()
    if monitor is not None:
        monitor.close()
    return result


def summary(result: dict) -> list[str]:
    """The end-of-run lines: loss, the realized balance (the Megatron demo's summary), drops, rebalances."""
    from demo import realized_summary

    losses, drops = result["losses"], result["drop_rates"]
    lines = [
        "==> summary",
        f"    loss: first {losses[0]:.3f}, last {losses[-1]:.3f} over {len(losses)} steps",
    ]
    lines += ["    " + line for line in realized_summary(result)]
    lines.append(
        f"    (token, expert) pairs dropped by the capacity: {sum(drops) / max(len(drops), 1):.4f} per step"
    )
    for r in result["rebalances"]:
        lines.append(
            f"    rebalance at step {r['completed_step']}: {r['outcome']}, predicted balancedness "
            f"{r['balancedness_before']:.3f} -> {r['balancedness_after']:.3f}, {r['moved_slots']} slots moved"
        )
    return lines


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
