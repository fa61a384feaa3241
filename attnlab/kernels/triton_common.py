"""Triton device helpers shared by the attention kernels (``decode_jit``, ``prefill_jit``)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def cast(x, DT: tl.constexpr):
    """To the tensor-core operand dtype: 1 bf16, 2 fp16, else fp32."""
    if DT == 1:
        y = x.to(tl.bfloat16)
    elif DT == 2:
        y = x.to(tl.float16)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def dot(a, b, DT: tl.constexpr):
    """(M, K) x (K, N) on tensor cores in the operand dtype, fp32 accumulation; fp32 operands
    (DT == 0): exact ("ieee") products."""
    if DT == 0:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c
