"""The fused per-step plan kernel (:mod:`megatron_eplb.fast_replicas_triton`) compiled ahead of time for a GPU
target without a GPU: per shape its padded sizes, warps, shared memory (triton's allocation) and ptxas's
registers, stack frame and spills.  Needs triton with its CUDA backend (ptxas ships with it), no CUDA device.

    PYTHONPATH=$PWD:/path/to/triton python benchmarks/fast_replicas_compile.py [--arch 90] [--warps N]
        [--shapes 64,1,8,1 256,1,8,1 ...]      # E,C,N,F   -> benchmarks/results/fast_replicas_kernel_sm90.json

An H200 block has 227 KiB of shared memory; spills go to local memory (cached in L1): fewer is better, but only a
GPU run (``benchmarks/fast_replicas_gpu.py --planner only``) says what they cost.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# (E, C, N, F[, K]): the one-block limit's corners (fits) and the benchmark's shapes (K: the replicated
# experts, default the most there can be)
SHAPES = [
    (16, 1, 2, 1),
    (64, 1, 8, 1),
    (64, 1, 8, 2),
    (64, 2, 8, 1, 8),
    (64, 2, 8, 2, 16),
    (64, 1, 16, 1),
    (128, 1, 8, 2),
    (256, 1, 8, 1),
    (256, 1, 16, 1),
    (256, 2, 8, 1, 8),
]


def compile_shape(shape: tuple, arch: int, warps: int | None, rule: bool = False) -> dict:
    """One shape's ``(E, C, N, F[, K])`` compile record (see the module docstring); ``rule``: the kernel with the
    cross-node rule compiled in (``eplb_num_nodes > 1`` and ``eplb_fast_cross_node_min_tokens > 0``)."""
    experts, copies, ranks, fast = shape[:4]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from megatron_eplb import fast_replicas_triton as fused
    from megatron_eplb.fast_replicas import _BIG

    cfg = fused.launch_config(*shape)
    num_warps = warps or cfg.pop("num_warps")
    cfg.pop("num_warps", None)
    signature = {name: "*i64" for name in ("load_ptr", "copy_rank_ptr", "copy_slot_ptr")}
    signature["holds_ptr"] = "*i1"
    signature["near_ptr"] = "*i1"
    signature.update({name: "*i64" for name in ("replicated_ptr", "out_ptr")})
    scalars = ("num_experts", "copies", "num_ranks", "slots", "num_fast", "union", "num_replicated")
    signature.update({name: "i32" for name in scalars})
    signature["min_gain"] = "i64"
    constexprs = dict(ITERATIONS=8, ROUNDS=ranks * fast, BIG=_BIG, **cfg, RULE=rule)
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn=fused._fast_plan_kernel, signature=signature, constexprs=constexprs)
    started = time.time()
    kernel = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "enable_fp_fusion": False},
    )
    record = {
        "experts": experts,
        "copies": copies,
        "ranks": ranks,
        "fast": fast,
        "replicated": shape[4] if len(shape) > 4 else None,
        "fits": fused.fits(*shape),
        "cross_node_rule": rule,
    }
    record.update(cfg, num_warps=num_warps, shared_bytes=kernel.metadata.shared)
    record["compile_s"] = round(time.time() - started, 1)
    ptxas = Path(triton.backends.nvidia.__path__[0]) / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        out = subprocess.run(
            [str(ptxas), "-v", f"--gpu-name=sm_{arch}{suffix}", str(ptx), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
        )
    text = out.stderr
    for key, pattern in (
        ("registers", r"Used (\d+) registers"),
        ("stack_bytes", r"(\d+) bytes stack frame"),
        ("spill_store_bytes", r"(\d+) bytes spill stores"),
        ("spill_load_bytes", r"(\d+) bytes spill loads"),
    ):
        found = re.search(pattern, text)
        record[key] = int(found.group(1)) if found else None
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--warps", type=int, default=None, help="override launch_config's warps")
    p.add_argument("--shapes", nargs="*", default=None, help="E,C,N,F[,K] each (default: SHAPES)")
    p.add_argument("--rule", action="store_true", help="the kernel with the cross-node rule compiled in")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    rows = []
    print(
        f"{'E':>5}{'C':>3}{'N':>4}{'F':>3}{'fits':>6}{'warps':>6}{'shared KiB':>11}{'regs':>6}{'stack B':>9}{'spills B':>10}"
    )
    for shape in shapes:
        r = compile_shape(shape, args.arch, args.warps, args.rule)
        rows.append(r)
        print(
            f"{r['experts']:>5}{r['copies']:>3}{r['ranks']:>4}{r['fast']:>3}{str(r['fits']):>6}{r['num_warps']:>6}"
            f"{r['shared_bytes'] / 1024:>11.0f}{r['registers'] or 0:>6}{r['stack_bytes'] or 0:>9}"
            f"{r['spill_store_bytes'] or 0:>10}",
            flush=True,
        )
    import triton

    out = (
        Path(args.out)
        if args.out
        else REPO / "benchmarks" / "results" / f"fast_replicas_kernel_sm{args.arch}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"triton": triton.__version__, "arch": args.arch, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
