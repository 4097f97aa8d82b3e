"""The real inference model: KV4 equivalence with the fake path (prefill and decode), GQA cache per KV head,
batches with left padding, greedy generation, and torch.compile of the decode step without graph breaks."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from flatquant.calib.config import CalibConfig
from flatquant.calib.loop import calibrate, reparameterize
from flatquant.calib.methods import method_config
from flatquant.evaluation.perplexity import real_window_nlls
from flatquant.models.model import forward
from flatquant.models.real import decode_layer, rope_at
from flatquant.models.real.checkpoint import export_checkpoint, load_checkpoint
from flatquant.presets import bits_preset
from tests.helpers import TINY, tiny_model, tokens

Q = bits_preset("w4a4kv4")
T = method_config("flatquant")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    w = tiny_model(TINY)
    flats = calibrate(w, tokens(4, 16), Q, T, CalibConfig(nsamples=4, seqlen=16, batch_size=2, epochs=1))
    out = tmp_path_factory.mktemp("real") / "ck"
    export_checkpoint(w, flats, Q, T, out)
    return reparameterize(w, flats, Q, T), load_checkpoint(out)


def _prefill_then_decode(model, x: torch.Tensor, cache, n_prefill: int) -> torch.Tensor:  # (B, T) -> (B, T, V)
    """Logits of ``x``: a prefill of its first ``n_prefill`` tokens, then one decode step per remaining token."""
    steps = [model(x[:, :n_prefill], cache)] + [model(x[:, i:i + 1], cache) for i in range(n_prefill, x.shape[1])]
    return torch.cat(steps, 1)


def test_prefill_and_decode_equal_fake_full_sequence(pair) -> None:
    fake, real = pair
    x = tokens(3, 20, seed=11)
    want = forward(fake, x, Q)
    torch.testing.assert_close(_prefill_then_decode(real, x, real.new_cache(3, 20), 9), want, rtol=1e-5, atol=1e-5)


def test_kv4_error_is_present_in_prefill(pair) -> None:
    fake, real = pair
    x = tokens(1, 16, seed=3)
    no_kv = forward(fake, x, bits_preset("w4a4"))
    assert (real(x) - no_kv).abs().max() > 1e-3  # the real prefill carries the KV4 error like the fake path


def test_gqa_cache_per_kv_head(pair) -> None:
    _, real = pair
    cache = real.new_cache(2, 10)
    lk = cache.layers[0]
    assert lk.k.shape == (2, TINY.n_kv_heads, 10, TINY.head_dim // 2) and lk.k.dtype == torch.uint8
    assert lk.k_scale.shape == (2, TINY.n_kv_heads, 10)
    bf16_bytes = 2 * TINY.n_layers * 2 * TINY.n_kv_heads * 10 * TINY.head_dim * 2
    assert cache.nbytes() < 0.6 * bf16_bytes  # head_dim 12 is tiny; 2 fp32 per 6 bytes here


def test_left_padded_batch_equals_unpadded_rows(pair) -> None:
    _, real = pair
    x = tokens(2, 10, seed=5)
    start = torch.tensor([0, 4], dtype=torch.int32)
    cache = real.new_cache(2, 13, start)
    logits = [real(x, cache)[:, -1]]
    nxt = logits[0].argmax(-1, keepdim=True)
    for _ in range(3):
        logits.append(real(nxt, cache)[:, -1])
        nxt = logits[-1].argmax(-1, keepdim=True)
    row = x[1:, 4:]
    c1 = real.new_cache(1, 9)
    solo = [real(row, c1)[:, -1]]
    nxt1 = solo[0].argmax(-1, keepdim=True)
    for _ in range(3):
        solo.append(real(nxt1, c1)[:, -1])
        nxt1 = solo[-1].argmax(-1, keepdim=True)
    torch.testing.assert_close(torch.stack(logits)[:, 1], torch.stack(solo)[:, 0], rtol=1e-5, atol=1e-5)


def test_greedy_generate_equals_stepwise_argmax(pair) -> None:
    from flatquant.models.hf_real import FlatQuantForCausalLM

    _, real = pair
    x = tokens(2, 6, seed=9)
    hf = FlatQuantForCausalLM.wrap(real)
    out = hf.generate(x, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    seq = x
    for _ in range(5):
        seq = torch.cat([seq, real(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    assert torch.equal(torch.stack(list(real.generate(x, 5)), 1), seq[:, 6:])
    sampled = hf.generate(x, max_new_tokens=4, do_sample=True, top_p=0.9, temperature=0.7, eos_token_id=None,
                          pad_token_id=0)
    assert sampled.shape == (2, 10) and torch.equal(sampled[:, :6], x)


def test_decode_layer_compiles_without_graph_breaks(pair) -> None:
    _, real = pair
    cache = real.new_cache(2, 8)
    real(tokens(2, 5, seed=1), cache)
    layer, kv = real.weights.layers[0], cache.layers[0]
    x = torch.randn(2, 1, TINY.hidden)
    idx = torch.tensor([5])
    rope = rope_at(real.weights.top["rope.inv_freq"], idx[None].expand(2, 1), 1.0)
    start, length = cache.start, torch.full((2,), 6, dtype=torch.int32)
    torch._dynamo.reset()
    eager = decode_layer(layer, x, rope, kv, real.cfg, idx, start, length)
    compiled = torch.compile(decode_layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(layer, x, rope, kv, real.cfg, idx, start, length), eager)


def test_real_window_nlls(pair) -> None:
    fake, real = pair
    x = tokens(2, 12, seed=2)
    logits = forward(fake, x, Q)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), x[:, 1:].reshape(-1),
                                             reduction="none").view(2, -1).mean(1)
    torch.testing.assert_close(real_window_nlls(real, x), want, rtol=1e-5, atol=1e-5)


def test_graph_capturable_decode_step_equals_forward(pair) -> None:
    _, real = pair
    x = tokens(2, 9, seed=8)
    c1, c2 = real.new_cache(2, 12), real.new_cache(2, 12)
    real(x[:, :8], c1)
    real(x[:, :8], c2)
    want = real(x[:, 8:9], c1)[:, -1]
    got = real.decode_step(x[:, 8:9], torch.tensor([8]), c2)
    torch.testing.assert_close(got, want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_triton_path_matches_reference_and_graph_decode(tmp_path: Path) -> None:
    w = tiny_model(TINY)
    flats = calibrate(w, tokens(4, 16), Q, T, CalibConfig(nsamples=4, seqlen=16, batch_size=2, epochs=1))
    export_checkpoint(w, flats, Q, T, tmp_path / "ck")
    cpu = load_checkpoint(tmp_path / "ck", "cpu", dtype=torch.bfloat16)
    gpu = load_checkpoint(tmp_path / "ck", "cuda", dtype=torch.bfloat16)
    x = tokens(2, 24, seed=3)
    want = cpu(x).float()
    got = gpu(x.cuda()).float().cpu()
    assert (got - want).norm() / want.norm() < 5e-2  # ±1 activation codes where bf16 intermediates round apart
    from flatquant.models.real import CUDAGraphDecoder

    c_eager, c_graph = gpu.new_cache(2, 30), gpu.new_cache(2, 30)
    gpu(x[:, :20].cuda(), c_eager)
    gpu(x[:, :20].cuda(), c_graph)
    dec = CUDAGraphDecoder(gpu, c_graph)
    for i in range(20, 24):
        eager = gpu(x[:, i:i + 1].cuda(), c_eager)[:, -1]
        torch.testing.assert_close(dec.step(x[:, i].cuda()).clone(), eager)
    # generate keeps its graphed cache per (batch, bucketed capacity): a second call of a similar size captures
    # nothing new and gives the same tokens; a call while the first generator still runs gets its own cache
    first = torch.stack(list(gpu.generate(x[:, :6].cuda(), 5)), 1)
    decoders = dict(gpu._decoders)
    assert len(list(gpu.generate(x[:, :7].cuda(), 4))) == 4 and gpu._decoders == decoders
    assert torch.equal(torch.stack(list(gpu.generate(x[:, :6].cuda(), 5)), 1), first) and gpu._decoders == decoders
    running = gpu.generate(x[:, :6].cuda(), 5)
    head = next(running)
    assert torch.equal(torch.stack(list(gpu.generate(x[:, :6].cuda(), 5)), 1), first)
    assert torch.equal(torch.stack([head, *running], 1), first)


def _engine(args, fuse: bool, dtype=torch.float32, device="cpu", seed=0, cpu_codes: bool = True):
    from flatquant.models.random import random_real_tensors
    from flatquant.models.real import RealConfig, RealModel, RealWeights, layer_from_tensors

    top, layers = random_real_tensors(args, generator=torch.Generator().manual_seed(seed), device=device,
                                      dtype=dtype)
    cfg = RealConfig(args=args, qcfg=Q, dtype=dtype, fuse=fuse, cpu_codes=cpu_codes)
    return RealModel(RealWeights(cfg=cfg, top=top, layers=tuple(layer_from_tensors(t, cfg) for t in layers)),
                     compile_decode=False)


def _gqa_args(n_heads: int, n_kv_heads: int, family: str):
    """Tiny args in a family's style: "llama" (plain), "qwen2" (q/k/v biases), "qwen3" (q/k RMSNorm before RoPE)."""
    from flatquant.models.args import ModelArgs

    return ModelArgs(vocab_size=64, hidden=48, intermediate=80, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     head_dim=8, qkv_bias=family == "qwen2", qk_norm=family == "qwen3")


GQA_CASES = [(4, 4, "llama"), (6, 2, "qwen2"), (8, 2, "qwen3"), (7, 1, "qwen2")]


@pytest.mark.parametrize("heads,kv_heads,family", GQA_CASES)
def test_fused_engine_equals_unfused(heads: int, kv_heads: int, family: str) -> None:
    """q/k/v and gate/up as one transform + quantize and one weight give the unfused engine's logits bit for bit
    (reference ops; with and without the CPU's unpacked weight codes): GQA ratios 1, 3, 4, 7 (odd head counts),
    biases, q/k norms, left padding, batch 1 and 3, prefill then decode (the decode GEMM stacks the code sets as
    rows)."""
    args = _gqa_args(heads, kv_heads, family)
    fused, plain, packed = _engine(args, True), _engine(args, False, cpu_codes=False), _engine(args, True,
                                                                                          cpu_codes=False)
    assert set(fused.weights.layers[0].fused) == {"qkv", "up_gate"} and not plain.weights.layers[0].fused
    assert set(fused.weights.layers[0].cpu_codes) == {"qkv", "up_gate", "o_proj", "down_proj"}
    assert not packed.weights.layers[0].cpu_codes
    for b in (1, 3):
        x = tokens(b, 12, vocab=64, seed=b)
        start = torch.tensor([0, 3, 5][:b], dtype=torch.int32) if b > 1 else None
        out = [_prefill_then_decode(m, x, m.new_cache(b, 16, start), 9) for m in (fused, plain, packed)]
        assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_fusions_keep_the_bits(monkeypatch) -> None:
    """The engine's plumbing of every decode and prefill fusion setting (the deferred norm handed to the transform
    op, the residual to the GEMV / GEMM, q's K^-T to the attention op): on the reference ops each gives the logits
    of no fusion bit for bit (the kernels' own equality is tested per op in tests/ops); a bad setting is refused."""
    from flatquant.models.real import step as step_mod

    args = _gqa_args(8, 2, "qwen3")
    x = tokens(2, 12, vocab=64, seed=5)
    start = torch.tensor([0, 3], dtype=torch.int32)
    outs = {}
    settings = [(d, "none") for d in ("none", "norm", "residual", "q_trans", "norm,residual,q_trans")]
    settings += [("none", p) for p in ("norm", "residual", "norm,residual")]
    for decode, prefill in settings:
        monkeypatch.setenv("FLATQUANT_DECODE_FUSIONS", decode)
        monkeypatch.setenv("FLATQUANT_PREFILL_FUSIONS", prefill)
        m = _engine(args, True)
        outs[decode, prefill] = _prefill_then_decode(m, x, m.new_cache(2, 16, start), 9)
    assert all(torch.equal(o, outs["none", "none"]) for o in outs.values())
    for name, bad, fn in (("FLATQUANT_DECODE_FUSIONS", "norm,rope", step_mod.decode_fusions),
                          ("FLATQUANT_PREFILL_FUSIONS", "q_trans", step_mod.prefill_fusions)):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name):
            fn()
        monkeypatch.delenv(name)
    assert step_mod.decode_fusions() == set(step_mod.DEFAULT_DECODE_FUSIONS)
    assert step_mod.prefill_fusions() == set(step_mod.DEFAULT_PREFILL_FUSIONS)


def test_residual_epilogue_keeps_the_engine_bits(monkeypatch) -> None:
    """A fp16 engine whose decode GEMVs run the Triton kernel (interpreter; K split reduced in-kernel with
    counters): the o/down residual added in the GEMV epilogue gives the logits of the separate add bit for bit.
    (fp16: the interpreter rounds bf16 results before the add in any case, so only fp16 shows a missing rounding;
    adding in fp32 without it fails here.)"""
    from flatquant.models.real import linear as lin_mod
    from flatquant.models.real import weights as weights_mod
    from flatquant.ops.gemv import counter_slots, qgemv_triton
    from flatquant.ops.matmul import MODE_W4A4

    residuals: list[bool] = []

    def gemv(a, a_scale, w, w_scale, bias, out_dtype, counters, residual=None):
        residuals.append(residual is not None)
        return qgemv_triton(a, a_scale, w, w_scale, bias, a.shape[1] * 2, MODE_W4A4, out_dtype, split_k=2,
                            block_k=64, counters=counters, residual=residual)

    monkeypatch.setattr(lin_mod, "w4a4_gemv", gemv)
    monkeypatch.setattr(weights_mod, "gemv_counters",
                        lambda n, dev: torch.zeros(counter_slots(n, dev, 16), dtype=torch.int32, device=dev))
    args = _gqa_args(6, 2, "qwen2")
    x = tokens(4, 24, vocab=64, seed=6)
    outs = {}
    monkeypatch.setenv("FLATQUANT_PREFILL_FUSIONS", "none")  # count the decode steps' epilogue adds only
    for setting in ("none", "residual"):
        monkeypatch.setenv("FLATQUANT_DECODE_FUSIONS", setting)
        m = _engine(args, True, dtype=torch.float16, cpu_codes=False)
        outs[setting] = _prefill_then_decode(m, x, m.new_cache(4, 24), 4)
    assert sum(residuals) == 20 * 2 * args.n_layers  # 20 decode steps, o and down per layer, in the second run
    assert outs["none"].dtype == torch.float16 and torch.equal(outs["residual"], outs["none"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("heads,kv_heads,family", GQA_CASES)
def test_cuda_fast_engine_equals_unfused_eager(heads: int, kv_heads: int, family: str) -> None:
    """On the GPU: fused linears, compiled decode layer, split decode attention and the CUDA-graph decoder against
    the unfused eager engine, with a prompt longer than one attention split."""
    from flatquant.models.real import CUDAGraphDecoder

    args = _gqa_args(heads, kv_heads, family)
    fast, slow = _engine(args, True, torch.bfloat16, "cuda"), _engine(args, False, torch.bfloat16, "cuda")
    fast._decode_layer = torch.compile(decode_layer, fullgraph=True, dynamic=False)
    x = tokens(2, 300, vocab=64, seed=4).cuda()
    start = torch.tensor([0, 7], dtype=torch.int32)
    c_fast, c_slow = fast.new_cache(2, 310, start), slow.new_cache(2, 310, start)
    a, b = fast(x[:, :296], c_fast), slow(x[:, :296], c_slow)
    rel = float((a.float() - b.float()).norm() / b.float().norm())
    assert rel < 2e-2, f"prefill logits differ by {rel:.3g} (relative)"
    dec = CUDAGraphDecoder(fast, c_fast)
    for i in range(296, 300):
        want = slow(x[:, i:i + 1], c_slow)[:, -1].float()
        got = dec.step(x[:, i]).float()
        rel = float((got - want).norm() / want.norm())
        assert rel < 3e-2, f"decode step {i}: logits differ by {rel:.3g} (relative)"


@pytest.mark.parametrize("kw,match", [({"top_p": 0.0}, "top_p"), ({"temperature": -1.0}, "temperature"),
                                      ({"temperature": float("nan")}, "temperature"), ({"max_new_tokens": 0},
                                                                                       "max_new_tokens")])
def test_generate_refuses_bad_settings_in_the_library(pair, kw, match) -> None:
    """The library refuses what the CLI refuses (one ValueError, before any work), not a multinomial traceback."""
    _, real = pair
    args = {"max_new_tokens": 3, **kw}
    n = args.pop("max_new_tokens")
    with pytest.raises(ValueError, match=match):
        next(real.generate(tokens(1, 4), n, **args))


def test_compiled_prefill_serves_models_of_several_head_counts() -> None:
    """One process, compiled prefill layers of models with different head counts and GQA ratios (as a benchmark or
    a test session builds them), left padding (the masked SDPA with enable_gqa): dynamo then traces the head
    counts as SymInts, and a SymBool enable_gqa made SDPA refuse the call; the compiled prefill must equal the
    eager one."""
    for heads, kv_heads in [(4, 4), (6, 2), (8, 2)]:
        args = _gqa_args(heads, kv_heads, "llama")
        eager = _engine(args, True)
        compiled = type(eager)(eager.weights, compile_decode=False, compile_prefill=True)
        x = tokens(2, 12, vocab=64, seed=heads)
        start = torch.tensor([0, 3], dtype=torch.int32)
        want = eager(x, eager.new_cache(2, 16, start))
        got = compiled(x, compiled.new_cache(2, 16, start))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("heads,kv_heads,family,batch", [(6, 2, "qwen2", 2), (4, 4, "llama", 2),
                                                        (8, 2, "qwen3", 2), (7, 1, "qwen2", 1)])
def test_cuda_code_paths_through_the_interpreter_equal_the_reference_engine(monkeypatch, heads: int, kv_heads: int,
                                                                            family: str, batch: int) -> None:
    """The engine's CUDA-only paths, end to end on CPU: the ops replaced by their Triton launchers (the
    interpreter) and the CUDA-only switches turned on: the split ``kron_quant`` layout at decode tokens (forced at
    these tiny dims), ``up=`` SwiGLU in down's transform, int8 codes + unpacked weights from ``UNPACK_MIN_M``
    tokens, the fused K/V cache write, the decode GEMV reducing its K split in-kernel with per-linear counters,
    flash-decoding attention. Against the reference-ops engine (unfused, computed before anything is patched):
    prefill of a left-padded batch longer than ``UNPACK_MIN_M``, then decode steps; the counters are back at zero
    after every step. (Feeding down's transform gate·up instead of silu(gate)·up moves the prefill logits by 5e-3
    relative here, against 5e-8 for the engine as it is.)"""
    from flatquant.models.real import cache as cache_mod
    from flatquant.models.real import linear as lin_mod
    from flatquant.models.real import step as step_mod
    from flatquant.models.real import weights as weights_mod
    from flatquant.ops.gemv import counter_slots, qgemv_triton, split_plan
    from flatquant.ops.kron_quant import kron_quant_multi_triton, kron_quant_triton
    from flatquant.ops.kv_attention import kv4_decode_attention_triton
    from flatquant.ops.kv_quant import kv_quant_write_triton
    from flatquant.ops.matmul import MODE_W4A4, UNPACK_MIN_M, w4a4_triton, w8a8_triton
    from flatquant.ops.pack import unpack_int4_triton

    kq_mod = importlib.import_module("flatquant.ops.kron_quant")  # the module (flatquant.ops.kron_quant is the op)
    monkeypatch.setenv("FLATQUANT_DECODE_FUSIONS", ",".join(step_mod.DECODE_FUSIONS))  # q_trans too (opt-in)
    monkeypatch.setenv("FLATQUANT_PREFILL_FUSIONS", ",".join(step_mod.PREFILL_FUSIONS))  # opt-in at prefill
    args = _gqa_args(heads, kv_heads, family)
    want_engine = _engine(args, False, cpu_codes=False)
    t = 134 // batch  # batch x (t - 2) prefill rows >= UNPACK_MIN_M
    x = tokens(batch, t, vocab=64, seed=9)
    start = torch.tensor([0, 5][:batch], dtype=torch.int32)
    c_want = want_engine.new_cache(batch, t + 2, start)
    steps = (t - 2, t - 1)
    wants = [want_engine(x[:, :t - 2], c_want)] + [want_engine(x[:, i:i + 1], c_want) for i in steps]  # unpatched
    reduced: list[int] = []
    # fusions seen: decode GEMV epilogue, transform (prefill and decode), attention, prefill W8A8 epilogue
    fused_in = {"residual": 0, "norm": 0, "q_trans": 0, "prefill_residual": 0}

    def kron_multi(x, left, right, clips, n1, bits=4, pack=True, norm=None, eps=0.0):
        fused_in["norm"] += norm is not None
        return kron_quant_multi_triton(x, left, right, clips, n1, bits, pack, norm, eps)

    def w8a8(a, a_scale, w, w_scale, bias, out_dtype, residual=None):
        fused_in["prefill_residual"] += residual is not None
        return w8a8_triton(a, a_scale, w, w_scale, bias, out_dtype, residual)

    def attention(*args):
        fused_in["q_trans"] += len(args) > 10 and args[10] is not None
        return kv4_decode_attention_triton(*args)

    def gemv_split(a, a_scale, w, w_scale, bias, out_dtype, counters, residual=None):  # a K split: 2 tiles of 64
        k = a.shape[1] * 2
        if split_plan(k, 64, 2)[1] == 2:
            reduced.append(k)
        fused_in["residual"] += residual is not None
        return qgemv_triton(a, a_scale, w, w_scale, bias, k, MODE_W4A4, out_dtype, split_k=2, block_k=64,
                            counters=counters, residual=residual)

    for mod, name, fn in [
        (lin_mod, "kron_quant", kron_quant_triton), (lin_mod, "kron_quant_multi", kron_multi),
        (lin_mod, "w4a4_matmul", w4a4_triton), (lin_mod, "w4a4_gemv", gemv_split),
        (lin_mod, "w8a8_matmul", w8a8), (lin_mod, "unpack_int4", unpack_int4_triton),
        # tiny dims: force the split layout at decode (the deferred norm runs in it; the whole layout's norm is
        # covered by tests/ops/test_kron_quant.py)
        (kq_mod, "default_variant", lambda t, n1, n2, norm=False, base=kq_mod.default_variant: "split" if t <= 16
         else base(t, n1, n2, norm)),
        (cache_mod, "kv_quant_write", kv_quant_write_triton),
        (step_mod, "kv4_decode_attention", attention),
        (lin_mod, "unpacked_prefill", lambda x, cpu_codes: x.shape[0] >= UNPACK_MIN_M),
        (weights_mod, "gemv_counters",
         lambda n, dev: torch.zeros(counter_slots(n, dev, 16), dtype=torch.int32, device=dev)),
    ]:
        monkeypatch.setattr(mod, name, fn)
    launched: list[str] = []
    to_cpu = kq_mod.cpu_kernel

    def recording_cpu_kernel(kernel):  # the launcher wraps each kernel it launches on CPU tensors
        launched.append(kernel.fn.__name__)
        return to_cpu(kernel)

    monkeypatch.setattr(kq_mod, "cpu_kernel", recording_cpu_kernel)
    fast = _engine(args, True, cpu_codes=False)
    counters = [c for layer in fast.weights.layers for c in layer.gemv_counters.values()]
    assert counters and all(int(c.abs().sum()) == 0 for c in counters)
    c_fast = fast.new_cache(batch, t + 2, start)
    a = fast(x[:, :t - 2], c_fast)
    rel = float((a - wants[0]).norm() / wants[0].norm())
    assert rel < 1e-3, f"prefill logits differ by {rel:.3g} (relative)"
    for i, want in zip(steps, wants[1:], strict=True):
        got = fast(x[:, i:i + 1], c_fast)
        rel = float((got - want).norm() / want.norm())
        assert rel < 1e-3, f"decode step {i}: logits differ by {rel:.3g} (relative)"
        assert all(int(c.abs().sum()) == 0 for c in counters)
    # the split layout (decode), the pipelined one (prefill transforms with both factors), whole (o's head mix)
    assert {"_kron_cols_kernel", "_kron_quant_pipe_kernel", "_kron_quant_kernel"} <= set(launched)
    assert 80 in reduced  # down_proj (K = intermediate = 80) reduced its K split in-kernel, with its counters
    n_layers = len(fast.weights.layers)
    # every decode step: both norms in the q/k/v and gate/up transform kernels (split layout), both residual adds in
    # the o/down GEMV epilogues, q's K^-T in the attention kernel (every fusion switched on above); the prefill:
    # both norms in the transform kernels (pipelined layout), both residual adds in the W8A8 GEMM's epilogue
    assert fused_in == {"residual": 4 * n_layers, "norm": 6 * n_layers, "q_trans": 2 * n_layers,
                        "prefill_residual": 2 * n_layers}, fused_in
