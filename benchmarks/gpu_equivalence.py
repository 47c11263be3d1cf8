"""Placement-aware vs unpatched Megatron-core MoE on one GPU: outputs, loss and gradients.

The same equivalence as ``tests/test_megatron_patch.py``, on the GPU: alltoall dispatcher, ``SequentialMLP``
experts, bf16 (and fp32 for reference), EP=1 (world size 1) with more physical slots than experts (P = 12
slots for E = 8 experts, so copies of one expert share the GPU).  The patched and the unpatched model hold
identical weights, so the math is the same; in bf16 only the split of an expert's tokens over its copies
(other GEMM shapes, gradient sums in another order) can change the last bits.

Usage::

    python benchmarks/gpu_equivalence.py --out DIR      # writes DIR/gpu_equivalence.json

``gpu_equivalence.json`` holds one run per megatron-core version (``runs[<version>]``): a run replaces the
previous run of its version and keeps the others', so one file covers every version measured (the latest run of
each).  ``passed`` is true when every run in it passed.

Without CUDA it runs on CPU with gloo (``enable_cpu``), as a smoke test of the script itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import build_moe_layer, init_single_rank  # noqa: E402

from megatron_eplb.placement import ExpertPlacement  # noqa: E402

E = 8  # logical experts
TOPK = 2
H = 256  # hidden size
FFN = 512  # expert hidden size
LAYERS = 2  # MoE layers
TOKENS = (128, 4)  # [sequence, batch]
# Relative tolerance (max |patched - unpatched| / max |unpatched|) per dtype.
TOLERANCE = {"bfloat16": 2e-2, "float32": 1e-5}


def _config(dtype: torch.dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=LAYERS,
        hidden_size=H,
        num_attention_heads=4,
        num_moe_experts=E,
        moe_router_topk=TOPK,
        moe_ffn_hidden_size=FFN,
        ffn_hidden_size=FFN,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        add_bias_linear=False,
        moe_aux_loss_coeff=0.0,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
    )


class MoEStack(torch.nn.Module):
    """``LAYERS`` MoE layers with residuals."""

    def __init__(self, config, device: torch.device) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([build_moe_layer(config, i + 1) for i in range(LAYERS)]).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            y, _ = layer(x)
            x = x + y
        return x


def _twins(dtype: torch.dtype, device: torch.device) -> tuple[MoEStack, MoEStack]:
    config = _config(dtype)
    torch.manual_seed(0)
    ref = MoEStack(config, device)
    with torch.no_grad():  # a hot expert 0, so its copies get many tokens
        for layer in ref.layers:
            layer.router.weight[0] += 0.5 * layer.router.weight[1:].mean(0)
    pat = MoEStack(config, device)
    pat.load_state_dict(ref.state_dict())
    return ref, pat


def _placements() -> dict[str, ExpertPlacement | None]:
    """EP=1: the default layout (P = E), and P = 12 with copies of the hot experts on the one GPU."""
    rng = np.random.default_rng(0)
    extra = np.array([0, 0, 1, 2])  # expert 0: 3 copies, experts 1 and 2: 2 copies
    rows = [rng.permutation(np.concatenate([np.arange(E), extra])) for _ in range(LAYERS)]
    other = [rng.permutation(np.concatenate([np.arange(E), [0, 3, 4, 0]])) for _ in range(LAYERS)]
    return {
        "default": None,
        "replicas": ExpertPlacement(np.stack(rows), 1, E),
        "set_placement": ExpertPlacement(np.stack(other), 1, E),
    }


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Patched ``a`` vs unpatched ``b``."""
    a, b = a.detach().float(), b.detach().float()
    err = float((a - b).abs().max())
    return {"max_abs": err, "rel": err / max(float(b.abs().max()), 1e-12), "bitwise": bool(torch.equal(a, b))}


def _worst(diffs: list[dict]) -> dict:
    return {
        "max_abs": max(d["max_abs"] for d in diffs),
        "rel": max(d["rel"] for d in diffs),
        "bitwise": all(d["bitwise"] for d in diffs),
    }


def _compare(ref: MoEStack, pat: MoEStack, handle, dtype: torch.dtype, device: torch.device) -> dict:
    """One forward+backward of both models on the same tokens: differences and load checks."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(*TOKENS, H, generator=gen).to(device, dtype)
    w = torch.randn(*TOKENS, H, generator=gen).to(device, dtype)
    counts: list[torch.Tensor] = []
    hooks = [
        layer.router.register_forward_hook(lambda m, i, o: counts.append(o[1].sum(0).to(torch.int64)))
        for layer in ref.layers
    ]
    handle.reset_loads()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    for model in (ref, pat):
        model.zero_grad(set_to_none=True)
    out1, out2 = ref(x1), pat(x2)
    loss1, loss2 = (out1.float() * w.float()).square().sum(), (out2.float() * w.float()).square().sum()
    loss1.backward()
    loss2.backward()
    for h in hooks:
        h.remove()
    handle.sum_replica_grads()
    res = {
        "out": _diff(out2, out1),
        "loss": _diff(loss2, loss1),
        "x_grad": _diff(x2.grad, x1.grad),
        "router_grad": _worst(
            [_diff(b.router.weight.grad, a.router.weight.grad) for a, b in zip(ref.layers, pat.layers)]
        ),
    }
    expert = []  # every copy of expert e holds the gradient of the unpatched model's expert e
    for layer in range(handle.num_layers):
        logical = [
            torch.cat([p.grad.reshape(-1) for p in m.parameters()])
            for m in ref.layers[layer].experts.local_experts
        ]
        for k in range(handle.slots_per_rank):
            e = int(handle.placement.phy2log[layer, k])
            expert.append(
                _diff(
                    torch.cat([sp.of(sp.param.grad).reshape(-1) for sp in handle.slot_params(layer, k)]),
                    logical[e],
                )
            )
    res["expert_grad"] = _worst(expert)
    loads = handle.loads()
    res["loads_match"] = bool(torch.equal(loads, torch.stack(counts)))
    mapped = torch.zeros_like(loads).scatter_add_(
        1, torch.tensor(handle.placement.phy2log, device=loads.device), handle.slot_loads()
    )
    res["slot_loads_match"] = bool(torch.equal(mapped, loads))
    copies = []  # tokens per copy of the hottest expert: the even split
    for layer in range(handle.num_layers):
        slots = np.flatnonzero(handle.placement.phy2log[layer] == 0)
        copies.append(handle.slot_loads()[layer, torch.as_tensor(slots)].tolist())
    res["expert0_tokens_per_copy"] = copies
    return res


def _passed(res: dict, tol: float) -> bool:
    return (
        all(res[k]["rel"] <= tol for k in ("out", "loss", "x_grad", "router_grad", "expert_grad"))
        and res["loads_match"]
        and res["slot_loads_match"]
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_equivalence.json")
    args = parser.parse_args(argv)
    started = time.time()
    device = init_single_rank()
    from megatron_eplb.patches import megatron as eplb_mcore

    version = ".".join(map(str, eplb_mcore.mcore_version()))
    result: dict = {
        "megatron_core": version,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "setup": {
            "experts": E,
            "slots": 12,
            "topk": TOPK,
            "hidden": H,
            "ffn": FFN,
            "moe_layers": LAYERS,
            "tokens": TOKENS[0] * TOKENS[1],
            "dispatcher": "alltoall",
            "experts_class": "SequentialMLP",
            "ep": 1,
        },
        "tolerance_rel": TOLERANCE,
        "cases": {},
    }
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        cases: dict = {}
        placements = _placements()
        for case in ("default", "replicas"):
            ref, pat = _twins(dtype, device)
            handle = eplb_mcore.apply(pat, placements[case])
            cases[case] = _compare(ref, pat, handle, dtype, device)
        handle.set_placement(placements["set_placement"])  # re-place the P = 12 model in place
        cases["set_placement"] = _compare(ref, pat, handle, dtype, device)
        for res in cases.values():
            res["passed"] = _passed(res, TOLERANCE[name])
        result["cases"][name] = cases
    result["passed"] = all(r["passed"] for cases in result["cases"].values() for r in cases.values())
    result["seconds"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_equivalence.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else {}
    runs[version] = result
    merged = {
        "script": "benchmarks/gpu_equivalence.py",
        "device": result["device"],
        "torch": result["torch"],
        "passed": all(r["passed"] for r in runs.values()),
        "runs": runs,
    }
    path.write_text(json.dumps(merged, indent=2))
    for name, cases in result["cases"].items():
        for case, res in cases.items():
            errs = "  ".join(
                f"{k}={res[k]['rel']:.2e}" for k in ("out", "loss", "x_grad", "router_grad", "expert_grad")
            )
            print(
                f"mcore {version} {name:8s} {case:13s} {errs}  loads={res['loads_match']}  passed={res['passed']}"
            )
    print(f"wrote {path} ({result['seconds']} s, passed={result['passed']})")
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
