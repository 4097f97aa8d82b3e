"""The CLI end to end on a tiny random model saved as a real HF folder, and its error messages."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
        "All that glitters is not gold. Actions speak louder than words. ") * 60


def make_tiny_hf_folder(folder: Path, arch: str = "llama") -> Path:
    """A random 2-layer HF model plus a small BPE tokenizer trained on TEXT."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel()
    tk.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=128, n_layer=1, n_embd=32, n_head=2, bos_token_id=1, eos_token_id=2)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
        return folder
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                   max_position_embeddings=256)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _run(*args: str, env_cache: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "FLATQUANT_CACHE": str(env_cache)}
    return subprocess.run([sys.executable, "-m", "flatquant.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    folder = make_tiny_hf_folder(root / "model")
    data = root / "corpus.txt"
    data.write_text(TEXT)
    return root, folder, data


def test_calibrate_then_eval_end_to_end(tiny):
    root, folder, data = tiny
    out = root / "run"
    common = ["--model", str(folder), "--device", "cpu"]
    r = _run("calibrate", *common, "--data", str(data), "--nsamples", "4", "--seqlen", "32", "--epochs", "2",
             "--out", str(out), "--eval", "--eval-data", str(data), "--eval-seqlen", "64", env_cache=root / "c")
    assert r.returncode == 0, r.stderr
    assert "flatquant" in r.stdout and "w4a4kv4" in r.stdout
    res = json.loads((out / "results.json").read_text())
    ppl = res["rows"][0]["ppl"]
    assert ppl > 1
    assert sorted(p.name for p in (out / "layers").iterdir()) == ["layer_000.safetensors", "layer_001.safetensors"]
    r2 = _run("eval", *common, "--transforms", str(out), "--eval-data", str(data), "--eval-seqlen", "64",
              "--out", str(root / "ev"), env_cache=root / "c")
    assert r2.returncode == 0, r2.stderr
    assert json.loads((root / "ev" / "results.json").read_text())["rows"][0]["ppl"] == pytest.approx(ppl, rel=1e-5)


def test_compare_prints_table_and_resumes(tiny):
    root, folder, data = tiny
    out = root / "cmp"
    argv = ["compare", "--model", str(folder), "--device", "cpu", "--methods", "fp,rtn,smoothquant,quarot",
            "--presets", "w4a4kv4", "--data", str(data), "--nsamples", "4", "--seqlen", "32", "--eval-data",
            str(data), "--eval-seqlen", "64", "--out", str(out)]
    r = _run(*argv, env_cache=root / "c")
    assert r.returncode == 0, r.stderr
    for m in ("fp", "rtn", "smoothquant", "quarot"):
        assert m in r.stdout
    r2 = _run(*argv, env_cache=root / "c")
    assert r2.returncode == 0 and "reusing result" in r2.stderr
    assert r2.stdout == r.stdout  # the reused rows print exactly the same table
    rows1 = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows1) == 4


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("flatquant: error:")]
    assert len(lines) == 1
    return lines[0]


def test_errors_are_one_line_and_nonzero(tiny, tmp_path):
    root, folder, data = tiny
    r = _run("eval", "--model", str(tmp_path / "missing"), "--device", "cpu", env_cache=root / "c")
    assert "does not exist" in _one_error_line(r)
    gpt2 = make_tiny_hf_folder(tmp_path / "gpt2", arch="gpt2")
    r = _run("eval", "--model", str(gpt2), "--device", "cpu", env_cache=root / "c")
    assert "unsupported architecture 'gpt2'" in _one_error_line(r)
    # a transform file from another model (different hidden size)
    import transformers

    other = tmp_path / "other"
    make_tiny_hf_folder(other)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(other)
    out = tmp_path / "t"
    r = _run("calibrate", "--model", str(other), "--device", "cpu", "--data", str(data), "--nsamples", "4",
             "--seqlen", "32", "--epochs", "1", "--out", str(out), env_cache=root / "c")
    assert r.returncode == 0, r.stderr
    r = _run("eval", "--model", str(folder), "--device", "cpu", "--transforms", str(out), env_cache=root / "c")
    line = _one_error_line(r)
    assert "calibrated for another model" in line and "hidden=32" in line


def test_help_documents_every_option():
    from flatquant.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) >= {"calibrate", "eval", "compare", "demo", "plot", "export", "generate", "lm-eval"}
    for name, subparser in sub.choices.items():
        for action in subparser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


def test_export_generate_eval_real_and_lm_eval(tiny, tmp_path, monkeypatch, capsys):
    from flatquant.cli import main

    root, folder, data = tiny
    monkeypatch.setenv("FLATQUANT_CACHE", str(root / "c"))
    tr, ck = tmp_path / "tr", tmp_path / "ck"
    assert main(["calibrate", "--model", str(folder), "--device", "cpu", "--data", str(data), "--nsamples", "4",
                 "--seqlen", "32", "--epochs", "1", "--out", str(tr)]) == 0
    assert main(["export", "--transforms", str(tr), "--model", str(folder), "--out", str(ck)]) == 0
    assert (ck / "flatquant_config.json").is_file() and (ck / "tokenizer").is_dir()
    assert main(["eval", "--model", str(folder), "--device", "cpu", "--transforms", str(tr), "--eval-data", str(data),
                 "--eval-seqlen", "64", "--out", str(tmp_path / "fake")]) == 0
    assert main(["eval", "--real", "--checkpoint", str(ck), "--device", "cpu", "--eval-data", str(data),
                 "--eval-seqlen", "64", "--out", str(tmp_path / "real")]) == 0
    fake_ppl = json.loads((tmp_path / "fake" / "results.json").read_text())["rows"][0]["ppl"]
    real_ppl = json.loads((tmp_path / "real" / "results.json").read_text())["rows"][0]["ppl"]
    assert real_ppl == pytest.approx(fake_ppl, rel=1e-3)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(ck), "--prompt", "The quick", "--max-new-tokens", "5",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("The quick")
    if importlib.util.find_spec("lm_eval") is not None:
        docs = tmp_path / "docs.jsonl"
        docs.write_text("".join(json.dumps({"text": TEXT[i * 500:i * 500 + 900]}) + "\n" for i in range(4)))
        for src in (["--checkpoint", str(ck)], ["--transforms", str(tr), "--model", str(folder)]):
            assert main(["lm-eval", *src, "--device", "cpu", "--cloze-data", str(docs), "--limit", "2",
                         "--out", str(tmp_path / "lm")]) == 0
            assert "flatquant_cloze" in capsys.readouterr().out
    shard = next(ck.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    assert main(["generate", "--checkpoint", str(ck), "--prompt", "x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flatquant: error:") and "truncated" in err and len(err.strip().splitlines()) == 1


def test_compare_gptq_rows_share_the_calibration(tiny):
    root, folder, data = tiny
    out = root / "cmp_gptq"
    r = _run("compare", "--model", str(folder), "--device", "cpu", "--methods", "rtn,flatquant", "--presets",
             "w4a4kv4,w4a16", "--weight-quants", "rtn,gptq", "--data", str(data), "--nsamples", "4", "--seqlen", "32",
             "--epochs", "1", "--eval-data", str(data), "--eval-seqlen", "64", "--out", str(out), "-v",
             env_cache=root / "c")
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "results.json").read_text())["rows"]
    got = [(x["method"], x["bits"], x["weights"]) for x in rows]
    assert got == [("rtn", "w4a4kv4", "rtn"), ("flatquant", "w4a4kv4", "rtn"), ("rtn", "w4a4kv4", "gptq"),
                   ("flatquant", "w4a4kv4", "gptq"), ("rtn", "w4a16", "rtn"), ("flatquant", "w4a16", "rtn"),
                   ("rtn", "w4a16", "gptq"), ("flatquant", "w4a16", "gptq")]
    assert r.stderr.count("resumed from") == 4  # GPTQ rows reuse both layers of the RTN rows' calibrations
    assert rows[2]["ppl"] != rows[0]["ppl"]
