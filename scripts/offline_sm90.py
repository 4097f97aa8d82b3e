"""Offline sm_90 compile of the kron_quant prefill kernels (no GPU needed): for each configuration the MMA ops of the
TTGIR (``ttng.warp_group_dot`` = wgmma, ``tt.dot`` with ``versionMajor = 2`` = mma.sync), cp.async copies, the
shared memory Triton allocates, and ptxas's registers per thread and spill bytes (``ptxas -v`` on the PTX; the
launched kernel's ``n_regs`` / ``n_spills`` need a driver).

The integer arguments are specialised as a launch specialises them for LLaMA's sizes (pointers, T, n2 and the
strides divisible by 16; n1 too, unless ``--n1-odd``: 86 is not), so loads and stores vectorise as they do on the
GPU. Use the Triton of the GPU machine, e.g. an unpacked wheel: ``PYTHONPATH=/tmp/triton36 python
scripts/offline_sm90.py --tb 1 2 4 --warps 4 8`` (5-40 s per configuration on one core). ``--row-split``: the
multi_token_split kernel instead (2 row blocks, n1 odd as 86, and 3, n1 divisible by 16 as 112), e.g. ``--row-split
--warps 8 --stages 3 --glu``. ``--sass``: add a summary of the token loop's SASS (nvdisasm) to each configuration:
instructions per warp and iteration (the division fallback left out), HGMMAs, wgmma waits (``WARPGROUP.DEPBAR``)
and how many instructions issue while a wgmma is in flight (between an HGMMA and the next wait, around the back
edge), e.g. ``--row-split --sass --warps 4 8``.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# (the module, not the op of the same name that flatquant.ops exports)
kq = importlib.import_module("flatquant.ops.kron_quant")

POINTERS = {"x_ptr": "*bf16", "u_ptr": "*bf16", "l_ptr": "*bf16", "r_ptr": "*bf16", "clip_ptr": "*fp32",
            "q_ptr": "*u8", "s_ptr": "*fp32", "nw_ptr": "*bf16"}
DIVISIBLE = {"T", "n1", "n2", "stride_xt", "stride_qt", "stride_qg", "stride_sg"}


def _loop_body(sass: str) -> list[str]:
    """Opcodes (predicate dropped, modifiers kept) of the largest loop of an nvdisasm listing, without the regions
    an unconditional forward branch skips over that hold more than four calls (the division fallback of the
    codes, taken only when a token's scales leave the division-free range)."""
    lines = sass.splitlines()
    labels = {m.group(1): n for n, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    back = [(n - labels[m.group(1)], labels[m.group(1)], n) for n, line in enumerate(lines)
            if (m := re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)) and labels[m.group(1)] < n]
    if not back:
        return []
    _, start, end = max(back)
    skip: list[tuple[int, int]] = []
    for n in range(start, end):
        m = re.search(r"^\s*/\*[0-9a-f]+\*/\s+BRA\s+`\((\.L_x_\d+)\)", lines[n])
        if m and labels[m.group(1)] > n and sum("CALL" in x for x in lines[n + 1:labels[m.group(1)]]) > 4:
            skip.append((n + 1, labels[m.group(1)]))
    ops = []
    for n in range(start, end + 1):
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", lines[n])
        if m and not any(a <= n < b for a, b in skip) and "CALL" not in m.group(2):
            ops.append(m.group(2))
    return ops


def loop_summary(cubin: bytes) -> dict[str, int]:
    """SASS of the token loop: ``instructions`` per warp and iteration, ``hgmma``, ``waits`` (wgmma waits) and
    ``in_flight``: instructions issued while a wgmma of this or the previous iteration is outstanding."""
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(cubin)
        ops = _loop_body(subprocess.run([str(nvdisasm), "-c", path], capture_output=True, text=True,
                                        check=True).stdout)
    pending = False
    for op in ops:  # the state at the back edge: is a wgmma still outstanding when the next iteration starts?
        pending = (pending or op.startswith("HGMMA")) and not op.startswith("WARPGROUP.DEPBAR")
    in_flight = 0
    for op in ops:
        if op.startswith("WARPGROUP.DEPBAR"):
            pending = False
        elif op.startswith("HGMMA"):
            pending = True
        elif pending and not op.startswith("WARPGROUP"):
            in_flight += 1
    return {"instructions": len(ops), "hgmma": sum(op.startswith("HGMMA") for op in ops),
            "waits": sum(op.startswith("WARPGROUP.DEPBAR") for op in ops), "in_flight": in_flight}


def compile_sm90(kernel: Any, constants: dict[str, Any], warps: int, stages: int, n1_odd: bool,
                 sass: bool = False) -> dict[str, Any]:
    """Compile ``kernel`` (a ``triton.jit`` function) for sm_90 with ``constants`` for its constexpr arguments;
    ``sass``: add :func:`loop_summary` as ``loop``."""
    names = kernel.arg_names
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for idx, (name, param) in enumerate(zip(names, kernel.params, strict=True)):
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = constants.get(name, param.default)
            continue
        signature[name] = POINTERS.get(name, "fp32" if name == "eps" else "i32")
        if name in POINTERS or (name in DIVISIBLE and not (n1_odd and name == "n1")):
            attrs[(idx,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ttgir = compiled.asm["ttgir"]
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        Path(ptx).write_text(compiled.asm["ptx"])
        info = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", ptx, "-o", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    res: dict[str, Any] = {
        "regs": int(regs.group(1)) if regs else None,
        "spill_stores": int(spill.group(1)) if spill else None,
        "spill_loads": int(spill.group(2)) if spill else None,
        "shared": compiled.metadata.shared,
        "wgmma": len(re.findall(r"ttng\.warp_group_dot ", ttgir)),
        "mma_sync": len(re.findall(r"= tt\.dot ", ttgir)),
        "cp_async": len(re.findall(r"async_copy_global_to_local", ttgir)),
        "serialized": "C7514" in info,  # ptxas serialised the wgmmas (an accumulator read before its wait)
    }
    if sass:
        res["loop"] = loop_summary(compiled.asm["cubin"])
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tb", type=int, nargs="+", default=[1, 2, 4], help="multi_token tokens per block")
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--tile", type=int, default=128, help="padded n1 = n2")
    ap.add_argument("--prefetch", type=int, nargs="+", default=[1, 0], help="1: register prefetch, 0: stages")
    ap.add_argument("--stages", type=int, default=2, help="num_stages without register prefetch")
    ap.add_argument("--glu", action="store_true", help="the SwiGLU input (down_proj)")
    ap.add_argument("--n1-odd", action="store_true", help="n1 not divisible by 16 (86)")
    ap.add_argument("--no-baseline", action="store_true", help="skip pipelined_fastq")
    ap.add_argument("--row-split", action="store_true", help="multi_token_split only (see the module docstring)")
    ap.add_argument("--sass", action="store_true", help="summarise the token loop's SASS (see the module docstring)")
    a = ap.parse_args()
    base = {"N1P": a.tile, "N2P": a.tile, "G": 1, "GP": 2, "QMAX": 7, "PACK": True, "F32_DOT": False,
            "HAS_GLU": 2 if a.glu else 0, "INTERPRET_BF16": False}
    if a.row_split:
        print(f"# triton {triton.__version__}, {a.tile}x{a.tile} tiles, glu={a.glu}")
        for nblk, w in itertools.product((2, 3), a.warps):
            res = compile_sm90(kq._kron_quant_rowsplit_kernel, {**base, "NBLK": nblk}, w, a.stages, nblk == 2,
                               a.sass)
            print(f"multi_token_split {nblk} blocks {w}w {a.stages} stages: {res}", flush=True)
        return 0
    print(f"# triton {triton.__version__}, {a.tile}x{a.tile} tiles, glu={a.glu}, n1 odd={a.n1_odd}")
    if not a.no_baseline:
        for w in a.warps:
            res = compile_sm90(kq._kron_quant_pipe_kernel, {**base, "FAST_Q": True}, w, 1, a.n1_odd)
            print(f"pipelined_fastq {w}w: {res}", flush=True)
    for tb, w, pf in itertools.product(a.tb, a.warps, a.prefetch):
        stages = 1 if pf else a.stages
        res = compile_sm90(kq._kron_quant_tb_kernel, {**base, "TB": tb, "PREFETCH": bool(pf)}, w, stages, a.n1_odd,
                           a.sass)
        print(f"multi_token tb{tb} {w}w {'prefetch' if pf else f'{stages} stages'}: {res}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
