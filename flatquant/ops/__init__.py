"""flatquant.ops: the real INT4 path as ``torch.library`` custom ops (``torch.ops.flatquant.*``).

Each op has a pure-torch reference (:mod:`flatquant.ops.reference`, the CPU kernel) and a Triton kernel (CUDA),
plus a fake kernel for ``torch.compile``, registered together by :func:`flatquant.ops._register.register_op` with
the signature written once. Importing this package registers the ops; nothing is launched.
"""

from __future__ import annotations

from ._launch import sm_count as sm_count
from .gemv import w4a4_gemv as w4a4_gemv
from .kron_quant import kron_quant as kron_quant
from .kron_quant import kron_quant_multi as kron_quant_multi
from .kv_attention import kv4_decode_attention as kv4_decode_attention
from .kv_quant import kv_quant as kv_quant
from .kv_quant import kv_quant_write as kv_quant_write
from .matmul import w4a4_matmul as w4a4_matmul
from .matmul import w4a8_matmul as w4a8_matmul
from .matmul import w8a8_matmul as w8a8_matmul
from .pack import int4_halves_layout as int4_halves_layout
from .pack import pack_int4 as pack_int4
from .pack import unpack_int4 as unpack_int4
from .qlinear import Backend as Backend
from .qlinear import QLinearParams as QLinearParams
from .qlinear import make_qlinear as make_qlinear
from .qlinear import qlinear as qlinear
