"""``flatquant::kv4_decode_attention``: opcheck, the reference against plain attention, the Triton kernel
(through the interpreter on CPU) against the reference in both MMA layouts (unswapped and ``swap``), the default
launch rule, and on CUDA the inline-PTX nibble unpack against the plain one bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flatquant.ops import kv_quant
from flatquant.ops.kv_attention import (
    default_launch,
    default_splits,
    kv4_decode_attention,
    kv4_decode_attention_triton,
)
from flatquant.ops.reference import dequantize_kv_ref

from ._util import CUDA, KERNEL_DEVICES


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
       seed=st.integers(0, 1000), swap=st.sampled_from([None, False, True]))
def test_triton_matches_reference(device: str, b: int, hkv: int, rep: int, s: int, d: int, dtype: torch.dtype,
                                  seed: int, swap: bool | None) -> None:
    cache = _cache(b, hkv, s, d, seed=seed)
    q = torch.randn(b, hkv * rep, d, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    length = torch.randint(1, s + 1, (b,), generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    start = (length - 1) // 3
    want = kv4_decode_attention(q, *cache, start, length, d ** -0.5)
    got = kv4_decode_attention_triton(*(t.to(device) for t in (q, *cache, start, length)), d ** -0.5, swap=swap).cpu()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("swap", [False, True], ids=["mq", "swap"])
@pytest.mark.parametrize("splits", [1, 2, 5, 64])
@pytest.mark.parametrize("rep", [1, 3, 4, 7])
def test_split_positions_match_reference(device: str, splits: int, rep: int, swap: bool) -> None:
    """Flash-decoding: the cache's positions split over programs and merged, for GQA ratios 1/3/4/7, left padding
    (start > 0), rows shorter than the capacity (empty chunks) and more chunks than filled tiles, in both MMA
    layouts."""
    b, hkv, s, d = 2, 2, 70, 16
    cache = _cache(b, hkv, s, d, seed=rep)
    q = torch.randn(b, hkv * rep, d, generator=torch.Generator().manual_seed(rep)).to(torch.bfloat16)
    start, length = torch.tensor([0, 9], dtype=torch.int32), torch.tensor([70, 33], dtype=torch.int32)
    want = kv4_decode_attention(q, *cache, start, length, d ** -0.5)
    args = [t.to(device) for t in (q, *cache, start, length)]
    got = kv4_decode_attention_triton(*args, d ** -0.5, splits=splits, swap=swap).cpu()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    again = kv4_decode_attention_triton(*args, d ** -0.5, splits=splits, swap=swap).cpu()
    assert torch.equal(got, again)  # the merge is deterministic


def test_default_splits_fill_the_gpu_and_depend_on_capacity_only() -> None:
    assert default_splits(1, 8, 4096, 64, 132) == 33  # 264 programs for batch 1 on an H100/H200
    assert default_splits(16, 8, 4096, 64, 132) == 3
    assert default_splits(1, 8, 100, 64, 132) == 2  # never more chunks than tiles
    assert default_splits(64, 8, 4096, 64, 132) == 1
    assert default_splits(16, 8, 4096, 64, 132, programs_per_sm=4) == 5


def test_default_launch_keeps_the_measured_choices() -> None:
    """The measured H200 choices: few (row, KV head) pairs tiles of 128, 4 warps, 2 stages, 2 programs per SM;
    many pairs tiles of 64, 4 programs per SM; the swapped layout for GQA groups of <= 8 heads at both."""
    for b in (1, 2, 4):
        dl = default_launch(b, 8, 4, 132)
        assert (dl.block_t, dl.num_warps, dl.num_stages, dl.swap, dl.programs_per_sm) == (128, 4, 2, True, 2)
    assert not default_launch(1, 8, 16, 132).swap
    dl = default_launch(16, 8, 4, 132)
    assert (dl.block_t, dl.num_warps, dl.num_stages, dl.swap, dl.programs_per_sm) == (64, 4, 2, True, 4)
    assert default_launch(8, 8, 4, 132).swap and not default_launch(16, 8, 16, 132).swap
    assert default_launch(16, 8, 16, 132).programs_per_sm == 2


# (batch, KV heads, GQA ratio, cache positions, head_dim): odd head counts and ratios, one row and several.
_SHAPES = [(1, 3, 3, 45, 16), (3, 1, 7, 37, 16), (2, 5, 1, 29, 8), (1, 2, 4, 70, 24), (4, 3, 5, 33, 16)]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("swap", [False, True], ids=["mq", "swap"])
@pytest.mark.parametrize("block_t,splits", [(16, 1), (16, 3), (32, 2)])
@pytest.mark.parametrize("shape", _SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layouts_and_tiles_match_reference(device: str, shape: tuple, block_t: int, splits: int,
                                           swap: bool) -> None:
    """Both MMA layouts at two position tiles and several splits, odd numbers of KV heads, GQA ratios 1/3/5/7,
    batch 1 and > 1, left padding and rows of different lengths (head_dim 24: a masked head-dim tail)."""
    b, hkv, rep, s, d = shape
    if device == "cuda":
        block_t = 2 * block_t  # reduction sides of at least 32 on CUDA
    cache = _cache(b, hkv, s, d, seed=s)
    g = torch.Generator().manual_seed(s)
    q = torch.randn(b, hkv * rep, d, generator=g).to(torch.bfloat16)
    length = torch.randint(s // 2, s + 1, (b,), generator=g).to(torch.int32)
    start = torch.randint(0, 6, (b,), generator=g).to(torch.int32)
    want = kv4_decode_attention(q, *cache, start, length, d ** -0.5)
    args = [t.to(device) for t in (q, *cache, start, length)]
    got = kv4_decode_attention_triton(*args, d ** -0.5, block_t=block_t, splits=splits, swap=swap).cpu()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def _llama_case(b: int, s: int, d: int, dtype: torch.dtype, seed: int) -> tuple:
    """LLaMA-3-8B heads (32 query, 8 KV) on CUDA, the rows filled to different lengths with left padding."""
    hq, hkv = 32, 8
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    cache = [torch.randint(0, 256, (b, hkv, s, d // 2), generator=g, dtype=torch.uint8),
             torch.rand(b, hkv, s, generator=g) * 0.1, torch.randint(0, 16, (b, hkv, s), generator=g).float()]
    cache += [torch.randint(0, 256, (b, hkv, s, d // 2), generator=g, dtype=torch.uint8),
              torch.rand(b, hkv, s, generator=g) * 0.1, torch.randint(0, 16, (b, hkv, s), generator=g).float()]
    length = torch.randint(s // 2, s + 1, (b,), generator=g).to(torch.int32)
    start = torch.randint(0, 8, (b,), generator=g).to(torch.int32)
    return q, cache, start, length


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,d", [(1, 128), (16, 128), (3, 96)])
def test_cuda_ptx_unpack_is_bit_identical(b: int, d: int, dtype: torch.dtype) -> None:
    """The inline-PTX nibble unpack (``swar``) against the plain shifts and conversions: the same codes reach the
    same MMAs, so the outputs are equal bit for bit, in both MMA layouts, at the default and at other launches
    (head_dim 96: the masked head-dim path); each also within the tolerance of the fp32 reference."""
    q, cache, start, length = _llama_case(b, 700, d, dtype, seed=b + d)
    want = kv4_decode_attention(q, *cache, start, length, d ** -0.5)
    args = [t.cuda() for t in (q, *cache, start, length)]
    launches = [{}, {"block_t": 64, "num_warps": 4, "num_stages": 2, "splits": 3},
                {"block_t": 128, "num_warps": 8, "num_stages": 3, "splits": 2},
                {"block_t": 32, "num_warps": 2, "num_stages": 1, "splits": 7}]
    for swap in (False, True):
        for kw in launches:
            plain = kv4_decode_attention_triton(*args, d ** -0.5, swar=False, swap=swap, **kw)
            ptx = kv4_decode_attention_triton(*args, d ** -0.5, swar=True, swap=swap, **kw)
            assert torch.equal(ptx, plain), (swap, kw)
            torch.testing.assert_close(ptx.cpu().float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_q_trans_in_the_kernel(device: str, swap: bool, splits: int, dtype: torch.dtype) -> None:
    """``q_trans`` (the K transform's inverse-transpose, applied to the queries inside the kernel): the op's
    reference is exactly the op on ``q @ q_trans`` in q's dtype, and the kernel equals the kernel fed that product
    (bf16: to the last bit of the rounded queries, whose fp32 sums may differ in order)."""
    b, hkv, rep, s, d = 2, 2, 3, 40, 16
    kc, ks, kz, vc, vs, vz = _cache(b, hkv, s, d, seed=5)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(b, hkv * rep, d, generator=g).to(dtype)
    m = torch.randn(d, d, generator=g) / d ** 0.5
    start, length = torch.tensor([0, 5], dtype=torch.int32), torch.tensor([40, 31], dtype=torch.int32)
    cache = (kc, ks, kz, vc, vs, vz, start, length)
    want = kv4_decode_attention(q, *cache, d ** -0.5, m)
    assert torch.equal(want, kv4_decode_attention(q @ m.to(dtype), *cache, d ** -0.5))
    dev = [t.to(device) for t in cache]
    got = kv4_decode_attention_triton(q.to(device), *dev, d ** -0.5, m.to(device), splits=splits, swap=swap).cpu()
    plain = kv4_decode_attention_triton((q @ m.to(dtype)).to(device), *dev, d ** -0.5, splits=splits,
                                        swap=swap).cpu()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), plain.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="q_trans must be"):
        kv4_decode_attention(q, *cache, d ** -0.5, m[:-1])


def test_q_trans_opcheck() -> None:
    b, hq, hkv, s, d = 2, 4, 2, 7, 8
    cache = _cache(b, hkv, s, d)
    start, length = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([7, 5], dtype=torch.int32)
    torch.library.opcheck(kv4_decode_attention, (torch.randn(b, hq, d), *cache, start, length, d ** -0.5,
                                                 torch.randn(d, d)))
