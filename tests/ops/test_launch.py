from __future__ import annotations

import pytest
import torch

from flatquant.ops import kron_quant, kv4_decode_attention, w4a4_gemv
from flatquant.ops._launch import PDL_MAX_ROWS, launch_options, pdl_enabled
from flatquant.ops.gemv import counter_slots, default_prefetch

CUDA = torch.cuda.is_available()


def test_pdl_is_off_on_cpu_and_when_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter gets no launch options and PDL=False; FLATQUANT_PDL=0 turns PDL off (read at each launch);
    the GEMV prefetches only for a PDL launch, 2 tiles unless FLATQUANT_GEMV_PREFETCH says otherwise."""
    cpu = torch.device("cpu")
    assert not pdl_enabled(cpu) and launch_options(cpu, 1, num_warps=4) == {"PDL": False}
    assert default_prefetch(False) == 0 and default_prefetch(True) == 2
    monkeypatch.setenv("FLATQUANT_GEMV_PREFETCH", "4")
    assert default_prefetch(False) == 0 and default_prefetch(True) == 4
    if CUDA:
        dev = torch.device("cuda")
        monkeypatch.setenv("FLATQUANT_PDL", "0")
        assert not pdl_enabled(dev) and launch_options(dev, 1, num_warps=4) == {"num_warps": 4, "PDL": False}
        monkeypatch.setenv("FLATQUANT_PDL", "1")
        if torch.cuda.get_device_capability()[0] >= 9:
            assert pdl_enabled(dev)
            assert launch_options(dev, 1, num_warps=4) == {"num_warps": 4, "PDL": True, "launch_pdl": True}
            # many token rows (prefill, batch-16 decode) launch without PDL: it was slower there on the H200
            assert launch_options(dev, PDL_MAX_ROWS + 1, num_warps=4) == {"num_warps": 4, "PDL": False}


def _chain(x: torch.Tensor, layers: list[dict], steps: int) -> torch.Tensor:  # (T, K) bf16 -> (T, K) bf16
    """Transform+quantize, GEMV, attention-free residual chain: each kernel reads what the one before wrote."""
    for _ in range(steps):
        for p in layers:
            codes, scale = kron_quant(x, p["left"], p["right"], p["clip"], p["n1"])
            x = x + w4a4_gemv(codes, scale, p["w"], p["sw"], None, torch.bfloat16, p["cnt"])
    return x


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("prefetch", ["0", "1", "2", "8"])
def test_cuda_pdl_chain_in_a_graph_equals_plain_launches(monkeypatch: pytest.MonkeyPatch, prefetch: str) -> None:
    """A CUDA graph of dependent kron_quant -> GEMV kernels (split-K with arrival counters, and the attention's
    split + combine) launched with programmatic dependent launch and the GEMV's L2 prefetch gives the same bits
    as eager launches without PDL, over several replays."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    k, t = 4096, 2  # few token rows: the launches use PDL
    layers = []
    for _ in range(3):
        w = torch.randint(0, 256, (k, k // 2), device=dev, dtype=torch.uint8, generator=g)
        layers.append({"left": torch.randn(64, 64, device=dev, generator=g).bfloat16() / 8,
                       "right": torch.randn(64, 64, device=dev, generator=g).bfloat16() / 8,
                       "clip": torch.tensor([0.9, 0.95], device=dev), "n1": 64, "w": w,
                       "sw": torch.rand(k, device=dev, generator=g) * 1e-3,
                       "cnt": torch.zeros(counter_slots(k, dev, t), dtype=torch.int32, device=dev)})
    x0 = torch.randn(t, k, device=dev, generator=g).bfloat16()
    q = torch.randn(2, 32, 128, device=dev, generator=g).bfloat16()
    kc = torch.randint(0, 256, (2, 8, 700, 64), device=dev, dtype=torch.uint8, generator=g)
    vc = torch.randint(0, 256, (2, 8, 700, 64), device=dev, dtype=torch.uint8, generator=g)
    sc = torch.rand(2, 8, 700, device=dev, generator=g) * 0.1
    zp = torch.rand(2, 8, 700, device=dev, generator=g) * 15
    start = torch.tensor([0, 5], device=dev, dtype=torch.int32)
    length = torch.tensor([700, 650], device=dev, dtype=torch.int32)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        y = _chain(x0, layers, 2)
        o = kv4_decode_attention(q * y[:, :1, None], kc, sc, zp, vc, sc, zp, start, length, 0.088)
        return y, o

    monkeypatch.setenv("FLATQUANT_PDL", "0")
    want = run()
    monkeypatch.setenv("FLATQUANT_PDL", "1")
    monkeypatch.setenv("FLATQUANT_GEMV_PREFETCH", prefetch)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = run()
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(int(p["cnt"].abs().sum()) == 0 for p in layers)
