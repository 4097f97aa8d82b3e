from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from flatquant.core.quant import dequantize, fake_quant, quantize
from flatquant.core.spec import QuantSpec
from flatquant.ops import kv_quant
from flatquant.ops import reference as ref
from flatquant.ops.kv_quant import kv_quant_triton, kv_quant_write, kv_quant_write_triton

from ._util import DTYPES, KERNEL_DEVICES, assert_codes_match

SPEC = QuantSpec(bits=4, sym=False)


@st.composite
def kv_cases(draw: st.DrawFn) -> dict:
    t, h, d = draw(st.integers(1, 5)), draw(st.sampled_from([1, 3, 8, 9])), draw(st.sampled_from([8, 24, 64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(t, h, d, generator=g) * draw(st.sampled_from([1e-2, 1.0, 30.0]))
    if draw(st.booleans()):
        x[:, :, 0] *= 100.0
    if draw(st.booleans()):
        x[0, 0] = 0.0
    if draw(st.booleans()):
        x[-1, -1] = x[-1, -1].abs()  # one-signed row
    trans = torch.linalg.qr(torch.randn(d, d, generator=g))[0] if draw(st.booleans()) else None
    dtype = draw(st.sampled_from(DTYPES))
    clip = torch.tensor([draw(st.floats(0.5, 1.0)), draw(st.floats(0.5, 1.0))])
    return {"x": x.to(dtype), "trans": None if trans is None else trans.to(dtype), "clip": clip}


@pytest.mark.parametrize("with_trans", [True, False])
def test_opcheck(with_trans: bool) -> None:
    x = torch.randn(4, 3, 10, dtype=torch.float16)
    trans = torch.randn(10, 10, dtype=torch.float16) if with_trans else None
    torch.library.opcheck(kv_quant, (x, trans, torch.tensor([0.9, 0.8])))


@settings(settings.get_profile("ops"))
@given(case=kv_cases())
def test_reference_equals_core(case: dict) -> None:
    x, trans, clip = case["x"], case["trans"], case["clip"]
    codes, scale, zero = kv_quant(x, trans, clip)
    y = x.float() if trans is None else x.float() @ trans.float()
    want, s, z = quantize(y, SPEC, clip_lo=clip[0], clip_hi=clip[1])
    assert torch.equal(ref.unpack_int4_ref(codes, signed=False), want)
    assert torch.equal(scale, s.squeeze(-1)) and torch.equal(zero, z.squeeze(-1))
    deq = dequantize(ref.unpack_int4_ref(codes, signed=False), scale[..., None], zero[..., None], SPEC)
    assert torch.allclose(deq, fake_quant(y, SPEC, clip_lo=clip[0], clip_hi=clip[1]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@settings(settings.get_profile("ops"))
@given(case=kv_cases())
def test_triton_matches_reference(device: str, case: dict) -> None:
    x, trans, clip = case["x"], case["trans"], case["clip"]
    codes, scale, zero = kv_quant_triton(x.to(device), None if trans is None else trans.to(device), clip.to(device))
    want, s, z = ref.kv_quant_ref(x, trans, clip[0], clip[1])
    assert torch.allclose(scale.cpu(), s, rtol=1e-5, atol=0)
    assert int((zero.cpu() - z).abs().max()) <= (0 if trans is None else 1)
    y = x.float() if trans is None else x.float() @ trans.float()
    ratio = y / s[..., None] + z[..., None]
    assert_codes_match(ref.unpack_int4_ref(codes.cpu(), False), ref.unpack_int4_ref(want, False),
                       None if trans is None else ratio)


# --- flatquant::kv_quant_write: K and V quantized straight into the packed cache -------------------------------

CACHE_NAMES = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")


def _kv_views(b: int, t: int, h: int, d: int, dtype: torch.dtype, seed: int, layout: str) -> tuple[Tensor, Tensor]:
    """K and V ``(B, T, Hkv, d)`` with edge rows (an outlier channel, an all-zero head, a one-signed head).

    ``fused``: slices of one ``(B, T, (Hq + 2 Hkv) d)`` projection output, as the fused QKV linear gives them;
    ``transposed``: ``(B, Hkv, T, d)`` tensors seen as ``(B, T, Hkv, d)``; ``contiguous``: plain tensors.
    """
    g = torch.Generator().manual_seed(seed)
    hq = 2 * h + 1
    x = torch.randn(b, t, (hq + 2 * h) * d, generator=g) * 2.0
    x[..., hq * d] *= 60.0  # outlier channel of K
    x[0, 0, (hq + h) * d:(hq + h + 1) * d] = 0.0  # all-zero V head
    x[-1, -1, (hq + h - 1) * d:(hq + h) * d] = x[-1, -1, (hq + h - 1) * d:(hq + h) * d].abs()  # one-signed K head
    x = x.to(dtype)
    k, v = x[..., hq * d:(hq + h) * d].view(b, t, h, d), x[..., (hq + h) * d:].view(b, t, h, d)
    if layout == "transposed":
        return k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "contiguous":
        return k.contiguous(), v.contiguous()
    return k, v


def _caches(b: int, h: int, s: int, d: int, seed: int, device: str = "cpu") -> list[Tensor]:
    """Packed K and V caches holding junk, so that positions the write must not touch are checked too."""
    g = torch.Generator().manual_seed(seed + 1)
    out: list[Tensor] = []
    for _ in range(2):
        out += [torch.randint(0, 256, (b, h, s, d // 2), generator=g).to(torch.uint8),
                torch.rand(b, h, s, generator=g), torch.randint(0, 16, (b, h, s), generator=g).float()]
    return [c.to(device) for c in out]


def _composed(quant: Callable[..., tuple[Tensor, Tensor, Tensor]], k: Tensor, v: Tensor, k_trans: Tensor | None,
              k_clip: Tensor, v_clip: Tensor, caches: list[Tensor], idx: Tensor, k_bits: int, v_bits: int) -> None:
    """The engine's write before ``kv_quant_write``: ``quant`` per side, then ``index_copy_`` of its three outputs."""
    b, t, h, d = k.shape
    for x, trans, clip, bits, (codes, scale, zero) in ((k, k_trans, k_clip, k_bits, caches[:3]),
                                                       (v, None, v_clip, v_bits, caches[3:])):
        c, s, z = quant(x.reshape(b * t, h, d), trans, clip, bits)
        codes.index_copy_(2, idx, c.view(b, t, h, d // 2).transpose(1, 2))
        scale.index_copy_(2, idx, s.view(b, t, h).transpose(1, 2))
        zero.index_copy_(2, idx, z.view(b, t, h).transpose(1, 2))


def _assert_caches_equal(got: list[Tensor], want: list[Tensor]) -> None:
    for name, a, b in zip(CACHE_NAMES, got, want, strict=True):
        assert torch.equal(a.cpu(), b.cpu()), f"{name}: {int((a.cpu() != b.cpu()).sum())} entries differ"


# (B, T, Hkv, d, S, first position, K transform, (k_bits, v_bits), dtype, layout)
WRITE_CASES = [
    (1, 1, 8, 128, 9, 5, True, (4, 4), torch.bfloat16, "fused"),  # a decode step
    (2, 5, 3, 64, 12, 3, True, (4, 4), torch.float16, "fused"),
    (3, 2, 5, 16, 6, 1, False, (4, 4), torch.bfloat16, "fused"),
    (1, 6, 1, 128, 6, 0, False, (3, 3), torch.float16, "transposed"),  # a prefill filling the cache
    (2, 3, 7, 64, 10, 7, True, (2, 4), torch.bfloat16, "transposed"),
    (2, 4, 2, 16, 8, 2, True, (4, 2), torch.float16, "contiguous"),
    (1, 3, 9, 24, 5, 2, True, (3, 4), torch.bfloat16, "fused"),  # head_dim not a power of two
    (2, 2, 4, 64, 4, 1, True, (4, 3), torch.float32, "fused"),
]


def _write_args(case: tuple, seed: int = 0) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor, Tensor, int, int,
                                                      int]:
    b, t, h, d, s, first, with_trans, (kb, vb), dtype, layout = case
    k, v = _kv_views(b, t, h, d, dtype, seed, layout)
    g = torch.Generator().manual_seed(seed + 2)
    trans = torch.linalg.qr(torch.randn(d, d, generator=g))[0].to(dtype) if with_trans else None
    return (k, v, trans, torch.tensor([0.9, 0.8]), torch.tensor([0.95, 1.0]), torch.arange(first, first + t), kb, vb,
            s)


@pytest.mark.parametrize("case", WRITE_CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}d{c[3]}-{c[9]}")
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_write_kernel_equals_reference_equals_kv_quant_index_copy(device: str, case: tuple) -> None:
    k, v, trans, k_clip, v_clip, idx, kb, vb, s = _write_args(case)
    b, t, h, d = k.shape
    kernel = _caches(b, h, s, d, 0, device)
    if device == "cpu":  # the launcher itself: Triton's interpreter
        kv_quant_write_triton(k, v, trans, k_clip, v_clip, *kernel, idx, kb, vb)
    else:  # the op: the CUDA kernel
        dev = [x.to(device) if x is not None else None for x in (k, v, trans, k_clip, v_clip, idx)]
        kv_quant_write(*dev[:5], *kernel, dev[5], kb, vb)
    composed_kernel = _caches(b, h, s, d, 0, device)
    if device == "cpu":
        _composed(kv_quant_triton, k, v, trans, k_clip, v_clip, composed_kernel, idx, kb, vb)
    else:
        _composed(kv_quant, *dev[:5], composed_kernel, dev[5], kb, vb)  # kv_quant's CUDA kernel
    reference = _caches(b, h, s, d, 0)
    kv_quant_write(k, v, trans, k_clip, v_clip, *reference, idx, kb, vb)  # CPU: the reference
    composed_reference = _caches(b, h, s, d, 0)
    _composed(kv_quant, k, v, trans, k_clip, v_clip, composed_reference, idx, kb, vb)
    _assert_caches_equal(kernel, composed_kernel)
    _assert_caches_equal(reference, composed_reference)
    if device == "cpu" or trans is None:  # (on CUDA a K transform runs on tensor cores: a different fp32 sum)
        _assert_caches_equal(kernel, reference)


def test_write_leaves_other_positions_and_rows_alone() -> None:
    k, v, trans, k_clip, v_clip, idx, kb, vb, s = _write_args(WRITE_CASES[1])
    b, t, h, d = k.shape
    before = _caches(b, h, s, d, 0)
    after = [c.clone() for c in before]
    kv_quant_write_triton(k, v, trans, k_clip, v_clip, *after, idx, kb, vb)
    rest = torch.ones(s, dtype=torch.bool)
    rest[idx] = False
    for name, x, y in zip(CACHE_NAMES, before, after, strict=True):
        assert torch.equal(x[:, :, rest], y[:, :, rest]), name
        assert not torch.equal(x[:, :, idx], y[:, :, idx]), name


def test_write_without_tokens_is_a_no_op() -> None:
    k, v = torch.zeros(2, 0, 3, 16, dtype=torch.bfloat16), torch.zeros(2, 0, 3, 16, dtype=torch.bfloat16)
    clip = torch.tensor([1.0, 1.0])
    for write in (kv_quant_write_triton, kv_quant_write):
        caches = _caches(2, 3, 4, 16, 0)
        write(k, v, None, clip, clip, *caches, torch.zeros(0, dtype=torch.int64))
        _assert_caches_equal(caches, _caches(2, 3, 4, 16, 0))


@pytest.mark.parametrize("with_trans", [True, False])
def test_write_opcheck(with_trans: bool) -> None:
    k, v, trans, k_clip, v_clip, idx, kb, vb, s = _write_args(WRITE_CASES[1])  # non-contiguous K/V views
    trans = trans if with_trans else None
    b, t, h, d = k.shape
    torch.library.opcheck(kv_quant_write, (k, v, trans, k_clip, v_clip, *_caches(b, h, s, d, 0), idx, kb, vb))
    torch.library.opcheck(kv_quant_write, (k, v, trans, k_clip, v_clip, *_caches(b, h, s, d, 0), idx))


def test_write_under_torch_compile_fullgraph() -> None:
    """Traceable (custom op with declared mutations and a fake): the compiled write updates the caller's caches."""
    k, v, trans, k_clip, v_clip, idx, kb, vb, s = _write_args(WRITE_CASES[1])
    b, t, h, d = k.shape

    def step(k: Tensor, v: Tensor, caches: list[Tensor]) -> Tensor:
        kv_quant_write(k * 2, v, trans, k_clip, v_clip, *caches, idx, kb, vb)
        return caches[1].sum()

    eager, compiled = _caches(b, h, s, d, 0), _caches(b, h, s, d, 0)
    want = step(k, v, eager)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(k, v, compiled)
    assert torch.equal(got, want)
    _assert_caches_equal(compiled, eager)


@settings(settings.get_profile("ops"))
@given(b=st.integers(1, 2), t=st.integers(1, 4), h=st.sampled_from([1, 3, 8]), d=st.sampled_from([8, 16, 24, 64]),
       first=st.integers(0, 3), with_trans=st.booleans(), kb=st.integers(2, 4), vb=st.integers(2, 4),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["fused", "transposed"]), seed=st.integers(0, 1000))
def test_write_real_equals_fake(b: int, t: int, h: int, d: int, first: int, with_trans: bool, kb: int, vb: int,
                                dtype: torch.dtype, layout: str, seed: int) -> None:
    """The written cache (kernel through the interpreter, and reference) holds exactly the codes of the core
    quantizer of ``k @ k_trans`` and ``v``, and dequantizes to their fake quantization. The K transform here is a
    scaled signed permutation, so ``k @ k_trans`` is exact in any summation order (fp32 matmuls of other shapes
    and the kernel's dot round a general transform in different orders; the fixed cases above cover that one)."""
    k, v, trans, k_clip, v_clip, idx, _, _, s = _write_args(
        (b, t, h, d, first + t + 1, first, with_trans, (kb, vb), dtype, layout), seed)
    if trans is not None:
        g = torch.Generator().manual_seed(seed + 5)
        signs = (torch.randint(0, 2, (d,), generator=g) * 2 - 1).float()
        trans = torch.zeros(d, d)
        trans[torch.arange(d), torch.randperm(d, generator=g)] = signs * 0.5
        trans = trans.to(dtype)
    kernel, reference = _caches(b, h, s, d, seed), _caches(b, h, s, d, seed)
    kv_quant_write_triton(k, v, trans, k_clip, v_clip, *kernel, idx, kb, vb)
    kv_quant_write(k, v, trans, k_clip, v_clip, *reference, idx, kb, vb)
    _assert_caches_equal(kernel, reference)
    for x, tr, clip, bits, (codes, scale, zero) in ((k, trans, k_clip, kb, reference[:3]),
                                                    (v, None, v_clip, vb, reference[3:])):
        spec = QuantSpec(bits=bits, sym=False)
        y = (x.float() if tr is None else x.float() @ tr.float()).transpose(1, 2)  # (B, Hkv, T, d)
        want, sc, z = quantize(y, spec, clip_lo=clip[0], clip_hi=clip[1])
        got = ref.unpack_int4_ref(codes[:, :, idx], signed=False)
        assert torch.equal(got, want)
        assert torch.equal(scale[:, :, idx], sc[..., 0]) and torch.equal(zero[:, :, idx], z[..., 0])
        deq = ref.dequantize_kv_ref(codes[:, :, idx], scale[:, :, idx], zero[:, :, idx])
        assert torch.allclose(deq, fake_quant(y, spec, clip_lo=clip[0], clip_hi=clip[1]), rtol=1e-6, atol=1e-6)


def test_write_validates() -> None:
    k, v, trans, k_clip, v_clip, idx, kb, vb, s = _write_args(WRITE_CASES[4])
    b, t, h, d = k.shape
    caches = _caches(b, h, s, d, 0)
    good = {"k": k, "v": v, "k_trans": trans, "k_clip": k_clip, "v_clip": v_clip,
            **dict(zip(CACHE_NAMES, caches, strict=True)), "idx": idx, "k_bits": kb, "v_bits": vb}
    bad = [
        ({"v": v[:, :, :-1]}, "one shape"), ({"k": k[..., :-1], "v": v[..., :-1]}, "even head_dim"),
        ({"v": v.half()}, "dtype"), ({"k_trans": trans[:-1]}, "k_trans"), ({"v_clip": v_clip[:1]}, "clip"),
        ({"k_bits": 5}, "bits"), ({"v_bits": 1}, "bits"), ({"k_codes": caches[0].float()}, "k_codes"),
        ({"v_codes": caches[3][:, :-1]}, "v_codes"), ({"k_scale": caches[1][:, :, :-1]}, "k_scale"),
        ({"v_zero": caches[5].transpose(1, 2).contiguous().transpose(1, 2)}, "strides"), ({"idx": idx.int()}, "idx"),
        ({"idx": idx[:-1]}, "idx"),
    ]
    for change, match in bad:
        args = {**good, **change}
        for write in (kv_quant_write, kv_quant_write_triton):
            with pytest.raises(ValueError, match=match):
                write(**args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 16, 300])
def test_cuda_model_dims(t: int) -> None:
    """LLaMA-3-8B KV shapes (8 KV heads of 128, K transform, fused-QKV views): the op's one launch writes exactly
    what ``kv_quant`` per side and ``index_copy_`` wrote, bit for bit, decode to prefill sizes."""
    b, h, d, s = 2, 8, 128, 512
    k, v = _kv_views(b, t, h, d, torch.bfloat16, t, "fused")
    g = torch.Generator().manual_seed(t)
    trans = torch.linalg.qr(torch.randn(d, d, generator=g))[0].to(torch.bfloat16)
    k, v, trans = k.cuda(), v.cuda(), trans.cuda()
    k_clip, v_clip = torch.tensor([0.9, 0.8], device="cuda"), torch.tensor([0.95, 1.0], device="cuda")
    idx = torch.arange(s - t - 3, s - 3, device="cuda")
    got, want = _caches(b, h, s, d, t, "cuda"), _caches(b, h, s, d, t, "cuda")
    kv_quant_write(k, v, trans, k_clip, v_clip, *got, idx)
    _composed(kv_quant, k, v, trans, k_clip, v_clip, want, idx, 4, 4)
    _assert_caches_equal(got, want)
