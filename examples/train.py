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
Grouped-GEMM experts (Megatron's legacy ``GroupedMLP``, bf16): ``--moe-grouped-gemm --bf16``; without the
``grouped_gemm`` package megatron-eplb's drop-in on ``torch._grouped_mm`` is installed for it.

Checkpoints (``--save DIR``) are tagged by iteration like Megatron's (``DIR/iter_0000040``, ``DIR/latest``
names the last complete one), every ``--save-interval`` iterations, at the end, and when SIGTERM or SIGINT
arrives (the ranks agree at the end of the step, save, write the metrics and the map, and exit with
128 + the signal number).  An existing tag is never replaced unless ``--overwrite-checkpoints``.  ``--load
DIR`` continues from the saved iteration (``--tag`` picks another than ``latest``): step counter, data
position and domain switch; ``--train-iters`` is the total, as in Megatron.  Resume on fewer ranks (e.g.
one GPU lost): ``deepspeed --num_gpus 1 examples/train.py --load CKPT ...``.  ``--save``, ``--metrics-out``,
``--output-dir`` and the record path are checked to be writable first, before DeepSpeed, Megatron or the
model start; ``--metrics-out`` is
rewritten (whole, atomically) every ``--log-interval`` steps.  With dynamic EPLB and no
``expert_map_record_path`` the map is recorded to ``OUTPUT_DIR/expert_map.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import VOCAB_SIZE, ByteBatches, available_domains, load_domain  # noqa: E402

from megatron_eplb.config import add_eplb_args  # noqa: E402
from megatron_eplb.errors import EPLBError  # noqa: E402

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
    g.add_argument(
        "--pipeline-model-parallel-size",
        type=int,
        default=1,
        help="pipeline stages (> 1: Megatron's 1F1B schedule with a torch Adam and the EPLB manager, "
        "examples/train_pipeline.py; gradient_accumulation_steps micro-batches per step, at least the stages)",
    )
    g.add_argument("--moe-token-dispatcher-type", default="alltoall", choices=["alltoall", "allgather"])
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0, help="0 keeps routing free to drift")
    g.add_argument("--moe-router-enable-expert-bias", action="store_true")
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--bf16", action="store_true", help="bf16 model (ds_config bf16 is switched on too)")
    g.add_argument(
        "--moe-grouped-gemm",
        action="store_true",
        help="experts as Megatron's legacy GroupedMLP (two grouped GEMMs per layer; megatron-core <= 0.16; needs "
        "--bf16): the grouped_gemm package where installed, else megatron-eplb's drop-in on torch._grouped_mm",
    )
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
    t.add_argument(
        "--save",
        default=None,
        help="checkpoint directory: DIR/iter_0000040 (logical experts + expert map), DIR/latest",
    )
    t.add_argument(
        "--save-interval",
        type=int,
        default=None,
        help="save every N iterations too (default: only at the end)",
    )
    t.add_argument(
        "--overwrite-checkpoints",
        action="store_true",
        help="let this run replace checkpoint tags in --save that are past its start (else an error before step 1)",
    )
    t.add_argument(
        "--load",
        default=None,
        help="continue from a checkpoint written by --save, at its iteration (--train-iters is the total); any "
        "EP size: at another EP size, e.g. one GPU lost, the placement is re-planned from the recorded load",
    )
    t.add_argument(
        "--tag", default=None, help="the tag to load from --load (default: the one in LOAD/latest)"
    )
    t.add_argument("--output-dir", default="outputs/train")
    t.add_argument(
        "--metrics-out",
        default=None,
        help="write losses/rebalances as JSON (rank 0), rewritten every --log-interval steps and at the end",
    )
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
    if args.load and args.no_eplb:
        parser.error(
            "--load reads a logical EPLB checkpoint into the EPLB model; the --no-eplb baseline keeps Megatron's "
            "own layout: drop --load or --no-eplb"
        )
    if args.save_interval is not None and (args.save_interval < 1 or not args.save):
        parser.error(f"--save-interval {args.save_interval} needs --save and a value >= 1")
    if args.tag is not None and not args.load:
        parser.error("--tag names the checkpoint to load: it needs --load")
    if args.train_iters < 1:
        parser.error(f"--train-iters {args.train_iters} must be >= 1 (the total number of iterations)")
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


def init_parallel(ep_size: int | None, seed: int = 1234, tp_size: int = 1, pp_size: int = 1) -> int:
    """NCCL (one GPU per process, ``LOCAL_RANK``) or gloo (CPU) process group and Megatron's parallel state
    (TP ``tp_size`` for attention and dense layers, expert TP 1, PP ``pp_size`` stages); returns the EP size
    (default: the ranks of one stage)."""
    import deepspeed
    from megatron.core import parallel_state as ps
    from megatron_eplb.patches import megatron as eplb_mcore

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    eplb_mcore.enable_cpu()  # CPU + gloo only; on CUDA only the version fixes of ensure_compat()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    world = dist.get_world_size()
    ep = ep_size or world // pp_size
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
    if pp_size > 1 and (world % (tp_size * pp_size) or world % (ep * pp_size)):
        from megatron_eplb.patches.deepspeed import DeepSpeedEPLBError

        raise DeepSpeedEPLBError(
            f"--pipeline-model-parallel-size {pp_size} with TP {tp_size} and EP {ep} does not fit the world size "
            f"{world}: world must be a multiple of TP x PP and of EP x PP"
        )
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp_size,
            pipeline_model_parallel_size=pp_size,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=1,
        )
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed)
    return ep


def local_expert_weights(experts: torch.nn.Module) -> list[list[torch.Tensor]]:
    """Per local expert, its weights as ``SequentialMLP`` holds them (``fc1 [F', H]``, ``fc2 [H, F]``): the
    parameters of ``SequentialMLP``; views into ``GroupedMLP``'s stacked ``weight1.view(S, H, -1)`` and
    ``weight2.view(S, -1, H)``, which hold them transposed.  Writing them writes the model."""
    if hasattr(experts, "local_experts"):
        return [[p.data for p in e.parameters()] for e in experts.local_experts]
    s, h = experts.num_local_experts, experts.config.hidden_size
    w1, w2 = experts.weight1.data.view(s, h, -1), experts.weight2.data.view(s, -1, h)
    return [[w1[k].T, w2[k].T] for k in range(s)]


def build_model(args: argparse.Namespace, ep_size: int) -> torch.nn.Module:
    """A Megatron-core GPTModel with MoE in every layer (SequentialMLP experts, or with
    ``--moe-grouped-gemm`` the legacy GroupedMLP), deterministic init: dense weights from ``seed``, logical
    expert ``e`` of layer ``l`` from ``(seed, l, e)`` on whichever EP rank holds it — so any EP size, and
    either expert class, builds the same logical model."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    grouped = bool(getattr(args, "moe_grouped_gemm", False))
    if grouped:
        if not args.bf16:
            raise ValueError(
                "--moe-grouped-gemm: Megatron's GroupedMLP runs in bf16 only (it asserts config.bf16); add --bf16"
            )
        from megatron_eplb.patches.megatron import grouped_gemm

        source = grouped_gemm.install()  # before the model is built: GroupedMLP checks for the package
        if dist.is_initialized() and dist.get_rank() == 0:
            log.info("GroupedMLP experts, grouped GEMM from: %s", source)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    pp = getattr(args, "pipeline_model_parallel_size", 1)
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
        pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype,
        batch_p2p_sync=torch.cuda.is_available(),
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_grouped_gemm=grouped,
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
    spec = get_gpt_layer_local_spec(num_experts=args.num_experts, moe_grouped_gemm=grouped)
    if args.sequence_parallel:  # torch norms that allow sequence parallelism (no Apex / Transformer Engine)
        from megatron.core.transformer.transformer_block import get_num_layers_to_build
        from megatron_eplb.patches.megatron.tp import sequence_parallel_block_spec

        spec = sequence_parallel_block_spec(
            spec, get_num_layers_to_build(cfg)
        )  # this pipeline stage's layers
    torch.manual_seed(args.seed)
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=spec,
        vocab_size=VOCAB_SIZE,
        max_sequence_length=args.seq_length,
        position_embedding_type="learned_absolute",
        pre_process=ps.is_pipeline_first_stage(),  # PP > 1: this stage's layers only
        post_process=ps.is_pipeline_last_stage(),
    )
    ep_rank = ps.get_expert_model_parallel_rank()
    num_local = args.num_experts // ep_size
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer_id = layer.layer_number - 1  # global: the same experts whatever the pipeline stages
            for k, weights in enumerate(local_expert_weights(layer.mlp.experts)):
                g = torch.Generator().manual_seed(
                    args.seed * 100_003 + layer_id * 1009 + ep_rank * num_local + k
                )
                for p in weights:
                    p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
        if args.bf16:  # every parameter, as DeepSpeed's bf16 engine casts them (Megatron keeps the position
            for (
                p
            ) in model.parameters():  # embedding fp32); buffers stay fp32. Also without DeepSpeed (generate)
                p.data = p.data.to(dtype)
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


# ============================================================================ console

# Upstream warnings that say nothing about this run (no Transformer Engine / apex on CPU, a deprecated
# default inside Megatron, torch's rename of two collectives Megatron still calls): silenced in the scripts.
HARMLESS_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
)


def quiet_known_warnings() -> None:
    """Silence :data:`HARMLESS_WARNINGS` (before Megatron is imported: most fire at import)."""
    import warnings

    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


# ============================================================================ outputs, signals, resume


class SetupError(SystemExit):
    """A bad output path or resume found before step 1: one line on stderr, exit code 1, nothing trained."""

    def __init__(self, message: str) -> None:
        super().__init__(f"train.py: error: {message}")


def _probe_dir(directory: Path) -> str | None:
    """Why ``directory`` cannot take files (created if missing), or None."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return None


def output_problems(args: argparse.Namespace, record_path: str | None = None) -> list[str]:
    """What keeps this run from writing its outputs (checked before step 1; creates the directories).  Local."""
    problems = []
    dirs = {"--save": args.save, "--output-dir": args.output_dir}
    files = {"--metrics-out": args.metrics_out, "expert_map_record_path": record_path}
    for flag, path in files.items():
        if path and Path(path).is_dir():
            problems.append(f"{flag} {path!r} is a directory; give a file name")
        elif path:
            dirs[f"{flag} {path!r}: its directory"] = str(Path(path).resolve().parent)
    for flag, path in dirs.items():
        why = _probe_dir(Path(path)) if path else None
        if why:
            problems.append(f"{flag} {path!r} is not writable ({why})")
    return problems


def later_tags(save_dir: str, start: int) -> list[str]:
    """Checkpoint tags in ``save_dir`` past iteration ``start`` (a run from ``start`` would write over them)."""
    from megatron_eplb.patches.deepspeed import checkpoint_tags

    return [
        t
        for t in checkpoint_tags(save_dir)
        if t.startswith("iter_") and t[5:].isdigit() and int(t[5:]) > start
    ]


def later_tag_problem(save_dir: str, later: list[str], start: int) -> list[str]:
    """The error for checkpoint tags past ``start`` that a run would write over (``[]`` when none)."""
    if not later:
        return []
    return [
        f"--save {save_dir} already holds checkpoints past iteration {start} ({', '.join(later)}), which this "
        "run would write over: choose another --save, continue from them with --load, or pass "
        "--overwrite-checkpoints"
    ]


def rank0_decides(problem: str | None) -> None:
    """Rank 0's verdict on every rank: raise :class:`SetupError` everywhere when it found a problem."""
    box = [problem]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise SetupError(box[0])


def no_rebalance_ahead(eplb, optimizer_steps: int) -> bool:
    """Dynamic EPLB that cannot rebalance within ``optimizer_steps`` (a step interval only, no time one)."""
    return (
        eplb.dynamic_eplb
        and eplb.eplb_update_interval is None
        and optimizer_steps < eplb.num_iterations_eplb_update
    )


class StopRequest:
    """SIGTERM / SIGINT set a flag (nothing else runs in the handler: no collective, safe under NCCL); the
    training loop agrees on it over all ranks at the end of a step, saves and exits.  A second SIGINT
    interrupts at once; a repeated SIGTERM is ignored (the launcher kills after its own grace period)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            log.warning(
                "%s received: saving and stopping at the end of this step", signal.Signals(signum).name
            )

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


class MetricsFile:
    """``--metrics-out`` on rank 0: the whole result rewritten atomically (a crash keeps the last write)."""

    def __init__(self, path: str | None) -> None:
        self.path = path if path and dist.get_rank() == 0 else None

    def write(self, result: dict) -> None:
        if self.path is None:
            return
        from megatron_eplb.checkpoint_files import atomic_write_text

        atomic_write_text(self.path, json.dumps(result, default=float))


def record_path_for(args: argparse.Namespace, eplb) -> str | None:
    """The record path this run uses: the config's, else (dynamic EPLB) ``OUTPUT_DIR/expert_map.json``
    (``expert_map.recorded.json`` when that is the map the run starts from)."""
    if eplb is None or eplb.expert_map_record_path or not eplb.dynamic_eplb:
        return None if eplb is None else eplb.expert_map_record_path
    path = Path(args.output_dir) / "expert_map.json"
    if eplb.expert_map_path and os.path.realpath(eplb.expert_map_path) == os.path.realpath(path):
        path = path.with_name("expert_map.recorded.json")
    return str(path)


# ============================================================================ main


def train(args: argparse.Namespace) -> dict:
    from megatron_eplb.patches import deepspeed as eplb_ds

    from megatron_eplb.config import EPLBConfig

    if args.pipeline_model_parallel_size > 1:  # the DeepSpeed engine cannot run Megatron's pipeline schedules
        from train_pipeline import train_pipeline

        return train_pipeline(args)
    ds_cfg = ds_config_for(args)
    eplb = None if args.no_eplb else EPLBConfig.from_args(args, ds_cfg)
    if eplb is not None:  # what needs the model, before the heavy start (every layer of this model is MoE)
        eplb.validate_for(
            args.num_layers,
            args.num_experts,
            args.expert_model_parallel_size or int(os.environ.get("WORLD_SIZE", 1)),
        )
    if args.print_config:
        print("EPLB_CONFIG " + (eplb or EPLBConfig.from_args(args, ds_cfg)).to_json(), flush=True)
        return {}
    record = record_path_for(args, eplb)
    if eplb is not None and record != eplb.expert_map_record_path:
        eplb = eplb.replace(expert_map_record_path=record)
    gas = int(ds_cfg["gradient_accumulation_steps"])
    if args.save_interval and args.save_interval % gas:
        raise SetupError(
            f"--save-interval {args.save_interval} is not a multiple of gradient_accumulation_steps {gas} "
            "(a checkpoint is taken at an optimizer step)"
        )
    # Outputs first, on every rank, before the heavy start (DeepSpeed's and Megatron's imports, the process
    # group, the model): a run that cannot write its checkpoints or metrics says so in a second.
    problems = output_problems(args, record)
    if args.save and not args.load and not args.overwrite_checkpoints:
        problems += later_tag_problem(args.save, later_tags(args.save, 0), 0)
    if problems:
        raise SetupError("; ".join(problems))
    ep = init_parallel(args.expert_model_parallel_size, args.seed, args.tensor_model_parallel_size)
    rank = dist.get_rank()
    from megatron.core import parallel_state as ps

    data_rank = ps.get_data_parallel_rank()  # the TP ranks of one replica read the same batches
    if rank == 0:
        log.info("building the model (%d layers, %d experts, EP=%d)", args.num_layers, args.num_experts, ep)
    model = build_model(args, ep)
    monitor = None if args.no_eplb else make_monitor(args, Path(args.output_dir).name)
    if rank == 0:
        log.info("starting DeepSpeed (its first run on a machine JIT-builds a few ops: a minute or two)")
    engine, _, _, _, manager = eplb_ds.initialize(
        model=model, config=ds_cfg, eplb=False if args.no_eplb else eplb, args=args, monitor=monitor
    )
    handle = engine.eplb_handle
    domains = args.domains.split(",")
    switch = int(args.train_iters * args.switch_at) if len(domains) > 1 else args.train_iters + 1
    start, consumed = 0, [0] * len(domains)
    if args.load:
        meta = eplb_ds.load_checkpoint(engine, manager, args.load, tag=args.tag)
        saved = meta.get("train") or {}  # saved by an older train.py: its optimizer steps, the default switch
        start = int(saved.get("iteration", meta.get("global_steps", 0) * gas))
        switch = int(saved.get("switch_step", switch))
        consumed = list(saved.get("batches_consumed") or [min(start, switch), max(0, start - switch)])
        if rank == 0:
            log.info(
                "continuing from %s (tag %s) at iteration %d of %d (data: %s batches consumed; domain switch "
                "after step %d)",
                args.load,
                meta["tag"],
                start,
                args.train_iters,
                "/".join(map(str, consumed)),
                switch,
            )
        if start >= args.train_iters:
            raise SetupError(
                f"the checkpoint {args.load} ({meta['tag']}) is at iteration {start} and --train-iters is "
                f"{args.train_iters} (the total, as in Megatron): nothing to train; raise --train-iters"
            )
    left = (args.train_iters - start) // gas  # optimizer steps this run takes
    if manager is not None and rank == 0 and no_rebalance_ahead(manager.config, left):
        log.warning(
            "no rebalance will run: %d iterations (micro-batches) with gradient_accumulation_steps %d are %d "
            "optimizer steps, and EPLB counts optimizer steps: num_iterations_eplb_update=%d",
            args.train_iters - start,
            gas,
            left,
            manager.config.num_iterations_eplb_update,
        )
    if args.save and args.load and not args.overwrite_checkpoints:  # (without --load: checked above)
        later = later_tags(args.save, start) if rank == 0 else []
        rank0_decides("".join(later_tag_problem(args.save, later, start)) or None)
    if rank == 0:
        log.info("text domains available: %s; training on %s", available_domains(), " -> ".join(domains))
    batches = [
        ByteBatches(load_domain(d), args.micro_batch_size, args.seq_length, seed=args.seed, rank=data_rank)
        for d in domains
    ]
    if manager is not None:  # what eplb_trace_path's file says about the data
        manager.trace_meta.update(script="examples/train.py", domains=domains, switch_after_step=switch)
    for b, n in zip(batches, consumed):
        b.skip(n)
    dev = device()
    mask = causal_mask(args.seq_length).to(dev)
    pos = torch.arange(args.seq_length, device=dev)[None].expand(args.micro_batch_size, -1)
    losses, rebalances = [], []
    metrics = MetricsFile(args.metrics_out)
    stop = StopRequest()
    stopping, stopped_by = False, None
    saved_at = None
    t_start = time.monotonic()

    def result(last: int, completed: bool) -> dict:
        return {
            "losses": losses,
            "rebalances": rebalances,
            "realized_balancedness": manager.realized if manager is not None else [],
            "switch_step": switch,
            "start_iteration": start,
            "last_step": last,
            "completed": completed,
            "stopped_by": None if completed else stopped_by,
            "checkpoint": saved_at,
            "seconds": time.monotonic() - t_start,
            "placement": handle.placement.phy2log.tolist() if handle is not None else None,
            "eplb": manager.config.to_dict() if manager is not None else None,
            "zero_stage": engine.zero_optimization_stage(),
        }

    def save(it: int) -> None:
        nonlocal saved_at
        path = eplb_ds.save_checkpoint(
            engine,
            manager,
            args.save,
            tag=eplb_ds.step_tag(it),
            overwrite=args.overwrite_checkpoints,
            extra={"train": {"iteration": it, "switch_step": switch, "batches_consumed": list(consumed)}},
        )
        saved_at = str(path)
        if rank == 0:
            log.info("step %d: checkpoint saved to %s (logical experts + expert_map.json)", it, path)

    it = start
    try:
        for it in range(start + 1, args.train_iters + 1):
            domain = 0 if it <= switch else 1
            if it == switch + 1 and rank == 0:
                log.info(
                    "step %d: data switches domain %s -> %s (routing will shift)", it, domains[0], domains[1]
                )
            tokens, labels = (t.to(dev, non_blocking=True) for t in batches[domain].next())
            consumed[domain] += 1
            per_token = engine(tokens, pos, mask, labels=labels)
            loss = per_token.float().mean()
            engine.backward(loss)
            engine.step()
            # the loss and the stop flag in one all-reduce: every rank sees a signal at the same step
            stats = torch.stack(
                [loss.detach().float().reshape(()), torch.tensor(float(stop.requested), device=dev)]
            )
            dist.all_reduce(stats)
            value = float(stats[0]) / dist.get_world_size()
            if not stopping and stats[1] > 0:  # once per run: which signal (the largest number, if two came)
                stopping = True
                sig = torch.tensor([stop.signum or 0], device=dev)
                dist.all_reduce(sig, op=dist.ReduceOp.MAX)
                stopped_by = signal.Signals(int(sig)).name
            losses.append(value)
            record = engine.eplb_last_record
            if record is not None:
                info = record.as_dict()
                rebalances.append(info)
                if rank == 0:
                    log.info(
                        "rebalance at step %d (the manager's count, as in its log and TensorBoard): %s: "
                        "balancedness %.3f -> %.3f (predicted on the window), %d slots moved (%.1f KiB), %s",
                        record.completed_step,
                        record.outcome,
                        record.balancedness_before,
                        record.balancedness_after,
                        record.moved_slots,
                        record.moved_bytes / 1024,
                        ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in record.seconds.items()),
                    )
            boundary = it % gas == 0
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
                        elapsed / (it - start),
                    )
                    if monitor is not None:
                        monitor.log(it, scalars)
                metrics.write(result(it, False))
            last = it == args.train_iters
            if args.save and (
                last or (boundary and (stopping or (args.save_interval and it % args.save_interval == 0)))
            ):
                save(it)
            if stopping and boundary and not last:
                break
        else:
            stopping = False  # the run finished; a signal in its last step changes nothing more
        if manager is not None:
            manager.record_map()
        metrics.write(result(it, not stopping))
        dist.barrier()  # every rank's outputs are written before any rank exits
    finally:
        stop.restore()
        if manager is not None:
            manager.close()
        if monitor is not None:
            monitor.close()
    out = result(it, not stopping)
    if stopping and rank == 0:
        log.warning(
            "stopped by %s after step %d%s",
            out["stopped_by"],
            it,
            f"; checkpoint {saved_at}" if saved_at else "",
        )
    return out


def main(argv=None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    quiet_known_warnings()
    args = parse_args(argv)
    if int(os.environ.get("RANK", 0)) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        result = train(args)
    except (EPLBError, SetupError) as exc:  # one line on rank 0; the traceback only at DEBUG
        log.debug("train.py failed", exc_info=True)
        if int(os.environ.get("RANK", 0)) == 0:
            text = (
                exc.code if isinstance(exc, SetupError) else f"train.py: error: {type(exc).__name__}: {exc}"
            )
            print(text, file=sys.stderr, flush=True)
        sys.exit(1 if isinstance(exc, SetupError) else 2)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if result.get("stopped_by"):
        sys.exit(128 + signal.Signals[result["stopped_by"]].value)


if __name__ == "__main__":
    main()
