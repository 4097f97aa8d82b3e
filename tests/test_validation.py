"""One validation layer: the frozen configs refuse out-of-range settings, and NaN/inf is never a result."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flatquant.calib.config import CalibConfig
from flatquant.calib.guard import NonFiniteError, check_layer_finite, check_perplexity_finite
from flatquant.core.spec import QuantConfig, QuantSpec, TransformConfig
from flatquant.data import DataError, check_source, eval_windows, load_texts, same_local_file
from flatquant.evaluation.perplexity import EvalConfig, perplexity, perplexity_from_nlls
from flatquant.models import hf
from flatquant.presets import bits_config
from tests.helpers import tiny_model, tokens


def write_tiny_gguf(path: Path) -> Path:
    """A random 2-layer Llama GGUF (F32 tensors, a byte-level BPE vocabulary of 128 tokens), about 220 kB."""
    import gguf
    import numpy as np

    vocab, hidden, inter, n_layers = 128, 48, 96, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [chr(0x100 + i) if i < 32 else chr(33 + i) for i in range(vocab - 3)])
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_merges([])
    w.add_token_scores([0.0] * vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)

    def rand(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    rand("token_embd.weight", vocab, hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    rand("output.weight", vocab, hidden)
    for i in range(n_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(hidden, np.float32))
        for name, rows, cols in (("attn_q", hidden, hidden), ("attn_k", 24, hidden), ("attn_v", 24, hidden),
                                 ("attn_output", hidden, hidden), ("ffn_gate", inter, hidden),
                                 ("ffn_up", inter, hidden), ("ffn_down", hidden, inter)):
            rand(p + name + ".weight", rows, cols)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("bits", [0, 1, 9, 12, 15, 17, 32, -4, True, 4.0])
def test_quant_spec_refuses_widths_outside_2_to_8_or_16(bits):
    with pytest.raises(ValueError, match="bits must be 2-8, or 16"):
        QuantSpec(bits=bits)


def test_quant_spec_accepts_2_to_8_and_16():
    for bits in (2, 3, 4, 5, 6, 7, 8, 16):
        assert QuantSpec(bits=bits).enabled == (bits < 16)
    with pytest.raises(ValueError, match="granularity"):
        QuantSpec(bits=4, granularity="per_tensor")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive group_size, got 0"):
        QuantSpec(bits=4, granularity="per_group", group_size=0)


def test_bits_config_names_the_bad_width():
    with pytest.raises(ValueError, match="^w bits must be 2-8.*got 0"):
        bits_config(0, 4)
    with pytest.raises(ValueError, match="^v bits"):
        bits_config(4, 4, 4, 10)
    with pytest.raises(ValueError, match="group size must be a positive integer, got 0"):
        bits_config(4, 4, w_group=0)  # 0 used to mean "per channel"
    assert bits_config(4, 4, w_group=32).w.group_size == 32
    assert bits_config(4, 16) == QuantConfig(w=QuantSpec(bits=4, granularity="per_channel"), a=QuantSpec(bits=16),
                                             q=QuantSpec(bits=16), k=QuantSpec(bits=16, sym=False),
                                             v=QuantSpec(bits=16, sym=False))


@pytest.mark.parametrize("field,value,message", [
    ("seqlen", 1, "seqlen must be an integer >= 2"),
    ("seqlen", 0, "seqlen must be an integer >= 2"),
    ("nsamples", 0, "nsamples must be an integer >= 1"),
    ("epochs", -1, "epochs must be an integer >= 0"),
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("lr", math.nan, "lr must be a finite number > 0"),
    ("lr", math.inf, "lr must be a finite number > 0"),
    ("lr", 0.0, "lr must be a finite number > 0"),
    ("lr", -1e-3, "lr must be a finite number > 0"),
    ("clip_lr_mult", math.nan, "clip_lr_mult"),
    ("weight_decay", -0.1, "weight_decay must be a finite number >= 0"),
    ("eps", 0.0, "eps"),
    ("eta_min_ratio", 2.0, "eta_min_ratio must be a finite number >= 0 and <= 1.0"),
    ("betas", (0.9, 1.0), "betas must be a finite number >= 0 and < 1.0"),
    ("betas", (0.9, math.nan), "betas"),
    ("gptq_percdamp", math.nan, "gptq_percdamp"),
    ("warmup_steps", -1, "warmup_steps"),
    ("amp_dtype", "float8", "amp_dtype"),
])
def test_calib_config_refuses_out_of_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        CalibConfig(**{field: value})


def test_calib_config_accepts_the_paper_and_small_settings():
    CalibConfig()
    CalibConfig(nsamples=4, seqlen=2, batch_size=2, epochs=0, weight_decay=0.0, eta_min_ratio=0.0)


def test_transform_config_keeps_its_checks():
    with pytest.raises(ValueError, match="diag_alpha"):
        TransformConfig(diag_alpha=math.nan)


@pytest.mark.parametrize("kw,message", [
    ({"seqlen": 1}, "window length must be >= 2"),
    ({"windows": 0}, "windows must be >= 1"),
    ({"batch_size": 0}, "batch size must be >= 1"),
])
def test_eval_config_refuses_out_of_range(kw, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**kw)


def test_eval_windows_and_perplexity_refuse_empty_or_one_token_windows():
    t = torch.arange(50)
    with pytest.raises(ValueError, match=">= 2 tokens"):
        eval_windows(t, 1)
    with pytest.raises(ValueError, match=">= 1, got 0"):
        eval_windows(t, 8, max_windows=0)
    w = tiny_model()
    with pytest.raises(ValueError, match=r"N >= 1, T >= 2"):
        perplexity(w, tokens(0, 16))
    with pytest.raises(ValueError, match=r"N >= 1, T >= 2"):
        perplexity(w, tokens(2, 1))


def test_nan_model_perplexity_is_an_error_not_a_number():
    w = tiny_model()
    bad = w.with_layers([{**w.layers[0], "q_proj.weight": torch.full_like(w.layers[0]["q_proj.weight"], math.nan)},
                         *w.layers[1:]])
    assert math.isfinite(perplexity(w, tokens(2, 16)))
    with pytest.raises(NonFiniteError, match="window 0 has a non-finite loss"):
        perplexity(bad, tokens(2, 16))
    with pytest.raises(NonFiniteError, match="window 1 .*1 of 3"):
        perplexity_from_nlls(torch.tensor([1.0, math.inf, 2.0]))
    with pytest.raises(NonFiniteError, match="overflows"):
        perplexity_from_nlls(torch.tensor([800.0]))
    assert perplexity_from_nlls(torch.tensor([0.0, 2.0])) == pytest.approx(math.e)
    check_perplexity_finite(torch.tensor([1.0, 2.0]))


def test_layer_guard_names_the_layer():
    good = {"ln.left": torch.eye(3), "steps": torch.tensor([1, 2])}
    check_layer_finite(0, [1.0, 0.5], good)
    check_layer_finite(0, [], good)
    with pytest.raises(NonFiniteError, match="^layer 7: calibration loss is nan in epoch 1"):
        check_layer_finite(7, [1.0, math.nan], good)
    with pytest.raises(NonFiniteError, match="^layer 2: calibration loss is inf"):
        check_layer_finite(2, [math.inf], good)
    with pytest.raises(NonFiniteError, match="^layer 3: learned parameter 'ln.left' holds NaN"):
        check_layer_finite(3, [1.0], {"ln.left": torch.tensor([0.0, math.nan])})
    assert issubclass(NonFiniteError, ValueError)  # the CLI turns it into one line and exit 2


def test_binary_data_file_is_named(tmp_path):
    b = tmp_path / "binary.txt"
    b.write_bytes(b"ok \xd0\x00\xff\xfe binary")
    with pytest.raises(DataError, match=r"binary.txt is not UTF-8 text"):
        load_texts(str(b), "test")
    j = tmp_path / "binary.jsonl"
    j.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"binary.jsonl is not UTF-8 text"):
        load_texts(str(j), "train")


def test_check_source_and_same_file(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    check_source(str(tmp_path / "a.txt"))
    check_source("wiki-offline")
    with pytest.raises(DataError, match="^--eval-data: data file .*missing.txt does not exist"):
        check_source(str(tmp_path / "missing.txt"), "--eval-data")
    with pytest.raises(DataError, match="is a folder"):
        check_source(str(tmp_path))
    with pytest.raises(DataError, match="^--data: unknown data source"):
        check_source("nonsense", "--data")
    assert same_local_file(str(tmp_path / "a.txt"), str(tmp_path / "." / "a.txt"))
    assert not same_local_file(str(tmp_path / "a.txt"), "wiki-offline")
    assert not same_local_file("wiki-offline", "wiki-offline")  # the built-in corpus is split by title


def test_truncated_gguf_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATQUANT_CACHE", str(tmp_path / "cache"))
    good = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    for n in (3000, len(good) * 2 // 3):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(good[:n])
        with pytest.raises(hf.ModelLoadError, match=rf"cut{n}.gguf is truncated or corrupt"):
            hf.load(str(cut))


def test_partial_or_damaged_conversion_cache_is_rebuilt(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FLATQUANT_CACHE", str(tmp_path / "cache"))
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    w1, tok = hf.load(str(src))
    (cdir,) = (tmp_path / "cache" / "models").iterdir()
    assert (cdir / "complete").is_file()
    t = torch.tensor([tok("hello").input_ids])
    from flatquant.models.model import forward

    ref = forward(w1, t)
    # interrupted while writing: the marker is missing and a weight file is cut short
    (cdir / "complete").unlink()
    for f in cdir.rglob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    w2, _ = hf.load(str(src))
    torch.testing.assert_close(forward(w2, t), ref)
    assert (cdir / "complete").is_file()
    # damaged after it was complete: detected, a warning names the cache, and it is rebuilt
    for f in cdir.rglob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        w3, _ = hf.load(str(src))
        torch.testing.assert_close(forward(w3, t), ref)
    assert str(cdir) in caplog.text and "damaged" in caplog.text
