"""The offline cloze task builds from a corpus, and lm-eval runs it on a tiny model, fake and real path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flatquant.evaluation.lmeval import CLOZE_TASK, cloze_examples, write_cloze_task
from tests.test_cli import TEXT, make_tiny_hf_folder

DOCS = [TEXT[i * 700:(i + 1) * 700 + 300] for i in range(6)]


def test_cloze_examples_are_last_word_cloze() -> None:
    ex = cloze_examples(DOCS, n_docs=4)
    assert len(ex) == 4
    for e in ex:
        assert e["target"].isalpha() and len(e["target"]) >= 3
        assert f" {e['target']}" in f" {e['context']}"  # predictable from the context (LAMBADA-style filter)
        assert not e["context"].endswith(e["target"])


def test_task_files(tmp_path: Path) -> None:
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    folder = write_cloze_task(tmp_path / "task", source=str(corpus), n_docs=3)
    assert len((folder / "cloze.jsonl").read_text().splitlines()) == 3
    assert f"task: {CLOZE_TASK}" in (folder / f"{CLOZE_TASK}.yaml").read_text()


def test_lm_eval_runs_cloze_fake_and_real(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("lm_eval")
    from flatquant.calib.config import CalibConfig
    from flatquant.calib.loop import calibrate, reparameterize
    from flatquant.calib.methods import method_config
    from flatquant.evaluation.lmeval import run_lm_eval
    from flatquant.models.hf import load
    from flatquant.models.hf_real import FakeModel, FlatQuantForCausalLM
    from flatquant.models.real.checkpoint import export_checkpoint, load_checkpoint
    from flatquant.presets import bits_preset
    from tests.helpers import tokens

    monkeypatch.setenv("FLATQUANT_CACHE", str(tmp_path / "cache"))
    weights, tok = load(str(make_tiny_hf_folder(tmp_path / "model")))
    q, t = bits_preset("w4a4kv4"), method_config("flatquant")
    flats = calibrate(weights, tokens(4, 16), q, t, CalibConfig(nsamples=4, seqlen=16, batch_size=2, epochs=1))
    export_checkpoint(weights, flats, q, t, tmp_path / "ck", tokenizer=tok)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    results = {}
    for name, model in (("fake", FakeModel(reparameterize(weights, flats, q, t), q)),
                        ("real", load_checkpoint(tmp_path / "ck"))):
        res = run_lm_eval(FlatQuantForCausalLM.wrap(model, tok), tok, [CLOZE_TASK], workdir=tmp_path / name,
                          cloze_source=str(corpus), cloze_docs=4)
        results[name] = res[CLOZE_TASK]
        assert 0.0 <= res[CLOZE_TASK]["acc,none"] <= 1.0
    assert results["fake"]["perplexity,none"] == pytest.approx(results["real"]["perplexity,none"], rel=1e-3)
