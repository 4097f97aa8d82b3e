"""The real engine's linears (flatquant/models/real/linear.py): the fused one-transform linears and the unpacked
many-token path against the ops they are built from."""

from __future__ import annotations

import pytest
import torch

from flatquant.models.real.linear import fuse_linears, real_linear, unpacked_prefill
from flatquant.ops import kron_quant, kron_quant_multi, w4a4_matmul
from flatquant.ops.matmul import UNPACK_MIN_M
from flatquant.ops.qlinear import QLinearParams, make_qlinear

CUDA = torch.cuda.is_available()


def _site(n1: int, n2: int, outs: list[int], device: str, bias: bool) -> list[QLinearParams]:
    """Linears that read one transformed activation (shared factors), each with its own LAC pair."""
    g = torch.Generator().manual_seed(n1 * 100 + n2)
    k = n1 * n2
    left = torch.linalg.qr(torch.randn(n1, n1, generator=g))[0]
    right = torch.linalg.qr(torch.randn(n2, n2, generator=g))[0]
    lins = []
    for i, n in enumerate(outs):
        w = torch.randn(n, k, generator=g) / k**0.5
        b = torch.randn(n, generator=g) if bias and i != 1 else None
        p = make_qlinear(w, bias=b, left=left, right=right, clip=(0.9 - 0.05 * i, 0.95))
        lins.append(p)
    # one shared factor object per site, as the engine loads them (fuse_linears checks identity)
    lf, rf = lins[0].left.to(device), lins[0].right.to(device)
    return [QLinearParams(weight=p.weight.to(device), w_scale=p.w_scale.to(device),
                          bias=None if p.bias is None else p.bias.to(device), left=lf, right=rf, n1=n1,
                          clip=p.clip.to(device)) for p in lins]


def _want(x: torch.Tensor, p: QLinearParams) -> torch.Tensor:  # (M, K) -> (M, N)
    """The packed-codes W4A4 path, composed from the ops."""
    codes, scale = kron_quant(x, p.left, p.right, p.clip, p.n1, 4, True)
    return w4a4_matmul(codes, scale, p.weight, p.w_scale, p.bias, x.dtype)


@pytest.mark.parametrize("m", [1, 5, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_equals_one_linear_each(m: int, bias: bool) -> None:
    """FusedQLinear (one transform, G code sets; stacked GEMV rows at few tokens, per-slice GEMMs at more) gives
    each linear's own real_linear output bit for bit."""
    lins = _site(4, 6, [12, 8, 8], "cpu", bias)
    fused = fuse_linears(lins)
    assert fused is not None
    x = (torch.randn(2, m, 24, generator=torch.Generator().manual_seed(m)) * 3).to(torch.bfloat16)
    outs = fused(x)
    for got, p in zip(outs, lins, strict=True):
        assert torch.equal(got, real_linear(x, p))
        assert torch.equal(got.reshape(-1, got.shape[-1]), _want(x.reshape(-1, 24), p))


def test_unpacked_prefill_rule() -> None:
    x = torch.zeros(UNPACK_MIN_M, 8)
    assert not unpacked_prefill(x, None)  # CPU: the reference ops
    if CUDA:
        assert unpacked_prefill(x.cuda(), None)
        assert not unpacked_prefill(x[:-1].cuda(), None)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [UNPACK_MIN_M - 1, UNPACK_MIN_M, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_cuda_unpacked_prefill_equals_packed(m: int, bias: bool) -> None:
    """From UNPACK_MIN_M tokens the linears take int8 codes straight from the transform: the same outputs, bit for
    bit, as packed codes through w4a4_matmul (single and fused linears)."""
    lins = _site(32, 64, [256, 128, 128], "cuda", bias)
    fused = fuse_linears(lins)
    assert fused is not None
    x = (torch.randn(m, 2048, device="cuda", generator=torch.Generator(device="cuda").manual_seed(m)) * 3).to(
        torch.bfloat16)
    for got, p in zip(fused(x), lins, strict=True):
        want = _want(x, p)
        assert torch.equal(got, want)
        assert torch.equal(real_linear(x, p), want)
    codes, _ = kron_quant_multi(x, lins[0].left, lins[0].right, torch.stack([p.clip for p in lins]), 32, 4, True)
    assert codes.shape == (3, m, 1024)
