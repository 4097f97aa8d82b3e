"""``flatquant.ops._register.register_op``: a toy op under the test-only ``flatquant_test`` namespace (schema,
docstring, which function each path calls, the fake under ``FakeTensorMode`` and ``torch.compile``, opcheck), then
every ``flatquant::`` op's CUDA registration, run on CPU tensors through the dispatcher's CUDA key (the launchers
run Triton's interpreter on CPU tensors)."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import flatquant.ops as ops
from flatquant.ops import _launch
from flatquant.ops import reference as ref
from flatquant.ops._register import register_op
from flatquant.ops.kron_quant import kron_quant_multi_triton, kron_quant_triton
from flatquant.ops.kv_attention import kv4_decode_attention_triton
from flatquant.ops.kv_quant import kv_quant_triton
from flatquant.ops.matmul import w4a4_triton, w4a8_triton, w8a8_triton
from flatquant.ops.pack import pack_int4_triton, unpack_int4_triton

from ._util import CUDA

_names = itertools.count()
CUDA_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def _toy(calls: list[tuple[str, Any]], **kw: Any) -> tuple[str, Any]:
    """Register ``flatquant_test::toy<n>``: ``x * alpha (+ y)``; each path appends (path, arguments) to calls."""
    name = f"toy{next(_names)}"

    def fake(x: Tensor, alpha: float, **rest: Any) -> Tensor:
        calls.append(("fake", (alpha, sorted(rest))))
        return torch.empty_like(x)

    def cuda(*args: Any, **kwargs: Any) -> Tensor:
        calls.append(("cuda", (args[1:], kwargs)))
        return args[0] * args[2] + 1

    @register_op(f"flatquant_test::{name}", **{"cuda": cuda, "fake": fake, **kw})
    def toy(x: Tensor, y: Tensor | None, alpha: float = 2.0, *, shift: int = 0) -> Tensor:
        """Toy op: ``x * alpha (+ y)``."""
        calls.append(("ref", (alpha, shift)))
        if x.dim() != 2:
            raise ValueError("x must be 2-D")
        out = x * alpha + shift
        return out if y is None else out + y

    return name, toy


def test_schema_name_and_docstring() -> None:
    name, toy = _toy([])
    schema = getattr(torch.ops.flatquant_test, name).default._schema
    assert str(schema) == f"flatquant_test::{name}(Tensor x, Tensor? y, float alpha=2., *, SymInt shift=0) -> Tensor"
    assert toy.__doc__ == "Toy op: ``x * alpha (+ y)``."


def test_mutates_args_reach_the_schema() -> None:
    name = f"toy{next(_names)}"

    @register_op(f"flatquant_test::{name}", fake=lambda **_: None, mutates_args=("x",))
    def add_(x: Tensor, y: Tensor) -> None:
        x.add_(y)

    assert str(getattr(torch.ops.flatquant_test, name).default._schema).startswith(
        f"flatquant_test::{name}(Tensor(a0!) x, Tensor y)")
    x = torch.zeros(3)
    add_(x, torch.ones(3))
    assert x.tolist() == [1.0, 1.0, 1.0]


def test_cpu_calls_the_reference() -> None:
    calls: list[tuple[str, Any]] = []
    name, toy = _toy(calls)
    x, y = torch.ones(2, 3), torch.full((2, 3), 0.5)
    assert torch.equal(toy(x, y, 3.0), torch.full((2, 3), 3.5))
    assert torch.equal(getattr(torch.ops.flatquant_test, name)(x, None, shift=1), torch.full((2, 3), 3.0))
    assert calls == [("ref", (3.0, 0)), ("ref", (2.0, 1))]
    with pytest.raises(ValueError, match="2-D"):
        toy(torch.ones(3), None)


def test_cuda_key_calls_the_cuda_kernel_with_every_argument() -> None:
    calls: list[tuple[str, Any]] = []
    name, toy = _toy(calls)
    op = getattr(torch.ops.flatquant_test, name).default
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"flatquant_test::{name}", "CUDA")
    x = torch.ones(2, 3)
    assert torch.equal(op.redispatch(CUDA_KEY, x, None), torch.full((2, 3), 3.0))  # the cuda kernel, not the ref
    op.redispatch(CUDA_KEY, x, None, 5.0, shift=2)
    # The dispatcher drops trailing defaults; the kernel gets them back from the one signature.
    assert calls == [("cuda", ((None, 2.0), {"shift": 0})), ("cuda", ((None, 5.0), {"shift": 2}))]


def test_without_cuda_kernel_the_reference_serves_cuda() -> None:
    calls: list[tuple[str, Any]] = []
    name, _ = _toy(calls, cuda=None)
    op = getattr(torch.ops.flatquant_test, name).default
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"flatquant_test::{name}", "CUDA")
    assert torch.equal(op.redispatch(CUDA_KEY, torch.ones(2, 3), None), torch.full((2, 3), 2.0))
    assert calls == [("ref", (2.0, 0))]


def test_fake_under_fake_tensor_mode_gets_arguments_by_name() -> None:
    calls: list[tuple[str, Any]] = []
    _, toy = _toy(calls)
    with FakeTensorMode():
        out = toy(torch.empty(4, 5), None)
        out2 = toy(torch.empty(2, 2), torch.empty(2, 2), alpha=0.5, shift=3)
    assert isinstance(out, FakeTensor) and out.shape == (4, 5)
    assert isinstance(out2, FakeTensor)
    assert calls == [("fake", (2.0, ["shift", "y"])), ("fake", (0.5, ["shift", "y"]))]


def test_fake_under_torch_compile() -> None:
    calls: list[tuple[str, Any]] = []
    _, toy = _toy(calls)

    def f(x: Tensor) -> Tensor:
        return toy(x, None, 4.0) + 1

    x = torch.ones(3, 2)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(x), torch.full((3, 2), 5.0))
    paths = [c[0] for c in calls]
    assert "fake" in paths and paths[-1] == "ref"


def test_opcheck() -> None:
    _, toy = _toy([])
    x = torch.randn(3, 4)
    torch.library.opcheck(toy, (x, None))
    torch.library.opcheck(toy, (x, torch.randn(3, 4), 0.5), {"shift": 2})


def test_opcheck_catches_a_wrong_fake() -> None:
    name = f"toy{next(_names)}"

    @register_op(f"flatquant_test::{name}", fake=lambda x, **_: x.new_empty(x.shape[0]))
    def bad(x: Tensor) -> Tensor:
        return x * 2

    with pytest.raises(Exception, match="(?i)shape"):
        torch.library.opcheck(bad, (torch.randn(3, 4),))


# --- the flatquant ops: the CUDA key runs the Triton launcher (interpreted on CPU tensors) ----------------------


def _kv_cache(g: torch.Generator, b: int = 2, hkv: int = 2, s: int = 5, d: int = 8) -> tuple[Tensor, ...]:
    out: list[Tensor] = []
    for _ in range(2):
        out += [torch.randint(0, 256, (b, hkv, s, d // 2), generator=g).to(torch.uint8),
                torch.rand(b, hkv, s, generator=g) + 0.1, torch.randint(0, 16, (b, hkv, s), generator=g).float()]
    return tuple(out)


def _cases() -> list[tuple[str, Callable[..., Any], tuple[Any, ...], dict[str, Any]]]:
    """(op name, launcher, op arguments without trailing defaults, defaults the launcher must receive)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 24, generator=g) * 3).to(torch.bfloat16)
    left = torch.linalg.qr(torch.randn(4, 4, generator=g))[0].to(torch.bfloat16)
    right = torch.linalg.qr(torch.randn(6, 6, generator=g))[0].to(torch.bfloat16)
    codes = torch.randint(-8, 8, (3, 10), generator=g, dtype=torch.int8)
    a4 = ref.pack_int4_ref(torch.randint(-8, 8, (3, 32), generator=g, dtype=torch.int8))
    w4 = ref.pack_int4_ref(torch.randint(-8, 8, (5, 32), generator=g, dtype=torch.int8))
    a8 = torch.randint(-128, 128, (3, 32), generator=g, dtype=torch.int8)
    w8 = torch.randint(-128, 128, (5, 32), generator=g, dtype=torch.int8)
    sa, sw = torch.rand(3, generator=g), torch.rand(5, generator=g)
    q = torch.randn(2, 4, 8, generator=g)
    start, length = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([5, 3], dtype=torch.int32)
    return [
        ("kron_quant", kron_quant_triton, (x, left, right, torch.tensor([0.9, 0.8]), 4), {"bits": 4, "pack": True}),
        ("kron_quant_multi", kron_quant_multi_triton, (x, None, right, torch.tensor([[0.9, 0.8], [1.0, 1.0]]), 4),
         {"bits": 4, "pack": True}),
        ("kv_quant", kv_quant_triton, (x.view(3, 2, 12), right.new_ones(12, 12), torch.tensor([0.9, 0.8])),
         {"bits": 4}),
        ("kv4_decode_attention", kv4_decode_attention_triton, (q, *_kv_cache(g), start, length, 8 ** -0.5), {}),
        ("pack_int4", pack_int4_triton, (codes,), {}),
        ("unpack_int4", unpack_int4_triton, (ref.pack_int4_ref(codes),), {"signed": True}),
        ("w4a4_matmul", w4a4_triton, (a4, sa, w4, sw, None, torch.bfloat16), {}),
        ("w4a8_matmul", w4a8_triton, (a8, sa, ref.halves_layout_ref(w4), sw, sw.half(), torch.float32), {}),
        ("w8a8_matmul", w8a8_triton, (a8, sa, w8, sw, None, torch.float16), {}),
    ]


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


@pytest.mark.skipif(CUDA, reason="GPU present: the CUDA kernels are tested natively (no interpreter mixing)")
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_flatquant_cuda_key_runs_the_triton_launcher(case: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    name, launcher, args, defaults = case
    launched: list[str] = []

    def counting(kernel: Any) -> Any:
        launched.append(_launch._raw_fn(kernel).__name__)
        return _launch.cpu_kernel(kernel)

    for mod in ("kron_quant", "kv_quant", "kv_attention", "pack", "matmul", "gemv"):
        monkeypatch.setattr(sys.modules[f"flatquant.ops.{mod}"], "cpu_kernel", counting)
    got = getattr(torch.ops.flatquant, name).default.redispatch(CUDA_KEY, *args)
    assert launched, "no Triton kernel ran on the CUDA key"
    n = len(launched)
    assert _equal(got, launcher(*args, *defaults.values()))
    assert len(launched) == 2 * n  # the direct launcher call launched the same kernels
    assert launched[:n] == launched[n:]


@pytest.mark.skipif(CUDA, reason="GPU present: the CUDA kernels are tested natively (no interpreter mixing)")
def test_flatquant_cuda_key_validates() -> None:
    """The checks of each op's CPU path also guard its CUDA path."""
    cases = {c[0]: c[2] for c in _cases()}

    def u8(*shape: int) -> Tensor:
        return torch.zeros(shape, dtype=torch.uint8)

    def i8(*shape: int) -> Tensor:
        return torch.zeros(shape, dtype=torch.int8)

    def ones(n: int) -> Tensor:
        return torch.ones(n)

    bad: list[tuple[str, tuple[Any, ...], str]] = [
        ("pack_int4", (cases["pack_int4"][0][:, :9],), "even"),
        ("kron_quant", (*cases["kron_quant"][:4], 5), "n1"),
        ("kron_quant_multi", (*cases["kron_quant_multi"][:3], torch.tensor([0.9, 0.8]), 4), "clips"),
        ("kv_quant", (*cases["kv_quant"], 8), "bits"),
        ("kv4_decode_attention", (*cases["kv4_decode_attention"][:7], torch.zeros(3, dtype=torch.int32),
                                  *cases["kv4_decode_attention"][8:]), "start"),
        # 20 tokens: past the split-K kernel (which checks its operands itself) on the CUDA path
        ("w4a4_matmul", (u8(20, 16), ones(20), u8(5, 16), ones(4), None, torch.float32), "w_scale"),
        ("w4a8_matmul", (i8(20, 32), ones(20), u8(5, 16), ones(5), None, torch.float32), "columns"),
        ("w8a8_matmul", (i8(20, 16), ones(20), i8(5, 32), ones(5), None, torch.float32), "columns"),
    ]
    for name, args, match in bad:
        op = getattr(torch.ops.flatquant, name).default
        for run in (lambda: op(*args), lambda: op.redispatch(CUDA_KEY, *args)):
            with pytest.raises(ValueError, match=match):
                run()


def test_every_flatquant_op_is_registered_by_the_helper() -> None:
    """Each public op has a fake and, except the load-time weight re-layout, a CUDA kernel."""
    names = ["kron_quant", "kron_quant_multi", "kv_quant", "kv_quant_write", "kv4_decode_attention", "pack_int4",
             "unpack_int4", "int4_halves_layout", "w4a4_matmul", "w4a8_matmul", "w8a8_matmul"]
    for name in names:
        op = getattr(ops, name)
        assert isinstance(op, torch.library.CustomOpDef) and op.__doc__ == op._init_fn.__doc__
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"flatquant::{name}", "CUDA")
        assert has_cuda == (name != "int4_halves_layout"), name
        assert op._abstract_fn is not None, name
