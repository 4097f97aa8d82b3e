from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flatquant.ops import int4_halves_layout, w4a4_matmul, w4a8_matmul, w8a8_matmul
from flatquant.ops import reference as ref
from flatquant.ops.matmul import (
    MODE_W4A4,
    MODE_W4A8,
    MODE_W8A8,
    int8_gemm_triton,
    qmatmul_triton,
    tma_usable,
    w4a4_triton,
    w4a8_triton,
    w8a8_tma_triton,
)

from ._util import KERNEL_DEVICES


def _operands(m: int, n: int, k: int, seed: int, bias: bool, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "a4": torch.randint(-8, 8, (m, k), generator=g, dtype=torch.int8),
        "a8": torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8),
        "w4": torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8),
        "w8": torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8),
        "sa": torch.rand(m, generator=g) * 0.1 + 1e-3,
        "sw": torch.rand(n, generator=g) * 0.1 + 1e-3,
        "bias": (torch.randn(n, generator=g) if bias else None),
        "dtype": dtype,
    }


def test_opcheck() -> None:
    o = _operands(5, 7, 64, 0, True, torch.bfloat16)
    b = o["bias"].to(torch.bfloat16)
    w4 = ref.pack_int4_ref(o["w4"])
    torch.library.opcheck(w4a4_matmul, (ref.pack_int4_ref(o["a4"]), o["sa"], w4, o["sw"], b, torch.bfloat16))
    torch.library.opcheck(w4a4_matmul, (ref.pack_int4_ref(o["a4"]), o["sa"], w4, o["sw"], None, torch.float16))
    torch.library.opcheck(w4a8_matmul, (o["a8"], o["sa"], int4_halves_layout(w4), o["sw"], b, torch.bfloat16))
    torch.library.opcheck(w8a8_matmul, (o["a8"], o["sa"], o["w8"], o["sw"], None, torch.float32))
    res = torch.randn(5, 7).to(torch.bfloat16)
    torch.library.opcheck(w8a8_matmul, (o["a8"], o["sa"], o["w8"], o["sw"], b, torch.bfloat16, res))


def test_reference_is_exact_integer_gemm() -> None:
    o = _operands(4, 3, 4096, 1, False, torch.float32)
    acc = (o["a8"].long() @ o["w8"].long().T).float()
    want = acc * o["sa"][:, None] * o["sw"][None, :]
    assert torch.equal(w8a8_matmul(o["a8"], o["sa"], o["w8"], o["sw"], None, torch.float32), want)
    got = w4a4_matmul(ref.pack_int4_ref(o["a4"]), o["sa"], ref.pack_int4_ref(o["w4"]), o["sw"], None, torch.float32)
    assert torch.equal(got, (o["a4"].long() @ o["w4"].long().T).float() * o["sa"][:, None] * o["sw"][None, :])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("swap_ab", [False, True])
@settings(settings.get_profile("ops"))
@given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.sampled_from([2, 64, 128, 200, 384]),
       seed=st.integers(0, 2**31 - 1), bias=st.booleans(), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_triton_matches_reference(device: str, swap_ab: bool, m: int, n: int, k: int, seed: int, bias: bool,
                                  dtype: torch.dtype) -> None:
    """All three GEMMs, both operand orders, bit-equal to the reference (edges and K tails included)."""
    o = _operands(m, n, k, seed, bias, dtype)
    b = None if o["bias"] is None else o["bias"].to(dtype)
    def d(t):
        return None if t is None else t.to(device)

    cfg = {"SWAP_AB": swap_ab}
    cases = [
        (MODE_W4A4, ref.pack_int4_ref(o["a4"]), ref.pack_int4_ref(o["w4"]), o["a4"], o["w4"]),
        (MODE_W4A8, o["a8"], ref.halves_layout_ref(ref.pack_int4_ref(o["w4"])), o["a8"], o["w4"]),
    ]
    if not swap_ab:
        cases.append((MODE_W8A8, o["a8"], o["w8"], o["a8"], o["w8"]))
    for mode, a, w, a_codes, w_codes in cases:
        got = qmatmul_triton(d(a), d(o["sa"]), d(w), d(o["sw"]), d(b), k, mode, dtype, cfg).cpu()
        want = ref.int_matmul_ref(a_codes, w_codes, o["sa"], o["sw"], b, dtype)
        # fp32 epilogue: equal up to a possible FMA contraction of the bias add (one output ulp).
        assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=1e-6), f"mode {mode}"
        if b is None:
            assert torch.equal(got, want), f"mode {mode}"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("m,k,n", [(1, 64, 5), (40, 256, 72), (130, 320, 33)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("schedule", [(False, False), (True, False), (True, True)],
                         ids=["tile_per_program", "persistent", "persistent_flat"])
def test_tma_w8a8_matches_reference(device: str, m: int, k: int, n: int, dtype: torch.dtype,
                                    schedule: tuple[bool, bool]) -> None:
    """The TMA-fed W8A8 kernel (edges zero-filled by the descriptors) equals the reference, with and without bias,
    with one output tile per program and persistent (programs looping over the tiles; flattened pipeline)."""
    o = _operands(m, n, k, m * n, True, dtype)
    d = {key: (v.to(device) if isinstance(v, torch.Tensor) else v) for key, v in o.items()}
    assert tma_usable(d["a8"], d["w8"])
    cfg = ((32, 32, 64, 4, 2) if device == "cpu" else (64, 64, 64, 4, 2)) + schedule
    got = w8a8_tma_triton(d["a8"], d["sa"], d["w8"], d["sw"], None, dtype, config=cfg).cpu()
    assert torch.equal(got, ref.int_matmul_ref(o["a8"], o["w8"], o["sa"], o["sw"], None, dtype))
    b = o["bias"].to(dtype)
    got = w8a8_tma_triton(d["a8"], d["sa"], d["w8"], d["sw"], b.to(device), dtype, config=cfg).cpu()
    want = ref.int_matmul_ref(o["a8"], o["w8"], o["sa"], o["sw"], b, dtype)
    assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=1e-6)
    assert torch.equal(int8_gemm_triton(d["a8"], d["sa"], d["w8"], d["sw"], None, dtype).cpu(),
                       ref.int_matmul_ref(o["a8"], o["w8"], o["sa"], o["sw"], None, dtype))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_empty_operands(device: str) -> None:
    """Zero tokens, features or K on every dispatch path: empty or zero outputs, no crash."""
    for m, n, k in [(0, 5, 128), (200, 0, 128), (200, 5, 0), (3, 0, 128)]:
        a4 = torch.zeros(m, k // 2, dtype=torch.uint8, device=device)
        w4 = torch.zeros(n, k // 2, dtype=torch.uint8, device=device)
        sa, sw = torch.ones(m, device=device), torch.ones(n, device=device)
        for unpack_min_m in (0, 10**9):
            out = w4a4_triton(a4, sa, w4, sw, None, torch.float32, unpack_min_m=unpack_min_m)
            assert out.shape == (m, n) and not out.any()
            halves = ref.halves_layout_ref(w4.cpu()).to(device)
            out = w4a8_triton(torch.zeros(m, k, dtype=torch.int8, device=device), sa, halves, sw, None,
                              torch.float32, unpack_min_m=unpack_min_m)
            assert out.shape == (m, n) and not out.any()
    assert not tma_usable(torch.zeros(4, 0, dtype=torch.int8), torch.zeros(3, 0, dtype=torch.int8))


def test_tma_rules() -> None:
    a = torch.zeros(4, 40, dtype=torch.int8)
    assert not tma_usable(a, a)  # 40-byte rows are not 16-byte multiples
    assert tma_usable(torch.zeros(4, 48, dtype=torch.int8), torch.zeros(3, 48, dtype=torch.int8))
    assert not tma_usable(torch.zeros(4, 48, dtype=torch.int8)[:, 1:33], torch.zeros(3, 32, dtype=torch.int8))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("unpack_min_m", [0, 10**9])
@pytest.mark.parametrize("k", [128, 200, 384])
@pytest.mark.parametrize("m", [3, 19])
def test_dispatch_paths_are_identical(device: str, unpack_min_m: int, k: int, m: int) -> None:
    """Split-K (decode), unpack-to-int8 + W8A8 (large M) and the fused-unpack kernels give the reference's exact
    output."""
    o = _operands(m, 23, k, k, False, torch.bfloat16)
    d = {key: (v.to(device) if isinstance(v, torch.Tensor) else v) for key, v in o.items()}
    got4 = w4a4_triton(ref.pack_int4_ref(o["a4"]).to(device), d["sa"], ref.pack_int4_ref(o["w4"]).to(device),
                       d["sw"], None, torch.bfloat16, unpack_min_m=unpack_min_m)
    assert torch.equal(got4.cpu(), ref.int_matmul_ref(o["a4"], o["w4"], o["sa"], o["sw"], None, torch.bfloat16))
    halves = ref.halves_layout_ref(ref.pack_int4_ref(o["w4"])).to(device)
    got8 = w4a8_triton(d["a8"], d["sa"], halves, d["sw"], None, torch.float32, unpack_min_m=unpack_min_m)
    assert torch.equal(got8.cpu(), ref.int_matmul_ref(o["a8"], o["w4"], o["sa"], o["sw"], None, torch.float32))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 300, 2048])
@pytest.mark.parametrize("k,n", [(4096, 4096), (576, 1536)])
def test_cuda_autotuned(m: int, k: int, n: int) -> None:
    o = _operands(m, n, k, m + k, True, torch.bfloat16)
    o = {key: (v.cuda() if isinstance(v, torch.Tensor) else v) for key, v in o.items()}
    b = o["bias"].to(torch.bfloat16)
    w4 = ref.pack_int4_ref(o["w4"])
    got = w4a4_matmul(ref.pack_int4_ref(o["a4"]), o["sa"], w4, o["sw"], b, torch.bfloat16)
    want = ref.int_matmul_ref(o["a4"], o["w4"], o["sa"], o["sw"], b, torch.bfloat16)
    assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=1e-6)
    got = w4a8_matmul(o["a8"], o["sa"], int4_halves_layout(w4), o["sw"], b, torch.bfloat16)
    want = ref.int_matmul_ref(o["a8"], o["w4"], o["sa"], o["sw"], b, torch.bfloat16)
    assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=1e-6)
    got = w8a8_matmul(o["a8"], o["sa"], o["w8"], o["sw"], None, torch.float32)
    assert torch.equal(got, ref.int_matmul_ref(o["a8"], o["w8"], o["sa"], o["sw"], None, torch.float32))


@pytest.mark.parametrize("k", [1024, 16384])
def test_reference_fp32_path_is_exact_at_the_extremes(k: int) -> None:
    """int4 × int4 runs in fp32 (partial sums < 2^24); all-(-8) codes plus a ±1 pattern hit the largest sums."""
    g = torch.Generator().manual_seed(k)
    a = torch.full((3, k), -8, dtype=torch.int8)
    w = torch.full((5, k), -8, dtype=torch.int8)
    a[1] = torch.randint(-8, 8, (k,), generator=g, dtype=torch.int8)
    w[2, ::2] = 7
    ones = torch.ones(3), torch.ones(5)
    got = ref.int_matmul_ref(a, w, *ones, None, torch.float32, a_bits=4, w_bits=4)
    assert torch.equal(got, (a.long() @ w.long().T).float())
    assert got[0, 0] == 64 * k


@pytest.mark.parametrize("m,k,n", [(1, 576, 96), (3, 40, 24), (5, 13, 7), (17, 1536, 64)])
def test_int8_mm_cpu_is_exact(m: int, k: int, n: int) -> None:
    """The CPU engine's int8 product (``torch._int_mm``, or the fp32 fallback for shapes it refuses) equals the
    exact integer product, and with the shared epilogue the reference GEMM bit for bit."""
    g = torch.Generator().manual_seed(m * k + n)
    a = torch.randint(-8, 8, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    acc = ref.int8_mm_cpu(a, w)
    assert acc.dtype == torch.int32 and torch.equal(acc, a.long() @ w.long().T)
    sa, sw, bias = torch.rand(m, generator=g), torch.rand(n, generator=g), torch.randn(n, generator=g)
    want = ref.int_matmul_ref(a, w, sa, sw, bias, torch.bfloat16, a_bits=4, w_bits=4)
    assert torch.equal(ref.dequant_epilogue_ref(acc, sa, sw, bias, torch.bfloat16), want)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("schedule", [(False, False), (True, True)], ids=["tile_per_program", "persistent_flat"])
def test_tma_residual_in_the_epilogue(device: str, dtype: torch.dtype, schedule: tuple[bool, bool]) -> None:
    """``residual`` added in the TMA kernel's epilogue gives the bits of the product plus the residual as a separate
    add in the output dtype (the op's reference), with and without bias; a wrong shape is refused."""
    m, n, k = 70, 40, 128
    o = _operands(m, n, k, 11, True, dtype)
    res = (torch.randn(m, n, generator=torch.Generator().manual_seed(3)) * 4).to(dtype)
    bias = o["bias"].to(dtype)
    cfg = ((32, 32, 64, 4, 2) if device == "cpu" else (64, 64, 64, 4, 2)) + schedule
    dev = [v.to(device) for v in (o["a8"], o["sa"], o["w8"], o["sw"])]
    for b in (None, bias):
        got = w8a8_tma_triton(*dev, None if b is None else b.to(device), dtype, config=cfg, residual=res.to(device))
        want = w8a8_matmul(o["a8"], o["sa"], o["w8"], o["sw"], b, dtype, res)
        plain = w8a8_matmul(o["a8"], o["sa"], o["w8"], o["sw"], b, dtype)
        assert not torch.equal(want, plain)
        if b is None:
            assert torch.equal(got.cpu(), want)
        else:  # fp32 epilogue: equal up to a possible FMA contraction of the bias add (one output ulp)
            assert torch.allclose(got.cpu().float(), want.float(), rtol=2**-7, atol=1e-6)
    with pytest.raises(ValueError, match="residual must be"):
        w8a8_tma_triton(*dev, None, dtype, config=cfg, residual=res[:, :-1].to(device))
    with pytest.raises(ValueError, match="config must be"):
        w8a8_tma_triton(*dev, None, dtype, config=cfg[:6])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("schedule", [(True, False), (True, True)], ids=["persistent", "persistent_flat"])
def test_cuda_persistent_schedules_loop_over_tiles(schedule: tuple[bool, bool]) -> None:
    """More output tiles than SMs (288 tiles of 64 x 64), so every persistent program loops over several tiles (and
    the flattened pipeline runs across tile boundaries): equal to the reference, with and without the residual."""
    m, n, k = 1024, 1152, 512
    o = _operands(m, n, k, 5, False, torch.bfloat16)
    res = torch.randn(m, n, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    dev = [v.cuda() for v in (o["a8"], o["sa"], o["w8"], o["sw"])]
    cfg = (64, 64, 64, 4, 3) + schedule
    assert torch.equal(w8a8_tma_triton(*dev, None, torch.bfloat16, config=cfg).cpu(),
                       w8a8_matmul(o["a8"], o["sa"], o["w8"], o["sw"], None, torch.bfloat16))
    got = w8a8_tma_triton(*dev, None, torch.bfloat16, config=cfg, residual=res.cuda()).cpu()
    assert torch.equal(got, w8a8_matmul(o["a8"], o["sa"], o["w8"], o["sw"], None, torch.bfloat16, res))
