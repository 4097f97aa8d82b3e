"""lm-eval on the fake and the real path, plus an offline zero-shot task.

``flatquant_cloze`` is a LAMBADA-style last-word cloze built at run time from the held-out split of a corpus
(default: the wiki-offline test articles; the text is never stored in the repository): per article, the first
sentences up to ``max_words`` words form a passage, the passage's last word is the target, and only passages whose
target (alphabetic, at least 3 letters) already occurs earlier in the passage are kept, as in LAMBADA's selection
of words predictable from a long context. The task is an lm-eval ``loglikelihood`` task over a local jsonl file
(``dataset_path: json``), scored like LAMBADA (``acc`` = the target is the greedy continuation; ``perplexity``).

lm-eval is optional (``pip install lm-eval``); any task lm-eval can load runs the same way.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from ..data import DEFAULT_CORPUS, DataError, load_texts

log = logging.getLogger(__name__)
CLOZE_TASK = "flatquant_cloze"
_WORD = re.compile(r"^[A-Za-z]{3,}$")


class LMEvalUnavailable(RuntimeError):
    """lm-eval is not installed."""


def cloze_examples(texts: list[str], *, n_docs: int = 500, min_words: int = 40,
                   max_words: int = 160) -> list[dict[str, str]]:
    """``[{"context", "target"}]`` LAMBADA-style examples from documents (deterministic, in document order)."""
    out = []
    for text in texts:
        sents = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
        words: list[str] = []
        passage = None
        for s in sents:
            w = s.split()
            if words and len(words) + len(w) > max_words:
                break
            words += w
            if len(words) >= min_words:
                passage = list(words)
        if passage is None:
            continue
        target = passage[-1].rstrip(".!?;:,\"')")
        context = " ".join(passage[:-1])
        if not _WORD.match(target) or re.search(rf"\b{re.escape(target)}\b", context) is None:
            continue
        out.append({"context": context, "target": target})
        if len(out) >= n_docs:
            break
    return out


def write_cloze_task(folder: Path, *, source: str = DEFAULT_CORPUS, n_docs: int = 500) -> Path:
    """Write ``cloze.jsonl`` and the lm-eval task YAML for :data:`CLOZE_TASK` into ``folder``; returns ``folder``.

    Raises:
        DataError: the corpus is unavailable or yields no examples.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ex = cloze_examples(load_texts(source, "test"), n_docs=n_docs)
    if not ex:
        raise DataError(f"{source}: no cloze examples could be built")
    data = folder / "cloze.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in ex), encoding="utf-8")
    yaml = f"""task: {CLOZE_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data.resolve()))}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    (folder / f"{CLOZE_TASK}.yaml").write_text(yaml, encoding="utf-8")
    log.info("built %d cloze examples from %s in %s", len(ex), source, data)
    return folder


def run_lm_eval(model: Any, tokenizer: Any, tasks: list[str], *, workdir: Path, limit: int | None = None,
                batch_size: int = 1, num_fewshot: int | None = None, cloze_source: str = DEFAULT_CORPUS,
                cloze_docs: int = 500) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` on an HF-compatible model (e.g. :class:`~flatquant.models.hf_real.FlatQuantForCausalLM`).

    Returns:
        ``task -> {metric: value}`` (lm-eval's ``results``, numeric entries only).

    Raises:
        LMEvalUnavailable: lm-eval is not installed.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LMEvalUnavailable("lm-eval is not installed: pip install lm-eval (or the 'eval' extra)") from None
    include = None
    if CLOZE_TASK in tasks:
        include = str(write_cloze_task(Path(workdir) / "cloze_task", source=cloze_source, n_docs=cloze_docs))
    tm = TaskManager(include_path=include) if include else TaskManager()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              max_length=model.config.max_position_embeddings)
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                                  log_samples=False, bootstrap_iters=0)
    return {t: {k: float(v) for k, v in r.items() if isinstance(v, (int, float))} for t, r in res["results"].items()}
