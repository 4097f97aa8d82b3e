from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flatquant.core.quant import dequantize, fake_quant, quantize
from flatquant.core.spec import QuantSpec
from flatquant.ops import kv_quant
from flatquant.ops import reference as ref
from flatquant.ops.kv_quant import kv_quant_triton

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
