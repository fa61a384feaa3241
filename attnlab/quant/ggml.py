"""ggml's q8_0 and q4_0, bit-exact with ``quantize_row_q8_0_ref`` / ``quantize_row_q4_0_ref``
(ggml-quants.c) and with ``gguf.quants`` (the test oracle).

Blocks of 32 values along the row; every block is its fp16 scale ``d`` (2 little-endian bytes)
followed by its quants:

* q8_0 (34 B): ``d = amax / 127``; ``q = round_half_away(x * (1 / d))`` as int8 (32 B).
* q4_0 (18 B): ``m`` = the signed value of largest magnitude (first one on ties); ``d = m / -8``;
  ``q = min(15, trunc(x * (1 / d) + 8.5))``; byte j = q[j] | q[j + 16] << 4 (16 B).

Exactness notes. ``d`` and ``1 / d`` are computed in fp32 from the fp32 ``d`` (only the stored
scale is rounded to fp16), exactly as ggml. Every division is tensor / tensor: CUDA rewrites
``tensor / python_scalar`` as ``tensor * (1 / scalar)``, which is not bit-exact for ``/ 127``.
Rounding half away from zero uses gguf's ``np_roundf`` formulation, ``floor(a) + floor(2 *
(a - floor(a)))``, which is exact in fp32 (``floor(a + 0.5)`` is not: 0.49999997 + 0.5 rounds
to 1). Dequantization ``d * q`` is exact in fp32 (11-bit by <= 8-bit significands).
Not matched: ``amax`` below ~3.7e-37 makes ``1 / d`` overflow to inf (ggml's behaviour there is
undefined too); inputs with NaN/inf.
"""

from __future__ import annotations

import torch

from attnlab.quant.blocks import (pack_nibbles, scale_from_bytes, scale_to_bytes, scaled_rows,
                                  split_blocks, to_blocks, unpack_nibbles)

QK = 32            # values per block, both formats
Q8_0_BYTES = 34    # 2 (fp16 d) + 32 int8
Q4_0_BYTES = 18    # 2 (fp16 d) + 16 bytes of nibbles


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """``1.0f / d``, or 0 where d == 0 (fp32, tensor / tensor)."""
    inv = torch.ones_like(d) / d
    return torch.where(d == 0, torch.zeros_like(d), inv)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    a = v.abs()
    floored = a.floor()
    return v.sign() * (floored + (2 * (a - floored)).floor())


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """(..., n) float -> (..., ceil(n / 32) * 34) uint8."""
    blocks = to_blocks(x, QK)                                            # (..., nb, 32) fp32
    amax = blocks.abs().amax(dim=-1, keepdim=True)                       # (..., nb, 1)
    d = amax / torch.full_like(amax, 127.0)
    q = _round_half_away(blocks * _inverse(d)).to(torch.int8)           # (..., nb, 32)
    out = torch.cat([scale_to_bytes(d), q.view(torch.uint8)], dim=-1)   # (..., nb, 34)
    return out.flatten(-2)


def dequantize_q8_0(packed: torch.Tensor, row_length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., ceil(n / 32) * 34) uint8 -> (..., n) ``dtype``."""
    nb = -(-row_length // QK)
    blocks = split_blocks(packed, "q8_0", Q8_0_BYTES, nb * Q8_0_BYTES)  # (..., nb, 34)
    d = scale_from_bytes(blocks)                                         # (..., nb, 1) fp32
    q = blocks[..., 2:].view(torch.int8)                                 # (..., nb, 32)
    return scaled_rows(q, d, row_length, dtype)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    """(..., n) float -> (..., ceil(n / 32) * 18) uint8."""
    blocks = to_blocks(x, QK)                                            # (..., nb, 32) fp32
    imax = blocks.abs().argmax(dim=-1, keepdim=True)                     # first max, as ggml's loop
    m = blocks.gather(-1, imax)                                          # (..., nb, 1) signed
    d = m / torch.full_like(m, -8.0)
    q = (blocks * _inverse(d) + 8.5).trunc().to(torch.uint8).clamp_(max=15)  # (..., nb, 32)
    out = torch.cat([scale_to_bytes(d), pack_nibbles(q)], dim=-1)       # (..., nb, 18)
    return out.flatten(-2)


def dequantize_q4_0(packed: torch.Tensor, row_length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., ceil(n / 32) * 18) uint8 -> (..., n) ``dtype``."""
    nb = -(-row_length // QK)
    blocks = split_blocks(packed, "q4_0", Q4_0_BYTES, nb * Q4_0_BYTES)  # (..., nb, 18)
    d = scale_from_bytes(blocks)                                         # (..., nb, 1) fp32
    q = unpack_nibbles(blocks[..., 2:]).view(torch.int8) - 8            # (..., nb, 32) in -8..7
    return scaled_rows(q, d, row_length, dtype)
