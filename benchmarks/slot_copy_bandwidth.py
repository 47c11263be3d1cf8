"""How fast EPLB's slot moves copy on one GPU: slot copies against the device copy bandwidth, and the canary.

Usage::

    python benchmarks/slot_copy_bandwidth.py [--out DIR] [--small]

Writes ``DIR/slot_copy_bandwidth.json`` (default ``benchmarks/results`` on CUDA) and prints a table.  Without
CUDA it runs tiny sizes on CPU (gloo), a smoke test of the script itself; its numbers mean nothing.

One process, one GPU, EP = 1:

* ``bandwidth``: device copy bandwidth (a large device-to-device copy, bytes read + written): the ceiling.
* ``transfer``: :class:`TransferExecutor` moving a permutation of 16 slots of a 4096 x 2048 expert (weights
  bf16 + fp32 master + Adam ``exp_avg``/``exp_avg_sq`` fp32) through its staged path (before) and its direct
  path on 1, 2 and 4 streams, in % of the device copy bandwidth; then the transfer canary (``sampled``,
  ``full``) on that layer: its time and whether a corrupted slot is caught.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import Timer, run_one_gpu, sync  # noqa: E402

from megatron_eplb.placement import ExpertPlacement  # noqa: E402


def part_bandwidth(device, small: bool) -> dict:
    n = (1 << 20) if small else (2 << 30)
    a = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    t = Timer()
    for _ in range(20):
        s = t.start()
        b.copy_(a)
        t.stop(s)
    ms = statistics.median(t.ms())
    assert torch.equal(a[:4096], b[:4096])
    del a, b
    return {"bytes": n, "median_ms": ms, "copy_bandwidth_GBps": 2 * n / ms / 1e6}


def _slot_store(num_slots: int, h: int, ffn: int, device) -> list[list[torch.Tensor]]:
    """Per slot: bf16 fc1, fc2; fp32 master of each; Adam exp_avg and exp_avg_sq (fp32) of each."""
    out = []
    for _ in range(num_slots):
        w = [torch.randn(ffn, h, device=device).bfloat16(), torch.randn(h, ffn, device=device).bfloat16()]
        fp32 = [torch.randn(ffn, h, device=device), torch.randn(h, ffn, device=device)]
        out.append(w + fp32 + [torch.randn_like(t) for t in fp32] + [torch.rand_like(t) for t in fp32])
    return out


def part_transfer(device, small: bool, copy_gbps: float) -> dict:
    from megatron_eplb.transfer import TransferExecutor, plan_transfer, slot_nbytes

    h, ffn, slots = (64, 128, 6) if small else (4096, 2048, 16)
    store = _slot_store(slots, h, ffn, device)
    old = ExpertPlacement(np.arange(slots)[None, :], 1, slots)
    new = ExpertPlacement(np.roll(np.arange(slots), 1)[None, :], 1, slots)  # one cycle through every slot
    plan = plan_transfer(old, new)
    nbytes = slot_nbytes(store[0])
    moved_bytes = plan.layer(0).num_local_copies * nbytes
    out = {
        "slots": slots,
        "slot_bytes": nbytes,
        "slot_tensors": "bf16 fc1+fc2, fp32 master x2, Adam exp_avg x2, exp_avg_sq x2",
        "moved_slots": plan.layer(0).num_local_copies,
    }
    modes = (
        ("staged_before", False, 1),
        ("direct_after", True, 1),  # direct local copies, every copy in order on the side stream
        ("direct_streams2", True, 2),  # the same copies split over 2 streams by tensor position
        ("direct_streams4", True, 4),
    )
    for _round in range(2):  # two rounds, interleaved: the spread between them shows the noise
        for mode, direct, streams in modes:
            key = mode if _round == 0 else f"{mode}_again"
            ex = TransferExecutor(
                plan, lambda layer, k: store[k], direct_local_copies=direct, copy_streams=streams
            )
            expect = [t.clone() for t in store[slots - 1]]
            ex.run()
            ok = all(torch.equal(a, b) for a, b in zip(store[0], expect))
            t = Timer()
            for _ in range(15):
                s = t.start()
                ex.run()
                t.stop(s)
            ms = statistics.median(t.ms())
            gbps = 2 * moved_bytes / ms / 1e6  # payload read + written, as the copy bandwidth counts
            out[key] = {
                "correct": ok,
                "median_ms": ms,
                "achieved_GBps": gbps,
                "fraction_of_copy_bandwidth": gbps / copy_gbps if copy_gbps else None,
                "peak_staging_bytes": ex.peak_staging_bytes,
            }
    # The canary on this layer (sampled and full): one start/finish/verify, wall time incl. its host sync.
    for words, label in ((65536, "sampled"), (None, "full")):
        ex = TransferExecutor(plan, lambda layer, k: store[k], checksums=True, checksum_words=words)
        walls, bad = [], None
        for i in range(6):
            sync()
            t0 = time.perf_counter()
            handle = ex.start_layer(0)
            ex.finish_layer(handle)
            bad = ex.verify_layer(handle)
            sync()
            if i:
                walls.append((time.perf_counter() - t0) * 1e3)
        ex_plain = TransferExecutor(plan, lambda layer, k: store[k])
        plain = []
        for i in range(6):
            sync()
            t0 = time.perf_counter()
            ex_plain.run()
            sync()
            if i:
                plain.append((time.perf_counter() - t0) * 1e3)
        handle = ex.start_layer(0)
        ex.finish_layer(handle)
        store[5][1].view(-1)[0] += 1  # corrupt a written slot (a sampled word): the canary must see it
        caught = ex.verify_layer(handle)
        out[f"canary_{label}"] = {
            "transfer_and_verify_ms": statistics.median(walls),
            "transfer_only_ms": statistics.median(plain),
            "clean": bad == [],
            "corruption_caught": caught == [(0, 5)],
        }
    store.clear()
    return out


def measure(device, small: bool, args) -> dict:
    bandwidth = part_bandwidth(device, small)
    copy_gbps = bandwidth["copy_bandwidth_GBps"]
    print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    return {"bandwidth": bandwidth, "transfer": part_transfer(device, small, copy_gbps)}


def _table(r: dict) -> str:
    lines = [f"device copy bandwidth {r['bandwidth']['copy_bandwidth_GBps']:.0f} GB/s"]
    t = r["transfer"]
    lines.append("canary: " + json.dumps({k: v for k, v in t.items() if k.startswith("canary_")}))
    for mode in [k for k in t if k.startswith(("staged", "direct"))]:
        m = t[mode]
        lines.append(
            f"transfer {mode}: {m['median_ms']:.2f} ms, {m['achieved_GBps']:.0f} GB/s "
            f"({100 * (m['fraction_of_copy_bandwidth'] or 0):.0f}% of copy), staging {m['peak_staging_bytes'] / 2**20:.0f} MiB, ok={m['correct']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    return run_one_gpu("slot_copy_bandwidth.py", __doc__, lambda parser: None, measure, _table, argv)


if __name__ == "__main__":
    main()
