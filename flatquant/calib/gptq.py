"""GPTQ weight quantization on folded layers (spec §5.2), with quantized propagation between layers."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..core.quant import fake_quant_with, qparams
from ..core.spec import QuantConfig, QuantSpec
from ..models.flat import cast_folded
from ..models.layer import Params, layer_forward, quant_act
from ..models.model import ModelWeights, embed, rope_for
from ..models.sites import SITES
from .config import CalibConfig

log = logging.getLogger(__name__)
GPTQ_GROUPS = tuple(s.linears for s in SITES)  # linears sharing one input share its Hessian; sites in layer order


@torch.no_grad()
def gptq_quantize(
    w: Tensor,  # (out, in)
    hessian: Tensor,  # (in, in): 2/N Σ x xᵀ of the (quantized) layer inputs
    spec: QuantSpec,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> Tensor:
    """Quantize ``w`` column by column with second-order error feedback; returns dequantized weights."""
    W = w.detach().clone().float()
    H = hessian.detach().clone().float()
    n = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    grouped = spec.granularity == "per_group"
    row_spec = QuantSpec(bits=spec.bits, sym=spec.sym, granularity="per_channel")
    if not grouped:
        scale, zero = qparams(W, row_spec)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(n, dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        Hb = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            if grouped and (i1 + i) % spec.group_size == 0:
                scale, zero = qparams(W[:, i1 + i:i1 + i + spec.group_size], row_spec)
            q = fake_quant_with(col.unsqueeze(1), scale, zero, row_spec).flatten()
            Q1[:, i] = q
            err = (col - q) / Hb[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hb[i, i:].unsqueeze(0)
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(w.dtype)


@torch.no_grad()
def gptq_model(
    folded: ModelWeights,  # folded layers with unquantized (clipped, transformed) weights
    calib_tokens: Tensor,  # (nsamples, seqlen)
    qcfg: QuantConfig,
    ccfg: CalibConfig,
    *,
    device: torch.device | str = "cpu",
) -> ModelWeights:
    """GPTQ every linear of every layer; inputs of each layer come from the quantized previous layers."""
    device = torch.device(device)
    args = folded.args
    inps = torch.cat([embed(folded, calib_tokens[s:s + 8].to(folded.device)).to(device, torch.float32)
                      for s in range(0, calib_tokens.shape[0], 8)])
    rope = rope_for(folded, calib_tokens.shape[1], device)
    bs = ccfg.batch_size
    layers = []
    for i in tqdm(range(args.n_layers), desc="GPTQ", disable=None):
        p = {k: v.to(device=device, dtype=torch.float32) for k, v in folded.layers[i].items()}
        for group in GPTQ_GROUPS:
            sums = {n: torch.zeros(p[f"{n}.weight"].shape[1], p[f"{n}.weight"].shape[1], device=device)
                    for n in group}
            count = [0]

            def recording_linear(pp: Params, name: str, x: Tensor, a_spec: QuantSpec, _sums=sums, _c=count) -> Tensor:
                xq = quant_act(pp, name, x, a_spec)
                if name in _sums:
                    flat = xq.reshape(-1, xq.shape[-1]).float()
                    _sums[name] += flat.T @ flat
                    if name == next(iter(_sums)):
                        _c[0] += flat.shape[0]
                return F.linear(xq, pp[f"{name}.weight"], pp.get(f"{name}.bias"))

            for s in range(0, inps.shape[0], bs):
                layer_forward(p, inps[s:s + bs], rope, args, qcfg, linear_fn=recording_linear)
            for n in group:
                H = 2 * sums[n] / max(count[0], 1)
                p[f"{n}.weight"] = gptq_quantize(p[f"{n}.weight"], H, qcfg.w, blocksize=ccfg.gptq_blocksize,
                                                 percdamp=ccfg.gptq_percdamp, act_order=ccfg.gptq_act_order)
        outs = torch.empty_like(inps)
        for s in range(0, inps.shape[0], bs):
            outs[s:s + bs] = layer_forward(p, inps[s:s + bs], rope, args, qcfg)
        inps = outs
        dt = folded.layers[i]["input_norm"].dtype
        layers.append(cast_folded(p, dt, "cpu"))
    return folded.with_layers(layers)
