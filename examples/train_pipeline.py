"""Train the example GPT MoE with pipeline parallelism (PP > 1) and EPLB.

``examples/train.py --pipeline-model-parallel-size N`` (N > 1) runs this: DeepSpeed's engine cannot run
Megatron-core's pipeline schedules, so the step is Megatron's own 1F1B (``get_forward_backward_func``, one
optimizer step per ``gradient_accumulation_steps`` micro-batches, at least N), a torch Adam and the EPLB
manager, as Megatron-core training without DeepSpeed does::

    torchrun --nproc_per_node 4 examples/train.py --pipeline-model-parallel-size 2 \\
        --expert-model-parallel-size 2 --dynamic-eplb --init-redundancy-expert 2 --train-iters 40

(gloo on CPU, NCCL on GPUs; ``deepspeed`` as the launcher works too).  Each stage holds its MoE layers and
balances them; layer ids in the maps, the metrics and the checkpoints are the whole model's.  ``--save DIR``
writes one logical checkpoint of all stages at the end (``DIR/iter_0000040``), which loads under any PP / EP
size (``manager.load_checkpoint``); ``--load`` restores one.  TP > 1 with sequence parallelism combines.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("train")

__all__ = ["train_pipeline"]


def train_pipeline(args: argparse.Namespace) -> dict:
    """Train ``args.train_iters`` optimizer steps through Megatron's pipeline schedule; returns the losses, the
    rebalances and the final placement rows of this stage (as ``train.train`` does)."""
    import train
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron_eplb.patches import megatron as eplb_mcore
    from megatron_eplb.patches.deepspeed.checkpoint import LATEST_FILENAME, resolve_tag, step_tag
    from megatron_eplb.patches.megatron.pipeline import finalize_grads

    from megatron_eplb.checkpoint_files import atomic_write_text
    from megatron_eplb.config import EPLBConfig
    from megatron_eplb.manager import EPLBManager

    pp = args.pipeline_model_parallel_size
    ds_cfg = train.ds_config_for(args)  # its "eplb" section and gradient_accumulation_steps
    micro = max(int(ds_cfg.get("gradient_accumulation_steps") or 1), pp)
    eplb = None if args.no_eplb else EPLBConfig.from_args(args, ds_cfg)
    if eplb is not None:
        eplb = eplb.replace(expert_map_record_path=train.record_path_for(args, eplb))
    ep = train.init_parallel(args.expert_model_parallel_size, args.seed, args.tensor_model_parallel_size, pp)
    rank = dist.get_rank()
    model = train.build_model(args, ep)
    handle = eplb_mcore.apply(model, config=eplb) if eplb is not None else None
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    monitor = None if eplb is None else train.make_monitor(args, Path(args.output_dir).name)
    manager = None if eplb is None else EPLBManager(handle, eplb, optimizer, monitor=monitor)
    start = 0
    if args.load and manager is not None:
        tag = resolve_tag(args.load, args.tag)
        start = int(manager.load_checkpoint(Path(args.load) / tag).get("global_steps") or 0)
    dev = train.device()
    domains = args.domains.split(",")
    switch = int(args.train_iters * args.switch_at) if len(domains) > 1 else args.train_iters + 1
    data = [
        train.ByteBatches(
            train.load_domain(d),
            args.micro_batch_size,
            args.seq_length,
            seed=args.seed,
            rank=ps.get_data_parallel_rank(),
        )
        for d in domains
    ]
    for i, batches in enumerate(data):  # a resumed run continues the data where it stopped
        batches.skip(micro * (min(start, switch) if i == 0 else max(0, start - switch)))
    mask = train.causal_mask(args.seq_length).to(dev)
    pos = torch.arange(args.seq_length, device=dev)[None].expand(args.micro_batch_size, -1)

    def forward_step(batches, model):
        tokens, labels = next(batches)
        out = model(tokens.to(dev), pos, mask, labels=labels.to(dev))

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

        return out, loss_func

    if rank == 0:
        log.info(
            "PP=%d x EP=%d (TP=%d): Megatron's 1F1B, %d micro-batches per step, torch Adam, EPLB %s",
            pp,
            ep,
            args.tensor_model_parallel_size,
            micro,
            "off" if manager is None else "on",
        )
    losses, rebalances, t0 = [], [], time.monotonic()
    for it in range(start + 1, args.train_iters + 1):
        optimizer.zero_grad(set_to_none=False)
        batches = data[0 if it <= switch else 1]
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([batches.next() for _ in range(micro)]),
            model=model,
            num_microbatches=micro,
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            forward_only=False,
        )
        finalize_grads(model)
        if manager is not None:
            manager.before_optimizer_step()
        optimizer.step()
        record = manager.step() if manager is not None else None
        if record is not None:
            rebalances.append(record.as_dict())
        loss = torch.zeros(1, device=dev)
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:  # once per replica
            loss += sum(float(o["loss"]) for o in out) / micro
        dist.all_reduce(loss)
        losses.append(float(loss) / ps.get_data_parallel_world_size())
        if rank == 0 and (it % args.log_interval == 0 or it == args.train_iters):
            log.info(
                "step %4d/%d | loss %.4f | %.2f s/step",
                it,
                args.train_iters,
                losses[-1],
                (time.monotonic() - t0) / (it - start),
            )
    if manager is not None:
        if args.save:  # DIR/iter_0000040 and DIR/latest, as examples/train.py (generate.py loads it)
            tag = step_tag(args.train_iters)
            manager.save_checkpoint(
                Path(args.save) / tag,
                extra={"global_steps": args.train_iters},
                overwrite=args.overwrite_checkpoints,
            )
            if rank == 0:
                atomic_write_text(Path(args.save) / LATEST_FILENAME, tag + "\n")
        manager.record_map()
        manager.close()
    if monitor is not None:
        monitor.close()
    result = {
        "losses": losses,
        "rebalances": rebalances,
        "realized_balancedness": manager.realized if manager is not None else [],
        "switch_step": switch,
        "completed": True,
        "pipeline_model_parallel_size": pp,
        "stage": None if handle is None or handle.stage is None else handle.stage.rank,
        "placement": None if handle is None else handle.placement.phy2log.tolist(),
        "seconds": time.monotonic() - t0,
    }
    if args.metrics_out and rank == 0:
        Path(args.metrics_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics_out).write_text(json.dumps(result))
    return result
