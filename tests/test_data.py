from __future__ import annotations

import pytest
import torch

from flatquant.data import DataError, calibration_windows, eval_windows, load_texts, tokenize_corpus


class _Tok:
    def __call__(self, text, add_special_tokens=True):
        class R:
            input_ids = [ord(c) % 50 + 3 for c in text]

        return R()


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert load_texts(str(tmp_path / "a.txt"), "test") == ["hello world"]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert load_texts(str(tmp_path / "b.jsonl"), "train") == ["one", "two"]
    (tmp_path / "c.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match="c.jsonl:1"):
        load_texts(str(tmp_path / "c.jsonl"), "train")
    with pytest.raises(DataError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"), "train")
    with pytest.raises(DataError, match="unknown data source"):
        load_texts("nonsense", "train")


def test_tokenize_prepends_bos_once(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    t = tokenize_corpus(str(tmp_path / "a.txt"), "test", _Tok(), bos_token_id=1)
    assert t[0] == 1 and t.numel() == 4


def test_windows():
    t = torch.arange(10)
    assert eval_windows(t, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert eval_windows(t, 3, max_windows=1).shape == (1, 3)
    with pytest.raises(DataError, match="fewer than one window"):
        eval_windows(t, 11)
    a = calibration_windows(torch.arange(100), 4, 8, seed=3)
    assert torch.equal(a, calibration_windows(torch.arange(100), 4, 8, seed=3)) and a.shape == (4, 8)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)


def test_embedded_corpus_split_is_disjoint_and_sized():
    test = load_texts("wiki-offline", "test")
    train = load_texts("wiki-offline", "train")
    assert not set(test) & set(train)
    assert 900 < len(test) < 1100 and len(train) > 8000
