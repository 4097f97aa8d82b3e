"""Accuracy table: FP, RTN, SmoothQuant-style, QuaRot-style and FlatQuant at several bit settings.

Runs ``flatquant compare`` (resumable) and writes ``bench/results/accuracy_<name>.json`` and ``.md``.

    python bench/accuracy.py --name smollm2_4ep --epochs 4 --device cuda -- [extra compare flags]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment  # noqa: E402

from flatquant.cli import main as cli_main  # noqa: E402


def markdown(rows: list[dict], meta: dict) -> str:
    """A markdown table of the compare results (PPL and ratio to FP)."""
    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    out = [f"Model `{meta.get('model')}`, eval `{meta.get('eval_data')}` first {meta.get('eval_windows')} windows × "
           f"{meta.get('eval_seqlen')} tokens; calibration {json.dumps(meta.get('calib'))}", "",
           "| method | bits | weights | PPL | × FP | calib s |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ppl'] / fp:.3f}" if fp else "-"
        out.append(f"| {r['method']} | {r['bits']} | {r.get('weights', '-')} | {r['ppl']:.3f} | {ratio} | "
                   f"{r['calib_seconds']:.0f} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="result file stem")
    ap.add_argument("--methods", default="fp,rtn,smoothquant,quarot,flatquant")
    ap.add_argument("--presets", default="w4a4kv4,w4a16")
    ap.add_argument("--epochs", default="15")
    ap.add_argument("--weight-quants", default="rtn,gptq", help="weight quantizers (rows share calibrations)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default="runs/accuracy", help="work directory (resumable)")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("extra", nargs="*", help="more `flatquant compare` flags (after --)")
    a = ap.parse_args()
    work = Path(a.work) / a.name
    rc = cli_main(["compare", "--methods", a.methods, "--presets", a.presets, "--epochs", a.epochs,
                   "--weight-quants", a.weight_quants,
                   "--device", a.device, "--out", str(work), *a.extra])
    if rc:
        return rc
    res = json.loads((work / "results.json").read_text())
    rows = [{k: v for k, v in r.items() if k != "key"} for r in res["rows"]]
    meta = {k: v for k, v in res.items() if k != "rows"}
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"accuracy_{a.name}.json").write_text(json.dumps({"env": environment(), "meta": meta, "rows": rows},
                                                            indent=1))
    md = markdown(rows, meta)
    (out / f"accuracy_{a.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
