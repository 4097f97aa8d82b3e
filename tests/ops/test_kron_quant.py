from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings

from flatquant.core.kron import head_mix, head_transform, kron_transform
from flatquant.core.norm import rms_norm
from flatquant.core.quant import fake_quant, quantize
from flatquant.core.spec import QuantSpec
from flatquant.ops import kron_quant, kron_quant_multi
from flatquant.ops import reference as ref
from flatquant.ops.kron_quant import kron_quant_multi_triton, kron_quant_triton

from ._util import KERNEL_DEVICES, activations, assert_codes_match

SPEC4 = QuantSpec(bits=4, sym=True)


def _core_transform(x: torch.Tensor, left, right, n1: int) -> torch.Tensor:
    """The op's transform from core: X·right in fp32 rounded to x.dtype (only if left follows), then leftᵀ·, fp32."""
    y = x.float()
    if right is not None:
        y = head_transform(y, right.float())
        if left is not None:
            y = y.to(x.dtype).float()
    if left is not None:
        y = head_mix(y, left.float())
    return y


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("with_left,with_right", [(True, True), (True, False), (False, True), (False, False)])
def test_opcheck(pack: bool, with_left: bool, with_right: bool) -> None:
    n1, n2 = 6, 10
    x = torch.randn(5, n1 * n2, dtype=torch.bfloat16)
    left = torch.randn(n1, n1, dtype=torch.bfloat16) if with_left else None
    right = torch.randn(n2, n2, dtype=torch.bfloat16) if with_right else None
    clip = torch.tensor([0.9, 0.8])
    torch.library.opcheck(kron_quant, (x, left, right, clip, n1, 4, pack))
    torch.library.opcheck(kron_quant, (x[:, ::1][1:], left, right, clip, n1, 4, pack))


@settings(settings.get_profile("ops"))
@given(case=activations())
def test_reference_equals_core(case: dict) -> None:
    """Codes are exactly core.quant.quantize of core's transform; dequantized values within one step of core's
    fake quant in x.dtype (which rounds the transform output to x.dtype, the op keeps fp32)."""
    x, left, right, clip, n1 = case["x"], case["left"], case["right"], case["clip"], case["n1"]
    codes, scale = kron_quant(x, left, right, clip, n1)
    y = _core_transform(x, left, right, n1)
    want, want_scale, _ = quantize(y, SPEC4, clip_lo=clip[0], clip_hi=clip[1])
    assert torch.equal(ref.unpack_int4_ref(codes), want)
    assert torch.equal(scale, want_scale.squeeze(-1))
    deq = ref.unpack_int4_ref(codes).float() * scale[:, None]
    if left is not None and right is not None:
        y_core = kron_transform(x, left, right)
    else:
        y_core = _core_transform(x, left, right, n1).to(x.dtype)
    fq = fake_quant(y_core, SPEC4, clip_lo=clip[0].to(x.dtype), clip_hi=clip[1].to(x.dtype)).float()
    # One step, plus core's 16-bit scale and output rounding (relative 2^-7 of the value for bf16).
    tol = scale[:, None] + fq.abs() * 2**-6 + 1e-6
    assert bool(((deq - fq).abs() <= tol).all())


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@settings(settings.get_profile("ops"))
@given(case=activations())
def test_triton_matches_reference(device: str, case: dict) -> None:
    x, left, right, clip, n1 = case["x"], case["left"], case["right"], case["clip"], case["n1"]
    def to(t):
        return None if t is None else t.to(device)

    for bits, pack in ((4, True), (8, False)):
        codes, scale = kron_quant_triton(x.to(device), to(left), to(right), clip.to(device), n1, bits, pack)
        want, want_scale = ref.kron_quant_ref(x, left, right, clip[0], clip[1], n1, bits, pack)
        assert torch.allclose(scale.cpu(), want_scale, rtol=1e-5, atol=0)
        y = ref.kron_transform_ref(x, left, right, n1)
        ratio = torch.clamp(y / want_scale[:, None], -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        unpack = ref.unpack_int4_ref if pack else (lambda c: c)
        assert_codes_match(unpack(codes.cpu()), unpack(want), ratio, left is not None and right is not None)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("heads,d", [(9, 8), (28, 4), (40, 2), (32, 4)])
def test_head_mix_any_head_count(device: str, heads: int, d: int) -> None:
    """o_proj head mixing (left = O, no right) with non-power-of-two head counts."""
    g = torch.Generator().manual_seed(heads)
    x = torch.randn(3, heads * d, generator=g).to(torch.bfloat16)
    o = torch.linalg.qr(torch.randn(heads, heads, generator=g))[0].to(torch.bfloat16)
    clip = torch.tensor([0.95, 0.9])
    codes, scale = kron_quant_triton(x.to(device), o.to(device), None, clip.to(device), heads)
    want, want_scale, _ = quantize(head_mix(x.float(), o.float()), SPEC4, clip_lo=clip[0], clip_hi=clip[1])
    ratio = torch.clamp(head_mix(x.float(), o.float()) / want_scale, -8, 7)
    assert_codes_match(ref.unpack_int4_ref(codes.cpu()), want, ratio)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k", [576, 1536, 3584, 4096, 11008, 14336])
def test_cuda_model_dims(k: int) -> None:
    """Full-size LLaMA/Qwen/SmolLM2 dims natively on the GPU."""
    from flatquant.core.kron import decompose_dim

    n1, n2 = decompose_dim(k)
    g = torch.Generator(device="cuda").manual_seed(k)
    x = torch.randn(64, k, device="cuda", generator=g).to(torch.bfloat16)
    x[1] = 0
    x[:, 3] *= 100
    left = torch.linalg.qr(torch.randn(n1, n1, device="cuda", generator=g))[0].to(torch.bfloat16)
    right = torch.linalg.qr(torch.randn(n2, n2, device="cuda", generator=g))[0].to(torch.bfloat16)
    clip = torch.tensor([0.9, 0.95], device="cuda")
    codes, scale = kron_quant(x, left, right, clip, n1)
    want, want_scale = ref.kron_quant_ref(x, left, right, clip[0], clip[1], n1)
    # the bf16 intermediate (documented) rounds at different ties for long GPU reductions: scales agree to 1e-3
    assert torch.allclose(scale, want_scale, rtol=1e-3, atol=0)
    ratio = torch.clamp(ref.kron_transform_ref(x, left, right, n1) / want_scale[:, None], -8, 7)
    assert_codes_match(ref.unpack_int4_ref(codes), ref.unpack_int4_ref(want), ratio, rounded_intermediate=True)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_grid_cap_gives_the_same_codes(device: str) -> None:
    """Programs that loop over several tokens (capped grid) give the codes of one program per token."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(101, 24 * 24, generator=g).to(torch.bfloat16)
    left = (torch.randn(24, 24, generator=g) / 5).to(torch.bfloat16)
    right = (torch.randn(24, 24, generator=g) / 5).to(torch.bfloat16)
    clip = torch.tensor([0.9, 0.95])
    args = [t.to(device) for t in (x, left, right, clip)]
    one_each = kron_quant_triton(*args, 24, programs=101)
    for programs in (1, 7):
        looped = kron_quant_triton(*args, 24, programs=programs)
        assert torch.equal(looped[0], one_each[0]) and torch.equal(looped[1], one_each[1]), programs
    with pytest.raises(ValueError, match="programs"):
        kron_quant_triton(*args, 24, programs=0)


def test_multi_opcheck() -> None:
    n1, n2 = 6, 10
    x = torch.randn(5, n1 * n2, dtype=torch.bfloat16)
    left, right = torch.randn(n1, n1, dtype=torch.bfloat16), torch.randn(n2, n2, dtype=torch.bfloat16)
    clips = torch.tensor([[0.9, 0.8], [1.0, 0.7], [0.6, 0.95]])
    torch.library.opcheck(kron_quant_multi, (x, left, right, clips, n1, 4, True))
    with pytest.raises(ValueError, match="clips"):
        kron_quant_multi(x, left, right, clips[0], n1)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_multi_equals_one_call_per_clip(device: str, groups: int) -> None:
    """One transform, G clip pairs: each slice is bit-identical to the single-clip op (reference and kernel)."""
    g = torch.Generator().manual_seed(groups)
    n1, n2 = 6, 10
    x = (torch.randn(7, n1 * n2, generator=g) * 3).to(torch.bfloat16)
    x[:, 5] *= 40
    left = torch.linalg.qr(torch.randn(n1, n1, generator=g))[0].to(torch.bfloat16)
    right = torch.linalg.qr(torch.randn(n2, n2, generator=g))[0].to(torch.bfloat16)
    clips = torch.rand(groups, 2, generator=g) * 0.5 + 0.5
    args = [t.to(device) for t in (x, left, right)]
    codes, scale = kron_quant_multi(*args, clips.to(device), n1)
    tri_codes, tri_scale = kron_quant_triton(*args, clips.to(device), n1)
    assert codes.shape == (groups, 7, n1 * n2 // 2) and scale.shape == (groups, 7)
    for i in range(groups):
        one_codes, one_scale = kron_quant(*args, clips[i].to(device), n1)
        assert torch.equal(codes[i], one_codes) and torch.equal(scale[i], one_scale)
        single = kron_quant_triton(*args, clips[i].to(device), n1)
        assert torch.equal(tri_codes[i], single[0]) and torch.equal(tri_scale[i], single[1])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@settings(settings.get_profile("ops"), max_examples=10)
@given(case=activations())
def test_multi_triton_matches_reference(device: str, case: dict) -> None:
    """Hypothesis: the kernel's G code sets against the reference's (±1 code only where the documented 16-bit
    intermediate rounds at a tie), scales to 1e-5."""
    x, left, right, clip, n1 = case["x"], case["left"], case["right"], case["clip"], case["n1"]
    clips = torch.stack([clip, clip.flip(0), torch.ones(2)])

    def to(t):
        return None if t is None else t.to(device)

    codes, scale = kron_quant_triton(x.to(device), to(left), to(right), clips.to(device), n1)
    want, want_scale = ref.kron_quant_multi_ref(x, left, right, clips, n1)
    assert torch.allclose(scale.cpu(), want_scale, rtol=1e-5, atol=0)
    y = ref.kron_transform_ref(x, left, right, n1)
    for g in range(3):
        ratio = torch.clamp(y / want_scale[g][:, None], -8, 7)
        assert_codes_match(ref.unpack_int4_ref(codes[g].cpu()), ref.unpack_int4_ref(want[g]), ratio,
                           left is not None and right is not None)


LAYOUT_CASES = [  # (tokens, n1, n2, left, right, clip pairs)
    (1, 6, 40, True, True, 1), (3, 9, 64, True, True, 3), (5, 24, 24, True, True, 2), (2, 12, 64, True, False, 1),
    (4, 32, 48, False, True, 2), (6, 5, 36, False, False, 1), (19, 12, 48, True, True, 2),
]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
@pytest.mark.parametrize("pack", [True, False])
def test_layouts_give_the_same_codes(device: str, case: tuple, pack: bool) -> None:
    """The chunked and split kernel layouts (column blocks narrower than the padded n2, so several blocks) give
    the codes and scales of the whole-token layout bit for bit under the interpreter (exact fp32 products), and
    the reference's codes within its tolerance on the GPU; the default layout too."""
    t, n1, n2, with_left, with_right, groups = case
    g = torch.Generator().manual_seed(t * 1000 + n2)
    x = (torch.randn(t, n1 * n2, generator=g) * 3).to(torch.bfloat16)
    x[:, 1] *= 50
    left = torch.linalg.qr(torch.randn(n1, n1, generator=g))[0].to(torch.bfloat16) if with_left else None
    right = torch.linalg.qr(torch.randn(n2, n2, generator=g))[0].to(torch.bfloat16) if with_right else None
    clip = (torch.rand(groups, 2, generator=g) * 0.5 + 0.5) if groups > 1 else torch.tensor([0.9, 0.95])

    def to(v):
        return None if v is None else v.to(device)

    args = (x.to(device), to(left), to(right), clip.to(device), n1, 4, pack)
    whole = kron_quant_triton(*args, variant="whole")
    want, want_scale = (ref.kron_quant_multi_ref if groups > 1 else ref.kron_quant_ref)(
        x, left, right, *((clip,) if groups > 1 else (clip[0], clip[1])), n1, 4, pack)
    assert torch.allclose(whole[1].cpu(), want_scale, rtol=1e-5, atol=0)
    for variant, cols in (("chunked", 16), ("split", 16), ("split", 32), ("two_pass", None), ("pipelined", None),
                          ("pipelined_fastq", None), ("multi_token", None), (None, None)):
        got = kron_quant_triton(*args, variant=variant, block_cols=cols)
        if device == "cpu":  # exact fp32 products: every layout gives the same bits
            assert torch.equal(got[0], whole[0]) and torch.equal(got[1], whole[1]), (variant, cols)
        else:  # tensor-core dots of other tile shapes may sum in another order: the reference's tolerance
            _assert_matches_reference(x, left, right, n1, clip, got, pack)


def _assert_matches_reference(x, left, right, n1: int, clip: torch.Tensor, got: tuple, pack: bool = True) -> None:
    """``got`` (codes, scales of one or G clip pairs) against the reference: scales to 1e-3, codes ±1 only near a
    rounding tie or where the documented 16-bit ``X·right`` intermediate rounds the other way."""
    x, clips = x.cpu(), clip.cpu().reshape(-1, 2)
    want, want_scale = ref.kron_quant_multi_ref(x, None if left is None else left.cpu(),
                                                None if right is None else right.cpu(), clips, n1, 4, pack)
    codes, scale = got[0].cpu().reshape(want.shape), got[1].cpu().reshape(want_scale.shape)
    assert torch.allclose(scale, want_scale, rtol=1e-3, atol=0)
    y = ref.kron_transform_ref(x, None if left is None else left.cpu(), None if right is None else right.cpu(), n1)
    unpack = ref.unpack_int4_ref if pack else (lambda c: c)
    for g in range(clips.shape[0]):
        ratio = torch.clamp(y / want_scale[g][:, None], -8, 7)
        assert_codes_match(unpack(codes[g]), unpack(want[g]), ratio, left is not None and right is not None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k,left_only", [(4096, False), (14336, False), (11008, False), (4096, True)])
@pytest.mark.parametrize("t", [1, 16, 300])
def test_cuda_layouts_model_dims(k: int, left_only: bool, t: int) -> None:
    """Full-size dims on the GPU: every layout and block width within the reference's tolerance (their tensor-core
    tiles differ, so their fp32 sums need not agree to the bit; bench/probe_kron.py reports which do)."""
    from flatquant.core.kron import decompose_dim

    n1, n2 = (32, k // 32) if left_only else decompose_dim(k)
    g = torch.Generator(device="cuda").manual_seed(k + t)
    x = torch.randn(t, k, device="cuda", generator=g).to(torch.bfloat16)
    left = torch.linalg.qr(torch.randn(n1, n1, device="cuda", generator=g))[0].to(torch.bfloat16)
    right = None if left_only else torch.linalg.qr(torch.randn(n2, n2, device="cuda", generator=g))[0].to(
        torch.bfloat16)
    clips = torch.tensor([[0.9, 0.95], [0.8, 1.0]], device="cuda")
    layouts = [("whole", None), ("chunked", 16), ("chunked", 32), ("chunked", 64), ("two_pass", None),
               ("pipelined", None), ("pipelined_fastq", None), (None, None)]
    layouts += [("split", 16), ("split", 32), ("split", 64)] if t <= 16 else []
    for variant, cols in layouts:
        got = kron_quant_triton(x, left, right, clips, n1, variant=variant, block_cols=cols)
        _assert_matches_reference(x, left, right, n1, clips, got)
    for tb, prefetch, stages, warps in MULTI_TOKEN_GPU_OPTIONS:
        got = kron_quant_triton(x, left, right, clips, n1, variant="multi_token", block_tokens=tb, prefetch=prefetch,
                                num_stages=stages, num_warps=warps, programs=7)
        _assert_matches_reference(x, left, right, n1, clips, got)
    # the two pipelined layouts share their tile math and differ only in how the codes are computed (division vs
    # reciprocal + FMA correction): bit for bit, also with few programs looping over the tokens (prefetch path)
    for programs in (None, 7):
        exact = kron_quant_triton(x, left, right, clips, n1, variant="pipelined", programs=programs)
        fast = kron_quant_triton(x, left, right, clips, n1, variant="pipelined_fastq", programs=programs)
        assert torch.equal(fast[0], exact[0]) and torch.equal(fast[1], exact[1]), programs


MULTI_TOKEN_GPU_OPTIONS = [  # (block_tokens, prefetch, num_stages, num_warps): what bench/probe_kron.py sweeps
    (1, False, 3, 8), (2, True, 1, 8), (2, False, 2, 8), (4, True, 1, 8), (2, True, 1, 4),
]
MULTI_TOKEN_CASES = [  # (tokens, n1, n2, block_tokens, prefetch, clip pairs, programs): n1 = 11 / 14 are
    # LLaMA's 86 / 112 scaled down (padded to 16 rows), token counts not multiples of the block, looping grids
    (5, 11, 16, 2, True, 1, None), (7, 14, 16, 4, True, 2, 1), (9, 11, 10, 2, False, 3, 2), (3, 6, 40, 4, False, 1, 3),
    (6, 14, 24, 1, True, 2, 2), (4, 16, 16, 2, True, 1, 1),
]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("case", MULTI_TOKEN_CASES, ids=str)
@pytest.mark.parametrize("pack", [True, False])
def test_multi_token_equals_whole(device: str, case: tuple, pack: bool) -> None:
    """The multi_token layout (blocks of block_tokens tokens: one right product over the stacked rows, one left
    product over the side-by-side tiles, per-token ranges) gives whole's codes and scales bit for bit under the
    interpreter, for any block size, prefetch mode, clip pair count and grid (tokens past the end of the last
    block are neither read nor written); on the GPU the reference's within its tolerance, and the same bits as
    pipelined_fastq at one token per block."""
    t, n1, n2, tb, prefetch, groups, programs = case
    g = torch.Generator().manual_seed(t * 100 + n1)
    x = (torch.randn(t, n1 * n2, generator=g) * 3).to(torch.bfloat16)
    x[:, 2] *= 40
    x[t // 2] = 0  # an all-zero token (scale 1) inside a block
    left = torch.linalg.qr(torch.randn(n1, n1, generator=g))[0].to(torch.bfloat16)
    right = torch.linalg.qr(torch.randn(n2, n2, generator=g))[0].to(torch.bfloat16)
    clip = (torch.rand(groups, 2, generator=g) * 0.5 + 0.5) if groups > 1 else torch.tensor([0.9, 0.95])
    args = (x.to(device), left.to(device), right.to(device), clip.to(device), n1, 4, pack)
    whole = kron_quant_triton(*args, variant="whole")
    got = kron_quant_triton(*args, variant="multi_token", block_tokens=tb, prefetch=prefetch, programs=programs)
    if device == "cpu":
        assert torch.equal(got[0], whole[0]) and torch.equal(got[1], whole[1])
    else:
        _assert_matches_reference(x, left, right, n1, clip, got, pack)
        if tb == 1:
            fast = kron_quant_triton(*args, variant="pipelined_fastq", programs=programs, num_warps=8)
            assert torch.equal(got[0], fast[0]) and torch.equal(got[1], fast[1])


ROW_SPLIT_CASES = [  # (tokens, n1, n2, clip pairs, SwiGLU input, programs): n1 = 43 / 40 / 48 pad to 64 and split
    # 32 + 16 (LLaMA's 86 of 128 scaled down), 100 and 112 split 64 + 32 + 16 of 128, 70 and 86 split 64 + 32;
    # odd token counts, looping grids
    (5, 43, 16, 1, False, None), (7, 40, 24, 2, True, 2), (9, 48, 10, 3, False, 4), (3, 100, 16, 2, True, 1),
    (4, 70, 10, 1, True, 3), (3, 86, 128, 2, False, None), (2, 112, 128, 1, True, 1),
]


def _assert_within_one_code(got: tuple, base: tuple, pack: bool) -> None:
    """Every code of ``got`` within one of ``base``'s and the scales within 1e-3 (layouts whose tensor-core tiles
    differ, so that their fp32 sums need not agree to the bit)."""
    unpack = ref.unpack_int4_ref if pack else (lambda c: c)
    width = base[0].shape[-1]
    diff = (unpack(got[0].cpu().reshape(-1, width)).int() - unpack(base[0].cpu().reshape(-1, width)).int()).abs()
    assert int(diff.max()) <= 1
    torch.testing.assert_close(got[1].cpu(), base[1].cpu(), rtol=1e-3, atol=0)


def _layout_case(t: int, n1: int, n2: int, groups: int, glu: bool, pack: bool, device: str) -> tuple:
    """Inputs of the row-split layout's equality tests: ``t`` bf16 tokens of ``n1 * n2`` (with ``glu`` also ``up``)
    with an outlier channel (in up: silu of a huge gate overflows exp) and an all-zero token (scale 1), orthogonal
    factors and ``groups`` clip pairs; returns ``(x, left, right, clip, up, args)``, ``args`` on ``device`` in
    :func:`kron_quant_triton`'s order (4 bits, ``pack``)."""
    g = torch.Generator().manual_seed(t * 100 + n1)
    x = (torch.randn(t, n1 * n2, generator=g) * 3).to(torch.bfloat16)
    up = (torch.randn(t, n1 * n2, generator=g) * 2).to(torch.bfloat16) if glu else None
    (x if up is None else up)[:, 2] *= 40
    x[t // 2] = 0
    left = torch.linalg.qr(torch.randn(n1, n1, generator=g))[0].to(torch.bfloat16)
    right = torch.linalg.qr(torch.randn(n2, n2, generator=g))[0].to(torch.bfloat16)
    clip = (torch.rand(groups, 2, generator=g) * 0.5 + 0.5) if groups > 1 else torch.tensor([0.9, 0.95])
    args = (x.to(device), left.to(device), right.to(device), clip.to(device), n1, 4, pack,
            None if up is None else up.to(device))
    return x, left, right, clip, up, args


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("case", ROW_SPLIT_CASES, ids=str)
@pytest.mark.parametrize("pack", [True, False])
def test_multi_token_split_equals_whole(device: str, case: tuple, pack: bool) -> None:
    """The multi_token_split layout (the token's rows in blocks of n1p/2, n1p/4 [, n1p/8], transposed products
    with the left product's reduction over the whole padded n1) gives whole's codes and scales bit for bit under
    the interpreter, with and without the SwiGLU input, for 1-3 clip pairs and looping grids; on the GPU the
    reference's within its tolerance."""
    from flatquant.ops._launch import next_pow2
    from flatquant.ops.kron_quant import row_split_blocks

    t, n1, n2, groups, glu, programs = case
    assert row_split_blocks(n1, next_pow2(n1)) in (2, 3)
    x, left, right, clip, up, args = _layout_case(t, n1, n2, groups, glu, pack, device)
    whole = kron_quant_triton(*args, variant="whole")
    got = kron_quant_triton(*args, variant="multi_token_split", programs=programs)
    if device == "cpu":
        assert torch.equal(got[0], whole[0]) and torch.equal(got[1], whole[1])
    elif up is None:
        _assert_matches_reference(x, left, right, n1, clip, got, pack)
    else:  # tensor-core tiles of other shapes: within one code of whole's
        _assert_within_one_code(got, whole, pack)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("n1,n2", [(43, 16), (100, 12)])
def test_row_split_dtypes(device: str, dtype: torch.dtype, n1: int, n2: int) -> None:
    """multi_token_split with fp16 and fp32 inputs, at two and three row blocks: whole's codes and scales bit for
    bit under the interpreter, the reference's within its tolerance on the GPU."""
    g = torch.Generator().manual_seed(n1 + n2)
    x = (torch.randn(5, n1 * n2, generator=g) * 3).to(dtype)
    left = torch.linalg.qr(torch.randn(n1, n1, generator=g))[0].to(dtype)
    right = torch.linalg.qr(torch.randn(n2, n2, generator=g))[0].to(dtype)
    clips = torch.tensor([[0.9, 0.95], [0.7, 1.0]])
    args = (x.to(device), left.to(device), right.to(device), clips.to(device), n1)
    whole = kron_quant_triton(*args, variant="whole")
    got = kron_quant_triton(*args, variant="multi_token_split", programs=2)
    if device == "cpu":
        assert torch.equal(got[0], whole[0]) and torch.equal(got[1], whole[1])
    else:
        _assert_matches_reference(x, left, right, n1, clips, got)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("n1", [43, 100])
def test_row_split_norm_input(device: str, n1: int) -> None:
    """``norm`` given (multi_token_split only when asked for: the default takes multi_token then): its in-kernel
    RMSNorm, whose mean of squares is summed per row block, gives the codes of whole's in-kernel norm up to a
    last-bit difference of the mean (codes ±1 at most at a few elements), scales to 1e-2."""
    g = torch.Generator().manual_seed(n1)
    n2, t, eps = 16, 5, 1e-5
    x = (torch.randn(t, n1 * n2, generator=g) * 4).to(torch.bfloat16)
    x[1, :7] *= 30
    w = (torch.rand(n1 * n2, generator=g) + 0.5).to(torch.bfloat16)
    left = torch.linalg.qr(torch.randn(n1, n1, generator=g))[0].to(torch.bfloat16)
    right = torch.linalg.qr(torch.randn(n2, n2, generator=g))[0].to(torch.bfloat16)
    clips = torch.tensor([[0.9, 0.95], [1.0, 0.8]])
    args = [v.to(device) for v in (x, left, right, clips)]
    whole = kron_quant_multi_triton(*args, n1, 4, True, w.to(device), eps, variant="whole")
    got = kron_quant_multi_triton(*args, n1, 4, True, w.to(device), eps, variant="multi_token_split", programs=2)
    diff = (ref.unpack_int4_ref(got[0].cpu()).int() - ref.unpack_int4_ref(whole[0].cpu()).int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= 2, int((diff > 0).sum())
    torch.testing.assert_close(got[1].cpu(), whole[1].cpu(), rtol=1e-2, atol=0)


def test_multi_token_split_blocks_and_fallback() -> None:
    """Row blocks per padded side (86 -> 64 + 32, 112 -> 64 + 32 + 16 of 128; none when n1 fills its tile or the
    blocks would be under 16 rows); without a saving the layout runs multi_token (same codes)."""
    from flatquant.ops.kron_quant import default_variant, row_split_blocks

    assert row_split_blocks(86, 128) == row_split_blocks(96, 128) == row_split_blocks(43, 64) == 2
    assert row_split_blocks(112, 128) == row_split_blocks(97, 128) == 3
    assert row_split_blocks(113, 128) == row_split_blocks(128, 128) == row_split_blocks(56, 64) == 0
    assert row_split_blocks(20, 32) == row_split_blocks(12, 16) == 0
    assert default_variant(2048, 86, 128) == default_variant(128, 96, 128) == "multi_token_split"  # 2 blocks
    assert default_variant(2048, 112, 128) == default_variant(2048, 86, 128, norm=True) == "multi_token"
    g = torch.Generator().manual_seed(1)
    n1, n2 = 30, 16  # 30 of 32 rows: nothing to split
    x = torch.randn(4, n1 * n2, generator=g).to(torch.bfloat16)
    left = torch.linalg.qr(torch.randn(n1, n1, generator=g))[0].to(torch.bfloat16)
    right = torch.linalg.qr(torch.randn(n2, n2, generator=g))[0].to(torch.bfloat16)
    clip = torch.tensor([0.9, 0.95])
    got = kron_quant_triton(x, left, right, clip, n1, variant="multi_token_split")
    want = kron_quant_triton(x, left, right, clip, n1, variant="multi_token")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="multi_token layout only"):
        kron_quant_triton(x, left, right, clip, n1, variant="multi_token_split", block_tokens=2)
    with pytest.raises(ValueError, match="multi_token layout only"):
        kron_quant_triton(x, left, right, clip, n1, variant="multi_token_split", prefetch=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k", [11008, 14336])
@pytest.mark.parametrize("glu", [False, True])
def test_cuda_row_split_model_dims(k: int, glu: bool) -> None:
    """multi_token_split at LLaMA's 86 x 128 and 112 x 128 on the GPU (64 + 32 and 64 + 32 + 16 rows), default
    launch and a looping grid of 7 programs: the reference's codes within its tolerance (without the SwiGLU input),
    and every code within one of multi_token's, scales to 1e-3 (their tensor-core tiles differ, so the fp32 sums
    need not agree to the bit; bench/probe_kron.py compares the codes with whole's at 2048 and 32768 tokens)."""
    from flatquant.core.kron import decompose_dim

    n1, n2 = decompose_dim(k)
    g = torch.Generator(device="cuda").manual_seed(k)
    x = torch.randn(301, k, device="cuda", generator=g).to(torch.bfloat16)
    x[7] = 0
    x[:, 3] *= 100
    up = torch.randn(301, k, device="cuda", generator=g).to(torch.bfloat16) if glu else None
    left = torch.linalg.qr(torch.randn(n1, n1, device="cuda", generator=g))[0].to(torch.bfloat16)
    right = torch.linalg.qr(torch.randn(n2, n2, device="cuda", generator=g))[0].to(torch.bfloat16)
    clips = torch.tensor([[0.9, 0.95], [0.8, 1.0]], device="cuda")
    base = kron_quant_triton(x, left, right, clips, n1, up=up, variant="multi_token")
    for programs in (None, 7):
        got = kron_quant_triton(x, left, right, clips, n1, up=up, variant="multi_token_split", programs=programs)
        if up is None:
            _assert_matches_reference(x, left, right, n1, clips, got)
        _assert_within_one_code(got, base, True)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_multi_token_division_fallback_per_block(device: str) -> None:
    """A block whose tokens' scales are not all in the division-free range (here a token of magnitude ~1e-35, scale
    below 2^-100, next to ordinary ones) computes all its codes by division: the same codes and scales as whole's
    (which decides per token) and the reference's. fp32 input with identity factors, so Y = X exactly."""
    n1, n2, t = 4, 16, 6
    g = torch.Generator().manual_seed(13)
    x = torch.randn(t, n1 * n2, generator=g)
    x[1] *= 1e-35
    x[4] *= 1e-36
    eye1, eye2 = torch.eye(n1), torch.eye(n2)
    clip = torch.tensor([0.9, 0.95])
    args = (x.to(device), eye1.to(device), eye2.to(device), clip.to(device), n1, 4, False)
    whole = kron_quant_triton(*args, variant="whole")
    want, want_scale = ref.kron_quant_ref(x, eye1, eye2, clip[0], clip[1], n1, 4, False)
    assert torch.equal(whole[0].cpu(), want) and torch.equal(whole[1].cpu(), want_scale)
    for tb in (2, 4):
        got = kron_quant_triton(*args, variant="multi_token", block_tokens=tb, programs=1)
        assert torch.equal(got[0].cpu(), want) and torch.equal(got[1].cpu(), want_scale), tb


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("variant", ["multi_token", "multi_token_split"])
def test_prefill_layouts_saturate_like_the_clamp(device: str, variant: str) -> None:
    """Packed 4-bit codes far past the clipped range: the prefill layouts (on CUDA the clamp is the int4 pack's
    saturation, after rounding) give whole's and the reference's codes, with an ordinary clip pair and one of 1e-7
    whose quotients reach ~1e8 (past the division-free range: the codes come from the division). Bit for bit
    under the interpreter; on the GPU within the reference's tolerance (whole's tensor-core tiles differ)."""
    n1, n2, t = 43, 16, 5  # 43 of 64 rows: two row blocks for multi_token_split
    g = torch.Generator().manual_seed(17)
    x = (torch.randn(t, n1 * n2, generator=g) * 3).to(torch.bfloat16)
    x[:, 5] *= 50
    left = torch.linalg.qr(torch.randn(n1, n1, generator=g))[0].to(torch.bfloat16)
    right = torch.linalg.qr(torch.randn(n2, n2, generator=g))[0].to(torch.bfloat16)
    clips = torch.tensor([[0.6, 0.5], [1e-7, 1e-7]])
    args = [v.to(device) for v in (x, left, right, clips)]
    got = kron_quant_multi_triton(*args, n1, 4, True, variant=variant, programs=2)
    if device == "cpu":
        whole = kron_quant_multi_triton(*args, n1, 4, True, variant="whole")
        assert torch.equal(got[0], whole[0]) and torch.equal(got[1], whole[1])
    codes = ref.unpack_int4_ref(got[0][1].cpu())
    assert int((codes.abs() >= 7).sum()) > codes.numel() // 2  # the tiny clip saturates most codes
    _assert_matches_reference(x, left, right, n1, clips, got)


def test_multi_token_options() -> None:
    """block_tokens must be a power of two; without both factors the layout falls back to whole."""
    x = torch.randn(3, 6 * 10, dtype=torch.bfloat16)
    right = torch.linalg.qr(torch.randn(10, 10))[0].to(torch.bfloat16)
    with pytest.raises(ValueError, match="block_tokens"):
        kron_quant_triton(x, None, right, torch.ones(2), 6, variant="multi_token", block_tokens=3)
    got = kron_quant_triton(x, None, right, torch.tensor([0.9, 0.95]), 6, variant="multi_token")
    whole = kron_quant_triton(x, None, right, torch.tensor([0.9, 0.95]), 6, variant="whole")
    assert torch.equal(got[0], whole[0]) and torch.equal(got[1], whole[1])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("clip_pair", [(1.0, 1.0), (0.9, 0.95)])
def test_fast_codes_at_rounding_ties(device: str, clip_pair: tuple[float, float]) -> None:
    """The pipelined layouts' division-free codes (reciprocal + FMA correction, ``pipelined_fastq``) equal the
    division's at exact rounding ties and one bf16 step either side of them: identity factors make Y = X, and a
    token range of 3.5 with unclipped LAC makes the scale exactly 0.5, so x = (k + 0.5) · 0.5 are ties."""
    n1, n2 = 4, 16
    eye1, eye2 = torch.eye(n1, dtype=torch.bfloat16), torch.eye(n2, dtype=torch.bfloat16)
    ties = (torch.arange(-7, 7, dtype=torch.float32) + 0.5) * 0.5  # |tie| <= 3.25: the range stays 3.5
    vals = torch.cat([ties, torch.nextafter(ties.bfloat16(), torch.tensor(9.0, dtype=torch.bfloat16)).float(),
                      torch.nextafter(ties.bfloat16(), torch.tensor(-9.0, dtype=torch.bfloat16)).float()])
    g = torch.Generator().manual_seed(3)
    x = vals[torch.randint(vals.numel(), (5, n1 * n2), generator=g)]
    x[:, 0], x[:, 1] = 3.5, -3.0  # the range: scale = max(3.5 · hi, 3.0 · lo) / 7
    x[4] = torch.randn(n1 * n2, generator=g) * 1e-3  # an ordinary token
    x = x.to(torch.bfloat16)
    clip = torch.tensor(clip_pair)
    args = (x.to(device), eye1.to(device), eye2.to(device), clip.to(device), n1, 4, False)
    whole = kron_quant_triton(*args, variant="whole")
    want, want_scale = ref.kron_quant_ref(x, eye1, eye2, clip[0], clip[1], n1, 4, False)
    assert torch.equal(whole[0].cpu(), want) and torch.equal(whole[1].cpu(), want_scale)
    for variant in ("pipelined", "pipelined_fastq", "multi_token"):
        got = kron_quant_triton(*args, variant=variant)
        assert torch.equal(got[0].cpu(), want) and torch.equal(got[1].cpu(), want_scale), variant


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_fast_codes_near_ties_at_any_scale(device: str) -> None:
    """The division-free codes at values within two ulps of a rounding tie ``s · (k + ½)`` for scales that are not
    powers of two (where ``y · RN(1/s)`` alone rounds to the wrong side in about one case in ten): fp32 inputs
    and identity factors, so ``Y = X`` exactly and the kernel's scale is ``RN(amax / 7)``; the pipelined layout's
    fast codes equal its division's and the reference's bit for bit. A clip factor near 0 (quotients past the fp32
    range) gives the division's clamped codes too."""
    n1, n2, t = 4, 16, 24
    g = torch.Generator().manual_seed(11)
    amax = 7.0 * (1.0 + torch.rand(t, generator=g)) * 2.0 ** torch.randint(-6, 6, (t,), generator=g).float()
    s = amax / 7.0  # fp32: RN(amax / 7), the kernel's scale with an unclipped range
    k = torch.randint(-8, 7, (t, n1 * n2), generator=g).float() + 0.5
    y = s[:, None] * k
    for _ in range(2):  # move up to two ulps either way
        step = torch.randint(-1, 2, y.shape, generator=g)
        y = torch.where(step > 0, torch.nextafter(y, torch.tensor(float("inf"))),
                        torch.where(step < 0, torch.nextafter(y, torch.tensor(float("-inf"))), y))
    y = y.clamp(-amax[:, None], amax[:, None])
    y[:, 0] = amax
    eye1, eye2 = torch.eye(n1), torch.eye(n2)
    # (the second case: huge tokens with a clip factor near 0, so that the scale stays in the fast path's range
    # while most quotients overflow fp32)
    for x, clip in ((y, torch.tensor([1.0, 1.0])), (y * 1e32, torch.tensor([1e-39, 1e-39]))):
        args = (x.to(device), eye1.to(device), eye2.to(device), clip.to(device), n1, 4, False)
        with warnings.catch_warnings():  # the interpreter's numpy warns of the overflowing quotients (intended)
            warnings.simplefilter("ignore", RuntimeWarning)
            exact = kron_quant_triton(*args, variant="pipelined")
            fast = kron_quant_triton(*args, variant="pipelined_fastq")
            block = kron_quant_triton(*args, variant="multi_token", block_tokens=4)
        assert torch.equal(fast[0].cpu(), exact[0].cpu()) and torch.equal(fast[1].cpu(), exact[1].cpu())
        assert torch.equal(block[0].cpu(), exact[0].cpu()) and torch.equal(block[1].cpu(), exact[1].cpu())
        want, want_scale = ref.kron_quant_ref(x, eye1, eye2, clip[0], clip[1], n1, 4, False)
        assert torch.equal(fast[0].cpu(), want) and torch.equal(fast[1].cpu(), want_scale)


def test_layout_choice_and_validation() -> None:
    from flatquant.ops.kron_quant import default_variant

    assert default_variant(1, 112, 128) == "split"  # decode, down_proj of LLaMA-3-8B
    assert default_variant(128, 64, 64) == default_variant(4096, 64, 127) == "pipelined_fastq"  # prefill, small
    assert default_variant(2048, 112, 128) == default_variant(128, 120, 128) == "multi_token"  # prefill, 128 x 128
    assert default_variant(128, 86, 128) == "multi_token_split"  # 86 of 128 rows: blocks of 64 + 32
    assert default_variant(2048, 224, 128) == default_variant(2048, 128, 256) == "pipelined_fastq"  # larger tiles
    assert default_variant(64, 112, 128) == default_variant(127, 64, 64) == "whole"
    assert default_variant(1, 6, 10) == "whole"
    x = torch.randn(2, 6 * 10, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="variant"):
        kron_quant_triton(x, None, None, torch.ones(2), 6, variant="tiled")
    with pytest.raises(ValueError, match="block_cols"):
        kron_quant_triton(x, None, None, torch.ones(2), 6, block_cols=24)
    with pytest.raises(ValueError, match="multi_token layout only"):
        kron_quant_triton(x, None, None, torch.ones(2), 6, variant="whole", block_tokens=2)
    with pytest.raises(ValueError, match="num_stages"):
        kron_quant_triton(x, None, None, torch.ones(2), 6, num_stages=0)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("variant", ["whole", "chunked", "split", "two_pass", "pipelined_fastq", "multi_token"])
@pytest.mark.parametrize("with_left,with_right", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_glu_input(device: str, variant: str, with_left: bool, with_right: bool, dtype: torch.dtype) -> None:
    """``up`` given: the op transforms silu(x) * up as eager PyTorch computes it in x's dtype; the kernel equals the
    op's reference (scales to 1e-5, codes ±1 only at a rounding tie or where the fp32 exp of silu differs in the
    last bit of x's dtype) and equals the plain op fed the product."""
    g = torch.Generator().manual_seed(7)
    n1, n2, t = 6, 40, 3
    gate = (torch.randn(t, n1 * n2, generator=g) * 3).to(dtype)
    up = (torch.randn(t, n1 * n2, generator=g) * 2).to(dtype)
    left = torch.linalg.qr(torch.randn(n1, n1, generator=g))[0].to(dtype) if with_left else None
    right = torch.linalg.qr(torch.randn(n2, n2, generator=g))[0].to(dtype) if with_right else None
    clip = torch.tensor([0.9, 0.95])

    def to(v):
        return None if v is None else v.to(device)

    prod = torch.nn.functional.silu(gate) * up
    want, want_scale = ref.kron_quant_ref(prod, left, right, clip[0], clip[1], n1)
    assert torch.equal(kron_quant(gate, left, right, clip, n1, 4, True, up)[0], want)  # the op's reference path
    got = kron_quant_triton(gate.to(device), to(left), to(right), clip.to(device), n1, 4, True, up.to(device),
                            variant=variant, block_cols=16)
    plain = kron_quant_triton(prod.to(device), to(left), to(right), clip.to(device), n1, 4, True, variant=variant,
                              block_cols=16)
    diff = (ref.unpack_int4_ref(got[0].cpu()).int() - ref.unpack_int4_ref(plain[0].cpu()).int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= 2, int((diff > 0).sum())
    assert torch.allclose(got[1].cpu(), want_scale, rtol=1e-2, atol=0)
    with pytest.raises(ValueError, match="up must match"):
        kron_quant_triton(gate, left, right, clip, n1, 4, True, up[:, :-2])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k", [11008, 14336])
def test_cuda_glu_matches_torch(k: int) -> None:
    """On CUDA the in-kernel silu uses the hardware approximations inline (``ex2.approx.ftz``, ``rcp.approx.ftz``):
    at LLaMA's down_proj sizes, with gates far into both tails, the default prefill layout fed gate and up gives
    the codes and scales of the same layout fed torch's ``silu(gate) * up`` (the H200 probe found no code differing
    in 8.8e8; a bf16 rounding boundary could flip one, hence the bound), and so does the decode layout."""
    from flatquant.core.kron import decompose_dim

    n1, n2 = decompose_dim(k)
    g = torch.Generator(device="cuda").manual_seed(k)
    gate = (torch.randn(300, k, device="cuda", generator=g) * 4).to(torch.bfloat16)
    gate[0, :64] = torch.linspace(-120, 120, 64, device="cuda").to(torch.bfloat16)  # exp(-g) past fp32 both ways
    up = (torch.randn(300, k, device="cuda", generator=g) * 2).to(torch.bfloat16)
    left = torch.linalg.qr(torch.randn(n1, n1, device="cuda", generator=g))[0].to(torch.bfloat16)
    right = torch.linalg.qr(torch.randn(n2, n2, device="cuda", generator=g))[0].to(torch.bfloat16)
    clip = torch.tensor([0.9, 0.95], device="cuda")
    prod = torch.nn.functional.silu(gate) * up
    for rows in (300, 1):
        got = kron_quant_triton(gate[:rows], left, right, clip, n1, up=up[:rows])
        want = kron_quant_triton(prod[:rows], left, right, clip, n1)
        diff = (ref.unpack_int4_ref(got[0].cpu()).int() - ref.unpack_int4_ref(want[0].cpu()).int()).abs()
        assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= diff.numel() // 100_000, int((diff > 0).sum())
        torch.testing.assert_close(got[1], want[1], rtol=1e-2, atol=0)


def test_glu_opcheck() -> None:
    x, up = torch.randn(4, 24, dtype=torch.bfloat16), torch.randn(4, 24, dtype=torch.bfloat16)
    torch.library.opcheck(kron_quant, (x, None, torch.randn(6, 6, dtype=torch.bfloat16), torch.ones(2), 4, 4, True,
                                       up))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("variant", ["whole", "chunked", "split", "two_pass", "pipelined_fastq", "multi_token"])
@pytest.mark.parametrize("with_left", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_norm_input(device: str, variant: str, with_left: bool, dtype: torch.dtype) -> None:
    """``norm`` given: the op transforms ``rms_norm(x, norm, eps)``. Its reference is exactly the plain op on the
    normalised input; the kernels (in-kernel norm for whole / chunked, a separate norm otherwise) equal the plain
    kernel fed the normalised input, codes ±1 at most at a few last-bit differences of the mean (summation order)."""
    g = torch.Generator().manual_seed(11)
    n1, n2, t, eps = 6, 40, 3, 1e-5
    x = (torch.randn(t, n1 * n2, generator=g) * 4).to(dtype)
    x[1, :7] *= 30  # outlier channels
    w = (torch.rand(n1 * n2, generator=g) + 0.5).to(dtype)
    left = torch.linalg.qr(torch.randn(n1, n1, generator=g))[0].to(dtype) if with_left else None
    right = torch.linalg.qr(torch.randn(n2, n2, generator=g))[0].to(dtype)
    clips = torch.tensor([[0.9, 0.95], [1.0, 0.8]])
    normed = rms_norm(x, w, eps)
    want = kron_quant_multi(x, left, right, clips, n1, 4, True, w, eps)
    plain_ref = kron_quant_multi(normed, left, right, clips, n1, 4, True)
    assert torch.equal(want[0], plain_ref[0]) and torch.equal(want[1], plain_ref[1])

    def to(v):
        return None if v is None else v.to(device)

    got = kron_quant_multi_triton(x.to(device), to(left), to(right), clips.to(device), n1, 4, True, w.to(device),
                                  eps, variant=variant, block_cols=16)
    plain = kron_quant_multi_triton(normed.to(device), to(left), to(right), clips.to(device), n1, 4, True,
                                    variant=variant, block_cols=16)
    diff = (ref.unpack_int4_ref(got[0].cpu()).int() - ref.unpack_int4_ref(plain[0].cpu()).int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= 2, int((diff > 0).sum())
    torch.testing.assert_close(got[1].cpu(), plain[1].cpu(), rtol=1e-2, atol=0)
    with pytest.raises(ValueError, match="norm must be"):
        kron_quant_multi_triton(x, left, right, clips, n1, 4, True, w[:-2], eps)


def test_norm_opcheck() -> None:
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    torch.library.opcheck(kron_quant_multi, (x, None, torch.randn(6, 6, dtype=torch.bfloat16), torch.ones(2, 2), 4,
                                             4, True, torch.rand(24, dtype=torch.bfloat16) + 0.5, 1e-6))
