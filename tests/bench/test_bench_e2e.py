"""bench/bench_e2e.py on CPU: --resume (a second call keeps the measured rows and runs only the missing ones) and
--shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
TIMING = ("prefill_ms", "decode_ms_per_step", "peak_mem_gb")


def _run(out: Path, *extra: str, decode: int = 3) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "bench" / "bench_e2e.py"), "--device", "cpu", "--tiny", "--layers", "1",
           "--batches", "1", "--prefill", "8", "--decode", str(decode), "--repeats", "1", "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_resume_runs_only_missing_rows(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    first = _run(out, "--engines", "real-w4a4kv4")
    assert first.returncode == 0, first.stderr[-2000:]
    rows1 = json.loads(out.read_text())["speed"]
    assert [(r["engine"], r["batch"]) for r in rows1] == [("real-w4a4kv4", 1)]

    second = _run(out, "--engines", "real-w4a4kv4,ours-bf16", "--resume")
    assert second.returncode == 0, second.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [(r["engine"], r["batch"]) for r in res["speed"]] == [("real-w4a4kv4", 1), ("ours-bf16", 1)]
    assert all(res["speed"][0][k] == rows1[0][k] for k in TIMING)  # kept as measured, not run again
    assert "building real-w4a4kv4" not in second.stderr
    assert len(res["earlier_runs"]) == 1 and res["earlier_runs"][0]["command"]


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    assert _run(out, "--engines", "real-w4a4kv4").returncode == 0
    before = out.read_text()
    other = _run(out, "--engines", "real-w4a4kv4", "--resume", decode=4)
    assert other.returncode != 0
    assert "other settings" in other.stderr and "decode 3 there, 4 here" in other.stderr
    assert "Traceback" not in other.stderr
    assert out.read_text() == before  # nothing lost

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    broken = _run(bad, "--engines", "real-w4a4kv4", "--resume")
    assert broken.returncode != 0 and "is not a bench_e2e JSON" in broken.stderr
    for speed in ("null", '[{"batch": 1}]'):  # valid JSON of the wrong shape: one line too, no traceback
        bad.write_text(before.replace('"speed": [', f'"speed": {speed}, "x": [', 1))
        wrong = _run(bad, "--engines", "real-w4a4kv4", "--resume")
        assert wrong.returncode != 0 and "is not a bench_e2e JSON" in wrong.stderr, wrong.stderr[-2000:]
        assert "Traceback" not in wrong.stderr


def test_shape_option_and_resume(tmp_path: Path) -> None:
    """--shape picks the random model's architecture (LLaMA-2-7B: K = 11008 at down_proj, no GQA); a JSON written
    before the option existed counts as LLaMA-3-8B, and --resume refuses a different shape in one line."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_e2e
    finally:
        sys.path.remove(str(ROOT / "bench"))
    args = bench_e2e.model_args(SimpleNamespace(tiny=False, shape="llama2-7b", layers=2))
    assert (args.intermediate, args.n_kv_heads, args.n_layers) == (11008, 32, 2)
    assert bench_e2e.model_args(SimpleNamespace(tiny=False, shape="llama3-8b", layers=None)).intermediate == 14336

    out = tmp_path / "e2e.json"
    assert _run(out, "--engines", "real-w4a4kv4").returncode == 0
    res = json.loads(out.read_text())
    del res["args"]["shape"]  # as written before --shape
    out.write_text(json.dumps(res))
    again = _run(out, "--engines", "real-w4a4kv4", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    other = _run(out, "--engines", "real-w4a4kv4", "--resume", "--shape", "llama2-7b")
    assert other.returncode != 0 and "shape llama3-8b there, llama2-7b here" in other.stderr
    assert "Traceback" not in other.stderr


def test_resume_refuses_modes_that_rewrite_out(tmp_path: Path) -> None:
    """--resume with --skip-speed / --merge / --profile would rewrite --out without its rows: refused, file kept."""
    out = tmp_path / "e2e.json"
    out.write_text('{"args": {}, "speed": [{"engine": "x", "batch": 1}]}')
    before = out.read_text()
    for extra in (["--skip-speed"], ["--merge", str(out)], ["--profile"]):
        res = _run(out, "--engines", "real-w4a4kv4", "--resume", *extra)
        assert res.returncode != 0 and "does not combine" in res.stderr and "Traceback" not in res.stderr
    assert out.read_text() == before
