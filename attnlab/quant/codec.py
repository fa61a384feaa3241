"""``quantize`` / ``dequantize``: one entry point for every cache format.

Rows are the last dim (a cache row = one token's field across all kv heads); leading dims are
free. What ``quantize`` returns:

* fp32 / fp16 / bf16: ``x`` cast to that dtype, shape (..., n).
* q8_0 / q4_0 / nf4: a uint8 tensor (..., row_bytes(fmt, n)) holding the row's blocks back to
  back, each block = fp16 scale as 2 little-endian bytes, then its quants (ggml's block layout;
  for q8_0/q4_0 ``packed.cpu().numpy().tobytes()`` equals ``gguf.quants.quantize`` of the
  zero-padded row). A row that is not a whole number of blocks is zero-padded before quantizing;
  ``dequantize`` strips the padding given the original ``row_length``.
* fp8_e4m3 / fp8_e5m2: a uint8 tensor (..., n + 4): the row's float32 scale, then one fp8 code
  per value (:mod:`attnlab.quant.fp8`).

Both functions are pure, vectorised torch (no loops over rows or blocks) and run on any device.
Inputs of any floating dtype are widened to fp32 first (fp16/bf16 exactly; fp64 is rounded).
"""

from __future__ import annotations

from typing import Callable

import torch

from attnlab.quant import fp8, ggml, nf4
from attnlab.quant.formats import get_format

_FLOAT_DTYPES: dict[str, torch.dtype] = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_QUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "q8_0": ggml.quantize_q8_0,
    "q4_0": ggml.quantize_q4_0,
    "nf4": nf4.quantize_nf4,
    "fp8_e4m3": lambda x: fp8.quantize_fp8(x, "fp8_e4m3"),
    "fp8_e5m2": lambda x: fp8.quantize_fp8(x, "fp8_e5m2"),
}
_DEQUANTIZERS: dict[str, Callable[[torch.Tensor, int, torch.dtype], torch.Tensor]] = {
    "q8_0": ggml.dequantize_q8_0,
    "q4_0": ggml.dequantize_q4_0,
    "nf4": nf4.dequantize_nf4,
    "fp8_e4m3": lambda p, n, dtype: fp8.dequantize_fp8(p, "fp8_e4m3", n, dtype),
    "fp8_e5m2": lambda p, n, dtype: fp8.dequantize_fp8(p, "fp8_e5m2", n, dtype),
}


def row_bytes(fmt: str, row_length: int) -> int:
    """Bytes one row of ``row_length`` values occupies in ``fmt`` (padding included)."""
    return get_format(fmt).row_bytes(row_length)


def storage_dtype(fmt: str) -> torch.dtype:
    """dtype of what ``quantize`` returns for ``fmt``: the float dtype, or uint8 for packed formats."""
    get_format(fmt)
    return _FLOAT_DTYPES.get(fmt, torch.uint8)


def quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """(..., n) floating tensor -> stored form in ``fmt`` (see the module docstring)."""
    get_format(fmt)  # ValueError naming an unknown format
    if not (x.is_floating_point() and x.ndim >= 1):
        raise ValueError(f"quantize({fmt!r}): expected a floating tensor with a row dim, "
                         f"got {x.dtype} of shape {tuple(x.shape)}")
    if fmt in _FLOAT_DTYPES:
        return x.to(_FLOAT_DTYPES[fmt])
    return _QUANTIZERS[fmt](x)


def dequantize(packed: torch.Tensor, fmt: str, row_length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored form of rows of ``row_length`` values in ``fmt`` -> (..., row_length) ``dtype``."""
    get_format(fmt)
    if row_length < 0:
        raise ValueError(f"dequantize({fmt!r}): row_length must be >= 0, got {row_length}")
    if fmt in _FLOAT_DTYPES:
        if packed.ndim == 0 or packed.shape[-1] != row_length:
            raise ValueError(f"dequantize({fmt!r}): expected rows of {row_length} values, "
                             f"got shape {tuple(packed.shape)}")
        return packed.to(dtype)
    return _DEQUANTIZERS[fmt](packed, row_length, dtype)
