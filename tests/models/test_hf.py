"""Loading: our functional forward equals transformers' model; clear errors for bad sources."""

from __future__ import annotations

import pytest
import torch

from flatquant.models import hf
from flatquant.models.model import forward


def _tiny_hf(arch: str):
    import transformers

    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       rope_theta=10000.0)
        return transformers.LlamaForCausalLM(cfg)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                                       num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=64,
                                       tie_word_embeddings=True)
        return transformers.Qwen2ForCausalLM(cfg)
    if arch == "qwen3":
        cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                                       num_attention_heads=5, num_key_value_heads=1, head_dim=8,
                                       max_position_embeddings=64, tie_word_embeddings=True)
        return transformers.Qwen3ForCausalLM(cfg)
    cfg = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.MistralForCausalLM(cfg)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_forward_matches_transformers(arch):
    torch.manual_seed(0)
    m = _tiny_hf(arch).eval()
    if arch == "qwen2":
        for layer in m.model.layers:  # biases are zero-initialised; make them matter
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(lin.bias, std=0.5)
    w = hf.weights_from_hf(m, hf.args_from_config(m.config))
    assert w.args.qkv_bias == (arch == "qwen2")
    tok = torch.randint(0, 64, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(forward(w, tok), m(tok).logits, rtol=1e-4, atol=1e-4)


def test_unsupported_architecture_is_named():
    import transformers

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)
    with pytest.raises(hf.ModelLoadError, match="unsupported architecture 'gpt2'.*llama"):
        hf.args_from_config(cfg)


def test_family_options_come_from_the_family_table(monkeypatch):
    """``args_from_config`` sets each family's options from ``FAMILIES`` (plus ``attention_bias`` for q/k/v biases),
    and loads every declared ``LAYER_TENSORS`` entry under its HF name."""
    import transformers

    from flatquant.models.args import FAMILIES, LAYER_TENSORS, Family

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2)
    for cfg, bias, norm in ((transformers.LlamaConfig(**kw), False, False),
                            (transformers.LlamaConfig(**kw, attention_bias=True), True, False),
                            (transformers.Qwen2Config(**kw), True, False),
                            (transformers.Qwen3Config(**kw), False, True)):
        args = hf.args_from_config(cfg)
        assert (args.qkv_bias, args.qk_norm) == (bias, norm)
    monkeypatch.setitem(FAMILIES, "mistral", Family(qk_norm=True))  # a row edited: the loader follows it
    assert hf.args_from_config(transformers.MistralConfig(**kw)).qk_norm
    qwen3 = hf.args_from_config(transformers.Qwen3Config(**kw))
    assert all(hf.hf_layer_names(qwen3)[e.hf_name] == e.name for e in LAYER_TENSORS if e.present(qwen3))
    llama = hf.args_from_config(transformers.LlamaConfig(**kw))
    assert not {e.hf_name for e in LAYER_TENSORS} & set(hf.hf_layer_names(llama))  # only its own family's


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(hf.ModelLoadError, match="does not exist"):
        hf.resolve_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(hf.ModelLoadError, match="no config.json"):
        hf.resolve_source(str(tmp_path / "empty"))
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(hf.ModelLoadError, match="gguf"):
        hf.resolve_source(str(tmp_path / "x.bin"))


def test_local_folder_is_read_lazily(tmp_path, monkeypatch):
    from flatquant.models.lazy import LazyLayers
    from tests.test_cli import make_tiny_hf_folder

    monkeypatch.setenv("FLATQUANT_CACHE", str(tmp_path / "cache"))
    folder = make_tiny_hf_folder(tmp_path / "model")
    w1, tok = hf.load(str(folder))
    w2, _ = hf.load(str(folder))
    assert isinstance(w1.layers, LazyLayers) and not (tmp_path / "cache").exists()  # no conversion copy
    t = torch.tensor([tok("hello world").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(forward(w1, t), forward(w2, t))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_sharded_bf16_folder_matches_transformers(tmp_path, arch):
    """A sharded bf16 safetensors folder with its index, read layer by layer in bf16, equals transformers."""
    from flatquant.models.lazy import LazyLayers

    torch.manual_seed(0)
    m = _tiny_hf(arch).eval()
    if arch == "qwen2":
        for layer in m.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(lin.bias, std=0.5)
    if arch == "qwen3":  # q/k norm weights far from 1, read from the folder like every other layer tensor
        for layer in m.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                torch.nn.init.normal_(norm.weight, mean=1.0, std=0.5)
    m = m.to(torch.bfloat16)
    m.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    cfg = m.config
    w = hf.lazy_weights(tmp_path / "m", cfg, hf.args_from_config(cfg))
    assert isinstance(w.layers, LazyLayers) and len({e[1] for layer in w.layers.entries for e in layer}) > 2
    assert all(v.dtype == torch.bfloat16 for v in w.layers[1].values())  # the checkpoint's dtype at rest
    assert all(v.dtype == torch.float32 for v in w.to(dtype=torch.float32).layers[1].values())
    tok = torch.randint(0, 64, (2, 17))
    with torch.no_grad():
        ref = m.float()(tok).logits
        torch.testing.assert_close(forward(w.to(dtype=torch.float32), tok), ref, rtol=1e-4, atol=1e-4)


def test_conversion_cache_is_per_layer_and_exact(tmp_path):
    """The GGUF conversion cache: one file per layer, 16-bit where that is exact, read back lazily and equal."""
    from safetensors import safe_open

    from flatquant.models.random import random_weights
    from tests.helpers import TINY

    w = random_weights(TINY, generator=torch.Generator().manual_seed(0))  # fp32 values: not 16-bit exact
    w = w.with_layers([{k: (v.bfloat16().float() if i == 0 else v) for k, v in p.items()}
                       for i, p in enumerate(w.layers)])
    hf._save_cache(tmp_path, w)
    assert sorted(p.name for p in (tmp_path / "layers").iterdir()) == ["layer_000.safetensors",
                                                                       "layer_001.safetensors"]
    with safe_open(str(tmp_path / "layers" / "layer_000.safetensors"), "pt") as f:
        assert f.get_slice("q_proj.weight").get_dtype() == "BF16"
    with safe_open(str(tmp_path / "layers" / "layer_001.safetensors"), "pt") as f:
        assert f.get_slice("q_proj.weight").get_dtype() == "F32"
    back = hf._load_cache(tmp_path).to(dtype=torch.float32)
    for a, b in zip(w.layers, back.layers, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(w.top[k], back.top[k]) for k in w.top)


@pytest.mark.slow
def test_real_smollm2_matches_transformers(tmp_path):
    """The embedded SmolLM2-135M: our forward equals transformers' on a real prompt."""
    from transformers import AutoModelForCausalLM

    w, tok = hf.load("smollm2-135m")
    folder, gguf = hf.resolve_source("smollm2-135m")
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = forward(w, ids)
        torch.testing.assert_close(ours, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert tok.decode(ours[0, -1].argmax()).strip() == "Berlin"
