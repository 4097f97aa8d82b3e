"""The real-quantized inference model: packed int4 weights, online transforms, KV4 cache.

Per decoder layer (the same function as :func:`flatquant.models.layer.layer_forward` on a folded layer, with
the same :class:`~flatquant.core.spec.QuantConfig`):

1. RMSNorm (diag scale merged), then for each of q/k/v: ``flatquant::kron_quant`` (ln transform + that linear's
   LAC + per-token quantization) and the integer GEMM (``w4a4_matmul``, or W4A8/W8A8) with an fp32 epilogue, + bias;
2. RoPE; ``q ← q K^{-T}``; the K transform and the KV quantization (asymmetric per (token, KV head), learned K/V
   clipping) run in ``flatquant::kv_quant`` and the packed codes go into the cache — in prefill too, so prefill
   attention sees exactly the KV4 error of the fake path;
3. attention over the dequantized 4-bit cache (prefill: SDPA on the dequantized positions; decode:
   ``flatquant::kv4_decode_attention``, which reads the packed cache directly); GQA caches hold ``n_kv_heads``;
4. o_proj: head mixing + quantization in ``kron_quant``, GEMM; MLP likewise (up_gate and down transforms).

On CPU the ops run their torch references, on CUDA the Triton kernels (the ops dispatch by device). Bit settings
the kernels do not support (e.g. W4A16, asymmetric activations, per-group weights) run the fake path per linear
(:class:`FakeLinear`) with a logged notice. KV bit widths other than 2-4 use a floating cache holding the
fake-quantized values.

Layer tensors (the checkpoint schema, see :func:`layer_from_tensors`): ``input_norm``, ``post_norm``;
``{linear}.qweight`` (packed ``(N, K/2)`` uint8, or ``(N, K)`` int8 for 8-bit weights), ``{linear}.w_scale``
``(N,)`` fp32, optional ``{linear}.bias``, ``{linear}.a_clip`` ``(2,)`` fp32 LAC factors ``[σ(lo), σ(hi)]``
(or ``{linear}.weight`` float for the fake fallback); ``ln_trans|up_gate_trans|down_trans.left|right``,
``o_trans``, ``k_trans``, ``k_trans_inv_t``; ``q_quant|k_cache|v_cache.clip`` ``(2,)`` fp32.
"""

from ..sites import FUSED_GROUPS
from .cache import KVCache, LayerKV, new_cache
from .config import RealConfig, kernel_supported, kv_packed
from .graphs import CUDAGraphDecoder, CUDAGraphPrefill
from .linear import FakeLinear, FusedQLinear, Linear, fuse_linears, gemm4, real_linear
from .model import CompiledOrEager, RealModel
from .sampling import check_sampling, sample
from .step import attention_step, decode_layer, layer_step, rope_at
from .weights import RealLayer, RealWeights, layer_from_tensors

__all__ = ["FUSED_GROUPS", "CUDAGraphDecoder", "CUDAGraphPrefill", "CompiledOrEager", "FakeLinear",
           "FusedQLinear", "KVCache", "LayerKV", "Linear", "RealConfig", "RealLayer", "RealModel", "RealWeights",
           "attention_step", "check_sampling", "decode_layer", "fuse_linears", "gemm4", "kernel_supported", "kv_packed",
           "layer_from_tensors", "layer_step", "new_cache", "real_linear", "rope_at", "sample"]
