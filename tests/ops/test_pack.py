from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flatquant.ops import int4_halves_layout, pack_int4, unpack_int4
from flatquant.ops import reference as ref
from flatquant.ops.pack import pack_int4_triton, unpack_int4_triton

from ._util import KERNEL_DEVICES


def test_pack_layout_low_nibble_first() -> None:
    codes = torch.tensor([[1, -1, -8, 7]], dtype=torch.int8)
    assert pack_int4(codes).tolist() == [[0xF1, 0x78]]


@pytest.mark.parametrize("shape", [(4, 6), (3, 1, 10), (0, 8)])
def test_opcheck(shape: tuple[int, ...]) -> None:
    codes = torch.randint(-8, 8, shape, dtype=torch.int8)
    torch.library.opcheck(pack_int4, (codes,))
    torch.library.opcheck(unpack_int4, (pack_int4(codes),))
    torch.library.opcheck(unpack_int4, (pack_int4(codes), False))
    if len(shape) == 2 and shape[0]:
        torch.library.opcheck(int4_halves_layout, (pack_int4(codes), 8))


@settings(settings.get_profile("ops"))
@given(rows=st.integers(1, 5), cols=st.integers(1, 40), signed=st.booleans())
def test_roundtrip(rows: int, cols: int, signed: bool) -> None:
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = torch.randint(lo, hi, (rows, 2 * cols), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(codes), signed), codes)


def test_halves_layout_roundtrip() -> None:
    codes = torch.randint(-8, 8, (5, 200), dtype=torch.int8)
    halves = int4_halves_layout(pack_int4(codes), 64)
    assert halves.shape == (5, 128)
    back = ref.halves_to_codes_ref(halves, 64)
    assert torch.equal(back[:, :200], codes) and not back[:, 200:].any()
    # Byte j of a tile holds elements j (low) and j + 32 (high).
    assert int(halves[0, 0]) == (int(codes[0, 0]) & 0xF) | ((int(codes[0, 32]) & 0xF) << 4)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("signed", [True, False])
def test_triton_matches_reference(device: str, signed: bool) -> None:
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = torch.randint(lo, hi, (7, 2 * 1500 + 6), dtype=torch.int8)
    packed = pack_int4_triton(codes.to(device)).cpu()
    assert torch.equal(packed, ref.pack_int4_ref(codes))
    assert torch.equal(unpack_int4_triton(packed.to(device), signed).cpu(), codes)
    buf = torch.full(codes.shape, 99, dtype=torch.int8, device=device)
    assert unpack_int4_triton(packed.to(device), signed, out=buf) is buf
    assert torch.equal(buf.cpu(), codes)
    with pytest.raises(ValueError, match="out must be"):
        unpack_int4_triton(packed.to(device), signed, out=buf[:, :-2])


@pytest.mark.parametrize("signed", [True, False])
def test_reference_unpack_every_byte(signed: bool) -> None:
    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8)[None]
    lo, hi = packed.long() & 0xF, packed.long() >> 4
    if signed:
        lo, hi = lo - 16 * (lo >= 8), hi - 16 * (hi >= 8)
    got = ref.unpack_int4_ref(packed, signed=signed)
    assert got.dtype == torch.int8 and got.shape == (1, 512)
    assert torch.equal(got[0, 0::2].long(), lo[0]) and torch.equal(got[0, 1::2].long(), hi[0])
