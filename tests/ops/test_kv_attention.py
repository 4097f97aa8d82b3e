"""``flatquant::kv4_decode_attention``: opcheck, the reference against plain attention, the Triton kernel
(through the interpreter on CPU) against the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flatquant.ops import kv_quant
from flatquant.ops.kv_attention import kv4_decode_attention, kv4_decode_attention_triton
from flatquant.ops.reference import dequantize_kv_ref

from ._util import KERNEL_DEVICES


def _cache(b: int, hkv: int, s: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple:
    g = torch.Generator().manual_seed(seed)
    clip = torch.tensor([0.95, 0.9])
    out = []
    for _ in range(2):
        x = torch.randn(b * s, hkv, d, generator=g).to(dtype)
        codes, scale, zero = kv_quant(x, None, clip)
        out += [codes.view(b, s, hkv, d // 2).transpose(1, 2).contiguous(),
                scale.view(b, s, hkv).transpose(1, 2).contiguous(), zero.view(b, s, hkv).transpose(1, 2).contiguous()]
    return tuple(out)


def test_opcheck() -> None:
    b, hq, hkv, s, d = 2, 4, 2, 7, 8
    cache = _cache(b, hkv, s, d)
    q = torch.randn(b, hq, d)
    start, length = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([7, 5], dtype=torch.int32)
    torch.library.opcheck(kv4_decode_attention, (q, *cache, start, length, d ** -0.5))


def test_reference_equals_sdpa_on_dequantized_cache() -> None:
    b, hq, hkv, s, d = 2, 6, 2, 9, 16
    kc, ks, kz, vc, vs, vz = _cache(b, hkv, s, d, seed=3)
    q = torch.randn(b, hq, d)
    start, length = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([9, 6], dtype=torch.int32)
    out = kv4_decode_attention(q, kc, ks, kz, vc, vs, vz, start, length, d ** -0.5)
    k, v = dequantize_kv_ref(kc, ks, kz), dequantize_kv_ref(vc, vs, vz)
    for i in range(b):
        lo, hi = int(start[i]), int(length[i])
        ki = k[i, :, lo:hi].repeat_interleave(hq // hkv, 0)
        vi = v[i, :, lo:hi].repeat_interleave(hq // hkv, 0)
        want = torch.nn.functional.scaled_dot_product_attention(q[i, :, None], ki, vi)[:, 0]
        torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@settings(settings.get_profile("ops"), max_examples=8)
@given(b=st.integers(1, 2), hkv=st.sampled_from([1, 2]), rep=st.sampled_from([1, 3]), s=st.integers(1, 40),
       d=st.sampled_from([8, 16, 24]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 1000))
def test_triton_matches_reference(device: str, b: int, hkv: int, rep: int, s: int, d: int, dtype: torch.dtype,
                                  seed: int) -> None:
    cache = _cache(b, hkv, s, d, seed=seed)
    q = torch.randn(b, hkv * rep, d, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    length = torch.randint(1, s + 1, (b,), generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    start = (length - 1) // 3
    want = kv4_decode_attention(q, *cache, start, length, d ** -0.5)
    got = kv4_decode_attention_triton(*(t.to(device) for t in (q, *cache, start, length)), d ** -0.5).cpu()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("splits", [1, 2, 5, 64])
@pytest.mark.parametrize("rep", [1, 3, 4, 7])
def test_split_positions_match_reference(device: str, splits: int, rep: int) -> None:
    """Flash-decoding: the cache's positions split over programs and merged, for GQA ratios 1/3/4/7, left padding
    (start > 0), rows shorter than the capacity (empty chunks) and more chunks than filled tiles."""
    b, hkv, s, d = 2, 2, 70, 16
    cache = _cache(b, hkv, s, d, seed=rep)
    q = torch.randn(b, hkv * rep, d, generator=torch.Generator().manual_seed(rep)).to(torch.bfloat16)
    start, length = torch.tensor([0, 9], dtype=torch.int32), torch.tensor([70, 33], dtype=torch.int32)
    want = kv4_decode_attention(q, *cache, start, length, d ** -0.5)
    args = [t.to(device) for t in (q, *cache, start, length)]
    got = kv4_decode_attention_triton(*args, d ** -0.5, splits=splits).cpu()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    again = kv4_decode_attention_triton(*args, d ** -0.5, splits=splits).cpu()
    assert torch.equal(got, again)  # the merge is deterministic


def test_default_splits_fill_the_gpu_and_depend_on_capacity_only() -> None:
    from flatquant.ops.kv_attention import default_splits

    assert default_splits(1, 8, 4096, 64, 132) == 33  # 264 programs for batch 1 on an H100/H200
    assert default_splits(16, 8, 4096, 64, 132) == 3
    assert default_splits(1, 8, 100, 64, 132) == 2  # never more chunks than tiles
    assert default_splits(64, 8, 4096, 64, 132) == 1
