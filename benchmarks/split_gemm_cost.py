"""What splitting replicated experts' tokens over their copies costs the grouped GEMM, and what aligning the
cut points (``eplb_split_align``) saves.

    .venv/bin/python benchmarks/split_gemm_cost.py                # CUDA: benchmarks/results/split_gemm_cost.json

The experts' forward of the GroupedMLP layer that ``recording_overhead.py`` measures (hidden 4096, expert FFN
2048 gated, 64 experts, top-8, 8192 tokens, bf16), through the grouped GEMM the layer uses (the ``grouped_gemm``
package's ``gmm`` where importable, else megatron-eplb's drop-in), with the routing counts of a random router:

- ``unsplit``: 64 groups, one per expert (the unpatched layer);
- ``split_exact``: experts 0-7 have a second copy on the same rank (8 replica slots, 72 groups), their tokens
  split by the balanced dispatch's exact cut points;
- ``split_aligned_A``: the same cut points rounded to multiples of ``A`` tokens (``align_bounds``).

Every round runs each kind once in a random order, timed by CUDA events; reported per kind: the median and the
paired median difference against ``unsplit`` (µs and % of it).  A cut inside a row tile of the GEMM costs a
partial tile; aligned cuts cost none.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import CUDA, Timer, grouped_gemm_source, run_one_gpu, sync  # noqa: E402

from megatron_eplb.placement import ExpertPlacement  # noqa: E402
from megatron_eplb.replica_split import align_bounds, balanced_shares, copy_bounds, replica_tables  # noqa: E402


def _groups(counts: np.ndarray, row: np.ndarray, bounds: np.ndarray | None) -> tuple[list[int], list[int]]:
    """Rows per group and the expert of each group: one group per slot of ``row`` (``phy2log``), a replicated
    expert's rows cut at ``bounds [E, C-1]`` (``None``: one group per expert)."""
    if bounds is None:
        return counts.tolist(), list(range(len(counts)))
    sizes, experts, seen = [], [], {}
    for e in row:
        c = seen.get(e, 0)
        ends = np.concatenate([[0], bounds[e], [counts[e]]])
        sizes.append(int(ends[c + 1] - ends[c]))
        experts.append(int(e))
        seen[e] = c + 1
    return sizes, experts


def measure(device, small: bool, args) -> dict:
    source = grouped_gemm_source(device)
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    if small:
        h, ffn, experts, topk, tokens, redundant, rounds = 64, 32, 8, 2, 256, 2, 5
    else:
        h, ffn, experts, topk, tokens, redundant, rounds = 4096, 2048, 64, 8, 8192, 8, args.rounds
    dtype = torch.bfloat16 if CUDA else torch.float32
    gen = torch.Generator().manual_seed(0)
    top = torch.randn(tokens, experts, generator=gen).topk(topk, dim=1).indices
    counts = torch.bincount(top.flatten(), minlength=experts)
    row = ExpertPlacement.default(1, experts, 1, redundant).phy2log[0]
    tables = replica_tables(row, 1, experts)
    exact = copy_bounds(balanced_shares(counts, tables))
    kinds: dict[str, tuple[list[int], list[int]]] = {"unsplit": _groups(counts.numpy(), row, None)}
    kinds["split_exact"] = _groups(counts.numpy(), row, exact.numpy())
    for a in args.align:
        kinds[f"split_aligned_{a}"] = _groups(counts.numpy(), row, align_bounds(exact, counts, a).numpy())
    a = torch.randn(int(counts.sum()), h, device=device, dtype=dtype)
    w1 = torch.randn(experts, h, 2 * ffn, device=device, dtype=dtype) * 0.01
    w2 = torch.randn(experts, ffn, h, device=device, dtype=dtype) * 0.01
    calls = {}
    for name, (sizes, owner) in kinds.items():
        b1, b2, batch = w1[owner], w2[owner], torch.tensor(sizes)

        def forward(b1=b1, b2=b2, batch=batch):
            x, gate = gg.ops.gmm(a, b1, batch, trans_b=False).chunk(2, dim=-1)
            return gg.ops.gmm(torch.nn.functional.silu(x) * gate, b2, batch, trans_b=False)

        calls[name] = forward
    names = list(calls)
    for _ in range(3):
        for name in names:
            calls[name]()
    sync()
    timers = {k: Timer() for k in names}
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for i in rng.permutation(len(names)):
            s = timers[names[i]].start()
            calls[names[i]]()
            timers[names[i]].stop(s)
    sync()
    ms = {k: np.asarray(t.ms()) for k, t in timers.items()}
    base = float(np.median(ms["unsplit"]))
    rows = {}
    for name, (sizes, _) in kinds.items():
        diff = float(np.median(ms[name] - ms["unsplit"]))
        rows[name] = {
            "groups": len(sizes),
            "median_ms": float(np.median(ms[name])),
            "paired_us": 1000 * diff,
            "paired_pct": 100 * diff / base,
        }
    return {
        "setup": dict(
            hidden=h, ffn=ffn, experts=experts, topk=topk, tokens=tokens, redundant_slots=redundant
        ),
        "grouped_gemm": source,
        "rounds": rounds,
        "split_experts_rows": counts[:redundant].tolist(),
        "kinds": rows,
    }


def _table(r: dict) -> str:
    lines = [f"grouped GEMM: {r['grouped_gemm']}, {r['rounds']} paired rounds", ""]
    lines.append(f"{'kind':<20} {'groups':>6} {'median ms':>10} {'vs unsplit µs':>14} {'%':>7}")
    for name, k in r["kinds"].items():
        lines.append(
            f"{name:<20} {k['groups']:>6} {k['median_ms']:>10.3f} {k['paired_us']:>14.1f} {k['paired_pct']:>7.2f}"
        )
    return "\n".join(lines)


def _args(parser) -> None:
    parser.add_argument("--rounds", type=int, default=400, help="paired rounds")
    parser.add_argument("--align", type=int, nargs="+", default=[64, 128, 256], help="cut alignments to time")


def main(argv: list[str] | None = None) -> dict:
    return run_one_gpu("split_gemm_cost.py", __doc__, _args, measure, _table, argv)


if __name__ == "__main__":
    main()
