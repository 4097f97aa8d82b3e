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


def test_method_flags_come_from_the_registry():
    from flatquant.calib.methods import DEFAULT_METHOD, METHODS, UNQUANTIZED, method_names
    from flatquant.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices
    flag = {name: {a.dest: a for a in sub[name]._actions} for name in ("calibrate", "eval", "compare")}
    assert tuple(flag["calibrate"]["method"].choices) == method_names(quantize=True)
    assert flag["calibrate"]["method"].default == DEFAULT_METHOD
    assert all(METHODS[n].summary in flag["calibrate"]["method"].help for n in method_names(quantize=True))
    assert tuple(flag["eval"]["method"].choices) == method_names(data_free=True) == ("fp", "rtn", "quarot")
    assert flag["eval"]["method"].default == UNQUANTIZED
    assert flag["compare"]["methods"].default.split(",") == list(METHODS)


def test_compare_refuses_an_unknown_method(capsys):
    from flatquant.cli import main

    assert main(["compare", "--methods", "rtn,nope", "--out", "o"]) == 2
    assert "unknown method 'nope'; choose one of fp, rtn, smoothquant, quarot, flatquant" in capsys.readouterr().err


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


@pytest.fixture(scope="module")
def calibrated(tiny, tmp_path_factory):
    """Transforms calibrated (in process) on the tiny model, and a checkpoint exported from them."""
    import os

    from flatquant.cli import main

    root, folder, data = tiny
    work = tmp_path_factory.mktemp("calibrated")
    old = os.environ.get("FLATQUANT_CACHE")
    os.environ["FLATQUANT_CACHE"] = str(root / "c")
    try:
        assert main(["calibrate", "--model", str(folder), "--device", "cpu", "--data", str(data), "--nsamples", "4",
                     "--seqlen", "32", "--epochs", "1", "--out", str(work / "tr")]) == 0
        assert main(["export", "--transforms", str(work / "tr"), "--out", str(work / "ck")]) == 0
    finally:
        if old is None:
            os.environ.pop("FLATQUANT_CACHE")
        else:
            os.environ["FLATQUANT_CACHE"] = old
    return work / "tr", work / "ck"


def _main_error(argv: list[str], capsys) -> str:
    """Run the CLI in process; it must fail with exit 2 and exactly one error line (returned)."""
    from flatquant.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("flatquant: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv,message", [
    (["eval", "--method", "rtn", "--w-bits", "0"], "--w-bits 0: widths are 2-8, or 16"),
    (["eval", "--method", "rtn", "--a-bits", "9"], "--a-bits 9: widths are 2-8, or 16"),
    (["eval", "--method", "rtn", "--w-groupsize", "0"], "--w-groupsize 0: a group size must be >= 1"),
    (["eval", "--eval-seqlen", "1"], "--eval-seqlen: the evaluation window length must be >= 2 tokens, got 1"),
    (["eval", "--eval-windows", "0"], "--eval-windows: the number of evaluation windows must be >= 1"),
    (["eval", "--real", "--checkpoint", "ck", "--eval-windows", "0"], "--eval-windows"),
    (["calibrate", "--seqlen", "1", "--out", "o"], "--seqlen: seqlen must be an integer >= 2, got 1"),
    (["calibrate", "--lr", "nan", "--out", "o"], "--lr: lr must be a finite number > 0, got nan"),
    (["calibrate", "--lr", "inf", "--out", "o"], "--lr: lr must be a finite number > 0, got inf"),
    (["calibrate", "--epochs", "-1", "--out", "o"], "--epochs: epochs must be an integer >= 0"),
    (["calibrate", "--out", "o", "--eval", "--eval-data", "missing.txt"], "--eval-data: data file missing.txt does "
                                                                          "not exist"),
    (["calibrate", "--out", "o", "--data", "missing.jsonl"], "--data: data file missing.jsonl does not exist"),
    (["compare", "--methods", "flatquant", "--out", "o", "--data", "nope"], "--data: unknown data source 'nope'"),
    (["generate", "--model", "m", "--prompt", "x", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["generate", "--model", "m", "--prompt", "x", "--temperature", "-1"], "temperature must be a finite number"),
    (["generate", "--model", "m", "--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    (["generate", "--prompt", "x"], "generate needs --checkpoint CKPT"),
    (["export", "--transforms", "t", "--out", "o", "--shard-gb", "0"], "--shard-gb 0"),
    (["lm-eval", "--checkpoint", "ck", "--limit", "0"], "--limit 0: must be >= 1"),
])
def test_bad_options_are_refused_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    """Each is refused in one line with exit 2, before the (here missing) model or checkpoint is even looked at."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLATQUANT_CACHE", str(tmp_path / "c"))
    model = [] if argv[0] in ("generate", "export", "lm-eval") else ["--model", str(tmp_path / "no-model")]
    line = _main_error([*argv, *model, "--device", "cpu"] if argv[0] != "export" else argv, capsys)
    assert message in line
    assert not (tmp_path / "o").exists()


def test_bad_eval_data_fails_before_calibration(tiny, tmp_path, monkeypatch, capsys):
    root, folder, data = tiny
    monkeypatch.setenv("FLATQUANT_CACHE", str(root / "c"))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xd0\x9f\xd1\x80\xff\xfe\x00 text")
    line = _main_error(["calibrate", "--model", str(folder), "--device", "cpu", "--data", str(data), "--nsamples", "4",
                        "--seqlen", "32", "--epochs", "1", "--out", str(tmp_path / "o"), "--eval", "--eval-data",
                        str(binary)], capsys)
    assert str(binary) in line and "not UTF-8 text" in line
    assert not (tmp_path / "o" / "layers").exists() or not any((tmp_path / "o" / "layers").iterdir())
    line = _main_error(["eval", "--model", str(folder), "--device", "cpu", "--eval-data", str(binary)], capsys)
    assert str(binary) in line


def test_same_file_for_calibration_and_evaluation_warns(tiny, tmp_path, monkeypatch, capsys, caplog):
    root, folder, data = tiny
    monkeypatch.setenv("FLATQUANT_CACHE", str(root / "c"))
    other = tmp_path / "held_out.txt"
    other.write_text("held out text")
    common = ["calibrate", "--model", str(tmp_path / "no-model"), "--device", "cpu", "--out", str(tmp_path / "o"),
              "--data", str(data), "--eval"]
    with caplog.at_level("WARNING"):
        _main_error([*common, "--eval-data", str(other)], capsys)  # then fails on the missing model
        assert "same file" not in caplog.text
        line = _main_error([*common, "--eval-data", str(Path(data).parent / "." / Path(data).name)], capsys)
    assert "no-model" in line
    assert "--data and --eval-data are the same file" in caplog.text


def test_eval_transforms_uses_the_recorded_model(tiny, calibrated, tmp_path, monkeypatch, capsys):
    from flatquant.cli import main

    root, folder, data = tiny
    tr, _ = calibrated
    monkeypatch.setenv("FLATQUANT_CACHE", str(root / "c"))
    monkeypatch.chdir(tmp_path)  # the recorded path is absolute
    ev = ["eval", "--device", "cpu", "--transforms", str(tr), "--eval-data", str(data), "--eval-seqlen", "64"]
    assert main([*ev, "--out", str(tmp_path / "a")]) == 0  # no --model: the recorded one, not smollm2-135m
    assert main([*ev, "--model", str(folder), "--out", str(tmp_path / "b")]) == 0
    ppl = [json.loads((tmp_path / x / "results.json").read_text())["rows"][0]["ppl"] for x in "ab"]
    assert ppl[0] == ppl[1]
    moved = tmp_path / "moved"
    moved.mkdir()
    meta = json.loads((tr / "transforms.json").read_text())
    assert meta["source_model"] == str(folder.resolve())
    (moved / "transforms.json").write_text(json.dumps({**meta, "source_model": str(tmp_path / "gone")}))
    (moved / "transforms.safetensors").write_bytes((tr / "transforms.safetensors").read_bytes())
    line = _main_error(["eval", "--device", "cpu", "--transforms", str(moved)], capsys)
    assert "gone" in line and "pass --model" in line


def test_plot_with_transforms(tiny, calibrated, tmp_path, monkeypatch, caplog):
    """``flatquant plot`` (its command line lives in cli.py): the FlatQuant curves join the baselines."""
    pytest.importorskip("matplotlib")
    from flatquant.cli import build_parser, main

    a = build_parser().parse_args(["plot", "--out", "x", "--layers", "0,-1", "--nsamples", "2"])
    assert (a.layers, a.nsamples, a.sites, a.reduce, a.preset) == ("0,-1", 2, "qkv,down", "max", "w4a4kv4")
    root, folder, data = tiny
    tr, _ = calibrated
    monkeypatch.setenv("FLATQUANT_CACHE", str(root / "c"))
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        assert main(["plot", "--model", str(folder), "--transforms", str(tr), "--data", str(data),
                     "--nsamples", "2", "--seqlen", "16", "--out", str(out), "--device", "cpu", "--layers", "1"]) == 0
    assert "FlatQuant transforms from" in caplog.text and "'flatquant':" in caplog.text
    assert (out / "flatness.png").stat().st_size > 10_000 and (out / "mse.png").stat().st_size > 10_000


def test_generate_without_checkpoint_runs_the_fp_model(tiny, monkeypatch, capsys):
    import torch

    from flatquant.cli import main
    from flatquant.models.hf import load
    from flatquant.models.model import forward

    root, folder, data = tiny
    monkeypatch.setenv("FLATQUANT_CACHE", str(root / "c"))
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--prompt", "The quick", "--max-new-tokens", "6",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    w, tok = load(str(folder))
    ids = tok("The quick", return_tensors="pt").input_ids
    new: list[int] = []
    for _ in range(6):  # greedy with the functional FP forward, no cache
        nxt = int(forward(w, torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1))[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
    assert out == "The quick" + tok.decode(new, skip_special_tokens=True) + "\n"


def test_missing_tokenizer_hint_works_for_generate(tiny, calibrated, tmp_path, monkeypatch, capsys):
    import shutil

    from flatquant.cli import main

    root, folder, data = tiny
    _, ck = calibrated
    monkeypatch.setenv("FLATQUANT_CACHE", str(root / "c"))
    bare = tmp_path / "bare"
    shutil.copytree(ck, bare)
    shutil.rmtree(bare / "tokenizer")
    gen = ["generate", "--checkpoint", str(bare), "--prompt", "The quick", "--max-new-tokens", "3", "--device", "cpu"]
    line = _main_error(gen, capsys)
    assert "holds no tokenizer" in line and "pass --model" in line
    assert main([*gen, "--model", str(folder)]) == 0  # the hint works
    assert capsys.readouterr().out.startswith("The quick")


def test_nan_perplexity_is_an_error(tiny, calibrated, tmp_path, monkeypatch, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    root, folder, data = tiny
    tr, _ = calibrated
    monkeypatch.setenv("FLATQUANT_CACHE", str(root / "c"))
    bad = tmp_path / "nan"
    shutil.copytree(tr, bad)
    t = load_file(str(bad / "transforms.safetensors"))
    diag = t["layers.1.down_trans.diag"]
    t["layers.1.down_trans.diag"] = diag * 0.0  # finite in the file; folding divides by it: inf/NaN forward
    save_file(t, str(bad / "transforms.safetensors"))
    argv = ["eval", "--device", "cpu", "--transforms", str(bad), "--eval-data", str(data), "--eval-seqlen", "64"]
    assert "non-finite loss" in _main_error(argv, capsys)
    t["layers.1.down_trans.diag"] = diag * float("nan")  # NaN in the file itself: refused when loading it
    save_file(t, str(bad / "transforms.safetensors"))
    assert "NaN/inf" in _main_error(argv, capsys)


def test_truncated_gguf_is_named(tiny, tmp_path, monkeypatch, capsys):
    from tests.test_validation import write_tiny_gguf

    monkeypatch.setenv("FLATQUANT_CACHE", str(tmp_path / "c"))
    good = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    cut = tmp_path / "truncated.gguf"
    cut.write_bytes(good[: len(good) // 2])
    line = _main_error(["eval", "--model", str(cut), "--device", "cpu"], capsys)
    assert f"{cut} is truncated or corrupt" in line


def test_help_imports_no_triton_and_registers_no_op():
    """``flatquant --help`` (and any subcommand's) loads neither Triton nor the custom ops (a fresh interpreter)."""
    code = ("import sys, flatquant.cli as c\n"
            "for argv in (['--help'], ['generate', '--help'], ['export', '--help']):\n"
            "    try:\n        c.main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('triton', 'flatquant.ops', 'flatquant.models.real') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_calibration_is_deterministic_unless_asked_otherwise():
    from flatquant.cli import build_parser, calib_config_from_args

    parse = build_parser().parse_args
    assert calib_config_from_args(parse(["calibrate", "--out", "x"])).deterministic
    assert not calib_config_from_args(parse(["calibrate", "--out", "x", "--nondeterministic"])).deterministic
