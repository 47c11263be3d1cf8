"""patches/megatron/grouped_gemm.py: the ``grouped_gemm.ops.gmm`` drop-in against a per-group matmul reference
(forward and backward, fp32 and bf16, empty groups, ``trans_b``, both backends), and :func:`install`."""

from __future__ import annotations

import pytest
import torch
from megatron_eplb.patches.megatron import grouped_gemm as gg

SIZES = {
    "mixed": [5, 0, 3, 8],  # an empty group in the middle
    "first_last_empty": [0, 7, 9, 0],
    "one_group": [0, 0, 12, 0],
    "all_empty": [0, 0, 0, 0],
}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def _reference(a: torch.Tensor, b: torch.Tensor, sizes: list[int], trans_b: bool) -> torch.Tensor:
    """One matmul per group, in fp64."""
    out, start = [], 0
    for g, n in enumerate(sizes):
        w = b[g].double()
        out.append(a[start : start + n].double() @ (w.T if trans_b else w))
        start += n
    return torch.cat(out)


def _run(a0, b0, sizes, trans_b, grad_out, force_loop: bool):
    a = a0.clone().requires_grad_()
    b = b0.clone().requires_grad_()
    batch_sizes = torch.tensor(sizes, dtype=torch.int64)  # the package's contract: int64 on the host
    if force_loop:
        out = gg._gmm_loop(a, b.transpose(-2, -1) if trans_b else b, batch_sizes)
    else:
        out = gg.gmm(a, b, batch_sizes, trans_b=trans_b)
    out.backward(grad_out)
    return out, a.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "b_t"])
@pytest.mark.parametrize("force_loop", [False, True], ids=["auto", "loop"])
def test_gmm_matches_per_group_matmul_forward_and_backward(dtype, sizes, trans_b, force_loop):
    gen = torch.Generator().manual_seed(sum(sizes) + trans_b)
    k, n = 16, 24
    a0 = torch.randn(sum(sizes), k, generator=gen).to(dtype)
    b0 = torch.randn(len(sizes), *((n, k) if trans_b else (k, n)), generator=gen).to(dtype)
    grad_out = torch.randn(sum(sizes), n, generator=gen).to(dtype)
    out, ga, gb = _run(a0, b0, sizes, trans_b, grad_out, force_loop)
    assert out.dtype == dtype and out.shape == (sum(sizes), n)
    # reference gradients of sum(out * grad_out), in fp64
    a_ref = a0.double().requires_grad_()
    b_ref = b0.double().requires_grad_()
    _reference(a_ref, b_ref, sizes, trans_b).backward(grad_out.double())
    torch.testing.assert_close(out.double(), _reference(a0, b0, sizes, trans_b), **TOL[dtype])
    torch.testing.assert_close(ga.double(), a_ref.grad, **TOL[dtype])
    torch.testing.assert_close(gb.double(), b_ref.grad, **TOL[dtype])
    for g, rows in enumerate(sizes):
        if rows == 0:  # an expert without tokens gets an exactly zero gradient
            assert torch.count_nonzero(gb[g]) == 0


def test_expanded_gradient_and_device_batch_sizes():
    """``out.sum().backward()`` hands an expanded (stride-0) gradient; batch sizes may be a device tensor."""
    a = torch.randn(10, 8, requires_grad=True)
    b = torch.randn(3, 8, 8, requires_grad=True)
    gg.gmm(a, b, torch.tensor([4, 0, 6], dtype=torch.int32)).sum().backward()
    assert torch.allclose(a.grad[:4], b.detach()[0].sum(-1).expand(4, 8))
    assert torch.count_nonzero(b.grad[1]) == 0


def test_backend_choice():
    want = "torch._grouped_mm" if hasattr(torch, "_grouped_mm") else "loop"  # it runs on CPU in torch 2.13
    gg._WORKS.clear()
    with torch.inference_mode():  # the first call may come from inference (its check runs backward)
        assert (
            gg.backend(torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(2, 8, 8, dtype=torch.bfloat16))
            == want
        )
    with torch.no_grad():
        assert gg.backend(torch.randn(4, 8), torch.randn(2, 8, 8)) == want
    # strides that are not multiples of 16 bytes (K = 5 floats): the loop, with the same result
    a, b = torch.randn(7, 5), torch.randn(2, 5, 3)
    assert gg.backend(a, b) == "loop"
    torch.testing.assert_close(
        gg.gmm(a, b, torch.tensor([3, 4])).double(), _reference(a, b, [3, 4], False), rtol=1e-5, atol=1e-5
    )
    # mixed dtypes: the loop (torch._grouped_mm needs one dtype)
    assert gg.backend(torch.randn(4, 8), torch.randn(2, 8, 8, dtype=torch.float64)) == "loop"


def test_install_points_megatron_at_the_drop_in_and_grouped_mlp_builds():
    pytest.importorskip("megatron.core")
    from megatron.core.transformer.moe import grouped_gemm_util as util

    try:
        import grouped_gemm  # noqa: F401

        real = True
    except ImportError:
        real = False
    before = (util.grouped_gemm, util.ops)
    try:
        source = gg.install()
        assert source == ("grouped_gemm" if real else "megatron_eplb")
        assert gg.install() == source  # idempotent
        assert util.grouped_gemm_is_available()
        if not real:
            assert util.ops.gmm is gg.gmm
            import sys

            assert "grouped_gemm" not in sys.modules or real  # no fake package for other code to find
    finally:
        if before[0] is None:  # leave Megatron as this test found it
            util.grouped_gemm, util.ops = before
