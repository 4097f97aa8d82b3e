from __future__ import annotations

import pytest
import torch

from flatquant.ops import reference as ref
from flatquant.ops import w4a4_gemv, w4a4_matmul, w4a8_matmul, w8a8_matmul
from flatquant.ops.gemv import counter_slots, default_split_k, qgemv_triton, split_plan
from flatquant.ops.matmul import MODE_W4A4, MODE_W4A8, MODE_W8A8, qmatmul_triton

from ._util import KERNEL_DEVICES

OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
MODES = [MODE_W4A4, MODE_W4A8, MODE_W8A8]
MODE_IDS = ["w4a4", "w4a8", "w8a8"]
# (K, N, block_n, block_k) per mode, small for the interpreter: K tails (K % block_k != 0), N edges
# (N % block_n != 0), W4A8 weights padded to the 128-tile halves layout (K = 328) or not (K = 384, also with two
# halves tiles per step), and enough K-tiles that split_k = 3 gives 3 splits.
SHAPES = {
    MODE_W4A4: [(328, 40, 32, 64), (192, 16, 16, 64), (200, 24, 16, 64)],
    MODE_W4A8: [(384, 40, 32, 128), (328, 24, 16, 128), (640, 48, 32, 256)],
    MODE_W8A8: [(200, 40, 32, 32), (96, 16, 16, 32)],
}
_OPS = {MODE_W4A4: w4a4_matmul, MODE_W4A8: w4a8_matmul, MODE_W8A8: w8a8_matmul}


def _codes(rows: int, k: int, bits: int, g: torch.Generator, extreme: bool) -> torch.Tensor:  # (rows, k) int8
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if not extreme:
        return torch.randint(lo, hi + 1, (rows, k), generator=g, dtype=torch.int8)
    # rows of all-min, all-max, then random min/max patterns: the largest |dot products| and both signs
    c = torch.where(torch.rand(rows, k, generator=g) < 0.5, lo, hi).to(torch.int8)
    c[0] = lo
    if rows > 1:
        c[1] = hi
    return c


def _operands(mode: int, m: int, n: int, k: int, seed: int, bias: bool, dtype: torch.dtype,
              extreme: bool = False) -> tuple:
    """Kernel operands ``(a, a_scale, w, w_scale, bias)`` in ``mode``'s layout (CPU tensors)."""
    g = torch.Generator().manual_seed(seed)
    a_bits = 4 if mode == MODE_W4A4 else 8
    w_bits = 8 if mode == MODE_W8A8 else 4
    a = _codes(m, k, a_bits, g, extreme)
    w = _codes(n, k, w_bits, g, extreme)
    if mode == MODE_W4A4:
        a, w = ref.pack_int4_ref(a), ref.pack_int4_ref(w)
    elif mode == MODE_W4A8:
        w = ref.halves_layout_ref(ref.pack_int4_ref(w))
    sa = torch.rand(m, generator=g) * 0.1 + 1e-3
    sw = torch.rand(n, generator=g) * 0.1 + 1e-3
    b = (torch.randn(n, generator=g) * 4).to(dtype) if bias else None
    return a, sa, w, sw, b


def _check(device: str, mode: int, m: int, n: int, k: int, seed: int, bias: bool, dtype: torch.dtype,
           extreme: bool = False, **kw: object) -> None:
    ops = _operands(mode, m, n, k, seed, bias, dtype, extreme)
    want = _OPS[mode](*ops, dtype)  # CPU tensors: the op's reference kernel (ref.int_matmul_ref)
    got = qgemv_triton(*(t if t is None else t.to(device) for t in ops), k, mode, dtype, **kw)
    assert got.dtype == dtype and got.shape == (m, n)
    assert torch.equal(got.cpu(), want), f"mode {mode} M={m} K={k} N={n} {dtype} bias={bias} {kw}"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_matches_reference(device: str, mode: int, m: int, split_k: int) -> None:
    """Bit-equal to the reference for every mode, token count and split; out dtype and bias rotate over the
    cases so that each combination is covered."""
    idx = 9 * MODES.index(mode) + 3 * [1, 3, 16].index(m) + split_k
    for j, (k, n, bn, bk) in enumerate(SHAPES[mode]):
        if j == 0:  # the first shape of each mode really runs split_k programs per output tile
            assert split_plan(k, bk, split_k)[1] == split_k
        case = idx + j
        _check(device, mode, m, n, k, seed=case, bias=case % 2 == 0, dtype=OUT_DTYPES[case % 3],
               split_k=split_k, block_n=bn, block_k=bk)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_extreme_codes(device: str, mode: int) -> None:
    """-8/7 (int4) and -128/127 (int8) codes; W8A8 at K = 1152 reaches |acc| = 128² K > 2^24 (int32 -> fp32
    conversion rounds, identically in kernel and reference)."""
    k = 1152 if mode == MODE_W8A8 else 384
    for m, dtype, bias in [(16, torch.float32, False), (2, torch.bfloat16, True)]:
        _check(device, mode, m, 24, k, seed=m, bias=bias, dtype=dtype, extreme=True, split_k=3, block_n=16,
               block_k=128)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_defaults_match_tiled_kernel(device: str, mode: int) -> None:
    """Default blocks and split: bit-equal to the tiled kernel of matmul.py and to the reference."""
    m, n, k = 5, 40, 512
    ops = _operands(mode, m, n, k, 7, False, torch.bfloat16)
    ops = tuple(t if t is None else t.to(device) for t in ops)
    got = qgemv_triton(*ops, k, mode, torch.bfloat16)
    tiled = qmatmul_triton(*ops, k, mode, torch.bfloat16)
    assert torch.equal(got, tiled)
    _check(device, mode, m, n, k, seed=8, bias=True, dtype=torch.float16)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_more_than_one_token_block(device: str) -> None:
    """M > 64: several token blocks (grid axis 2), each with its own partial sums."""
    for mode in (MODE_W4A4, MODE_W8A8):
        _check(device, mode, 70, 24, 256, seed=3, bias=True, dtype=torch.bfloat16, split_k=2, block_n=16,
               block_k=64)


def test_split_rules() -> None:
    # LLaMA-3-8B decode shapes on an H100 (132 SMs), default CUDA blocks (64 x 256): 1.5-3 programs per SM
    for n, k, want in [(4096, 4096, 4), (14336, 4096, 1), (4096, 14336, 4), (6144, 4096, 4)]:
        split = default_split_k(n // 64, k, 256, 132)
        assert split == want and 1.5 * 132 <= (n // 64) * split < 3 * 132, (n, k, split)
        assert split_plan(k, 256, split)[1] == split
    assert default_split_k(16, 4096, 256, 132) == 8  # capped: at least two K-tiles per program
    assert default_split_k(1000, 4096, 256, 132) == 1
    assert default_split_k(4, 100, 256, 132) == 1
    assert split_plan(200, 32, 3) == (3, 3)  # 7 tiles -> 3 + 3 + 1
    assert split_plan(200, 32, 5) == (2, 4)  # never an empty split
    assert split_plan(100, 256, 4) == (1, 1)
    with pytest.raises(ValueError):
        split_plan(256, 128, 0)


def test_bad_arguments_and_empty() -> None:
    a, sa, w, sw, _ = _operands(MODE_W4A8, 2, 8, 256, 0, False, torch.float32)
    with pytest.raises(ValueError, match="multiple of 128"):
        qgemv_triton(a, sa, w, sw, None, 256, MODE_W4A8, torch.float32, block_k=64)
    with pytest.raises(ValueError, match="block_n"):
        qgemv_triton(a, sa, w, sw, None, 256, MODE_W4A8, torch.float32, block_n=8)
    with pytest.raises(ValueError, match="unknown mode"):
        qgemv_triton(a, sa, w, sw, None, 256, 3, torch.float32)
    with pytest.raises(TypeError, match="reduce"):  # one reduction only (no arrival counters): no such option
        qgemv_triton(a, sa, w, sw, None, 256, MODE_W4A8, torch.float32, reduce="last")
    out = qgemv_triton(a[:0], sa[:0], w, sw, None, 256, MODE_W4A8, torch.bfloat16)
    assert out.shape == (0, 8) and out.dtype == torch.bfloat16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("k,n", [(4096, 4096), (14336, 1000), (328, 4096)])
def test_cuda_llama_shapes(mode: int, m: int, k: int, n: int) -> None:
    """Native: default split and blocks (two output dtypes), explicit splits/blocks, bit-equal to the reference
    (bias included), and to the tiled kernel without bias."""
    for i, (split_k, bn, bk) in enumerate([(None, None, None), (None, None, None), (3, 32, 256), (16, 128, 256)]):
        dtype = OUT_DTYPES[i % 3]
        ops = _operands(mode, m, n, k, 100 * m + i, True, dtype, extreme=i == 3)
        ops = tuple(t if t is None else t.cuda() for t in ops)
        want = _OPS[mode](*(t if t is None else t.cpu() for t in ops), dtype)
        got = qgemv_triton(*ops, k, mode, dtype, split_k=split_k, block_n=bn, block_k=bk)
        assert torch.equal(got.cpu(), want), (split_k, bn, bk, dtype)
    got = qgemv_triton(*ops[:4], None, k, mode, torch.bfloat16)
    assert torch.equal(got, qmatmul_triton(*ops[:4], None, k, mode, torch.bfloat16))


def test_shapes_are_checked() -> None:
    """A direct call with operands that do not match K is refused before any kernel reads out of bounds."""
    a, sa, w, sw, _ = _operands(MODE_W4A4, 2, 8, 256, 0, False, torch.float32)
    with pytest.raises(ValueError, match="activations"):
        qgemv_triton(a[:, :64], sa, w, sw, None, 256, MODE_W4A4, torch.float32)
    with pytest.raises(ValueError, match="columns"):
        qgemv_triton(a, sa, w[:, :64], sw, None, 256, MODE_W4A4, torch.float32)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("m", [1, 16, 70])
def test_counters_fuse_the_reduction(device: str, mode: int, m: int) -> None:
    """With arrival counters the last program of each tile reduces: bit-equal to the reference, the counters are
    all back at 0 after every call (so repeated calls, as in a replayed CUDA graph, stay right), and a short or
    wrongly typed counter buffer is refused in one line."""
    from flatquant.ops.gemv import counter_slots

    k, n, bn, bk = SHAPES[mode][0]
    m_blocks = -(-m // min(64, 1 << (m - 1).bit_length()))
    counters = torch.zeros(-(-n // bn) * m_blocks, dtype=torch.int32, device=device)
    for rep in range(2):
        _check(device, mode, m, n, k, seed=rep + m, bias=rep == 1, dtype=OUT_DTYPES[(m + rep) % 3], split_k=3,
               block_n=bn, block_k=bk, counters=counters)
        assert int(counters.abs().sum()) == 0
    ops = tuple(t if t is None else t.to(device) for t in _operands(mode, m, n, k, 0, False, torch.bfloat16))
    with pytest.raises(ValueError, match="counters"):
        qgemv_triton(*ops, k, mode, torch.bfloat16, split_k=3, block_n=bn, block_k=bk, counters=counters[:1])
    with pytest.raises(ValueError, match="counters"):
        qgemv_triton(*ops, k, mode, torch.bfloat16, split_k=3, block_n=bn, block_k=bk, counters=counters.long())
    assert counter_slots(40, torch.device("cpu"), 70) == 4
    if device == "cuda":  # 64-wide tiles, or 128-wide once 64-wide ones give >= 3 programs per SM (132 SMs)
        from flatquant.ops import sm_count

        assert counter_slots(4096, torch.device("cuda")) == 64
        assert counter_slots(28672, torch.device("cuda"), 2) == (224 if 448 >= 3 * sm_count(torch.device("cuda"))
                                                                 else 448)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("split_k,with_counters", [(1, False), (3, False), (3, True)])
def test_residual_in_the_epilogue(device: str, dtype: torch.dtype, split_k: int, with_counters: bool) -> None:
    """``residual`` added in the epilogue (every reduction path) equals ``w4a4_gemv``'s reference, which is the
    plain product plus the residual in the output dtype: the same bits as a separate add."""
    m, (k, n, bn, bk) = 3, SHAPES[MODE_W4A4][0]
    a, sa, w, sw, b = _operands(MODE_W4A4, m, n, k, seed=5, bias=True, dtype=dtype)
    res = (torch.randn(m, n, generator=torch.Generator().manual_seed(6)) * 8).to(dtype)
    counters = torch.zeros(counter_slots(n, torch.device("cpu"), m), dtype=torch.int32)
    want = w4a4_gemv(a, sa, w, sw, b, dtype, counters, res)
    assert torch.equal(want, w4a4_matmul(a, sa, w, sw, b, dtype) + res)
    dev = [t.to(device) if t is not None else None for t in (a, sa, w, sw, b)]
    cnt = counters.to(device) if with_counters else None
    got = qgemv_triton(*dev, k, MODE_W4A4, dtype, split_k=split_k, block_n=bn, block_k=bk, counters=cnt,
                       residual=res.to(device))
    assert torch.equal(got.cpu(), want)
    with pytest.raises(ValueError, match="residual must be"):
        qgemv_triton(*dev, k, MODE_W4A4, dtype, residual=res[:, :-1].to(device))


def test_residual_opcheck() -> None:
    m, (k, n, _, _) = 2, SHAPES[MODE_W4A4][1]
    a, sa, w, sw, b = _operands(MODE_W4A4, m, n, k, seed=1, bias=False, dtype=torch.bfloat16)
    counters = torch.zeros(counter_slots(n, torch.device("cpu"), m), dtype=torch.int32)
    res = torch.randn(m, n).bfloat16()
    torch.library.opcheck(w4a4_gemv, (a, sa, w, sw, b, torch.bfloat16, counters, res))
