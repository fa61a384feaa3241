"""Host side of the Butterfly decode kernel (device code and design: ``butterfly_jit``): one launch
per layer and step writes the new token into a ``cache.summary.SummaryLayerCache`` (running
sums, summary row, window ring) and attends over its window + sink/local/partner summaries.

``unsupported_reason(cache, q_dtype)`` says why a call must take the torch path instead (block
formats in a pool, float64, head dims over ``MAX_HEAD_DIM``, no Triton,
``ATTNLAB_DECODE_KERNEL=reference``); ``decode_step`` launches. Nothing is planned or allocated
per step except the output, so the step can be captured in a CUDA graph.
"""

from __future__ import annotations

import os

import torch

from attnlab.kernels import report_fallback, triton_missing, uses_kernels

FLOAT_CODES = {"fp32": 0, "fp16": 1, "bf16": 2}
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
RULE_CODES = {"causal_shift": 0, "xor": 1, "random": 2, "local_only": 3}
MAX_HEAD_DIM = 256


def unsupported_reason(cache, q_dtype: torch.dtype) -> str | None:
    """Why the fused kernel cannot serve this cache and query dtype; None when it can."""
    if os.environ.get("ATTNLAB_DECODE_KERNEL", "") == "reference":
        return "ATTNLAB_DECODE_KERNEL=reference"
    missing = triton_missing()
    if missing:
        return missing
    if q_dtype not in DTYPE_CODES or cache.dtype not in DTYPE_CODES:
        return f"butterfly decode kernel: dtype {q_dtype}"
    quantized = [name for name, fmt in cache.formats.items() if fmt not in FLOAT_CODES]
    if quantized:
        return f"butterfly decode kernel: block-format pools ({', '.join(quantized)}) take the torch path"
    for pool in ("", "_sum"):
        if cache.formats[f"k{pool}"] != cache.formats[f"v{pool}"]:
            return (f"butterfly decode kernel: k{pool} and v{pool} in different formats "
                    f"({cache.formats[f'k{pool}']}, {cache.formats[f'v{pool}']})")
    head_dim = cache.dims.v_head_dim
    if head_dim > MAX_HEAD_DIM:
        return f"butterfly decode kernel: head dim {head_dim} > {MAX_HEAD_DIM}"
    return None


def kernel_serves(q: torch.Tensor, cache) -> bool:
    """Whether this decode call goes to the fused kernel (CUDA, or the CPU interpreter when
    kernels are enabled there); a CUDA call that cannot is logged once with its reason."""
    if not uses_kernels(q):
        return False
    reason = cache.kernel_plans.get("butterfly_reason", False)
    if reason is False:
        reason = cache.kernel_plans["butterfly_reason"] = unsupported_reason(cache, q.dtype)
    if reason is not None:
        report_fallback(reason)
    return reason is None


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, positions: torch.Tensor, *,
                window: int, block_size: int, rule: str, stage: int, scale: float) -> torch.Tensor:
    """One new token per sequence: q (B, H, 1, D), k/v (B, KV, 1, D), ``positions`` (B,) int
    (the new token's position) -> attention output (B, H, 1, D) in q's dtype."""
    from attnlab.kernels.butterfly_jit import butterfly_decode_kernel
    from attnlab.kernels.triton_compat import interpreter_compat

    interpreter_compat()
    batch, heads, _, dim = q.shape
    kv = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "rows must be contiguous per head"
    out = torch.empty_like(q)
    ring_k, ring_v = cache.ring["k"].data, cache.ring["v"].data
    sum_k, sum_v = cache.summaries["k"].data, cache.summaries["v"].data
    run_k, run_v = cache.running["k"], cache.running["v"]
    block_d = max(16, 1 << (dim - 1).bit_length())
    group = heads // kv
    block_g = max(16, 1 << (group - 1).bit_length())
    block_r = min(64, max(16, 1 << (cache.ring_size - 1).bit_length()))
    butterfly_decode_kernel[(batch, kv)](
        _bits(q), q.stride(0), q.stride(1), _bits(k), k.stride(0), k.stride(1), _bits(v), v.stride(0), v.stride(1),
        positions,
        _bits(ring_k), _bits(ring_v), ring_k.stride(0), ring_k.stride(1), cache.slot_position,
        cache.slot_position.stride(0),
        _bits(sum_k), _bits(sum_v), sum_k.stride(0), sum_k.stride(1), run_k, run_v, run_k.stride(0), run_k.stride(1),
        cache.running_position, cache.running_position.stride(0),
        _bits(out), out.stride(0), out.stride(1), scale,
        D=dim, G=group, R=cache.ring_size, HIST=cache.history, BS=block_size, W=window, STAGE=stage,
        RULE=RULE_CODES[rule], FMT_Q=DTYPE_CODES[q.dtype], FMT_RING=FLOAT_CODES[cache.formats["k"]],
        FMT_SUM=FLOAT_CODES[cache.formats["k_sum"]], FMT_OUT=DTYPE_CODES[q.dtype],
        BLOCK_D=block_d, BLOCK_G=block_g, BLOCK_R=block_r)
    return out


__all__ = ["MAX_HEAD_DIM", "decode_step", "kernel_serves", "unsupported_reason"]
