"""fp8 cache formats: ``fp8_e4m3`` (``torch.float8_e4m3fn``, max 448) and ``fp8_e5m2``
(``torch.float8_e5m2``, max 57344), one float32 scale per cache row.

A row (one token's field across its kv heads) is stored as its fp8 codes ``round(x / s)`` with
``s = amax(|row|) / fp8_max`` (an all-zero row gets ``s = 0`` and zero codes), so the largest
value maps to the format's largest finite number and nothing saturates; dequantized values are
``float(code) * s``. The rounding is torch's own cast to the fp8 dtype (round to nearest even),
so ``codes`` are byte for byte what ``(x / s).to(torch.float8_*)`` gives.

Two layouts, the same values: the planar pair ``(codes (..., n) uint8, scales (..., 1) float32)``
that caches and kernels keep, and the packed byte row ``quantize`` returns, ``[scale as 4
little-endian bytes | n codes]`` (n + 4 bytes, ``Format.row_bytes``).
"""

from __future__ import annotations

import torch

FP8_DTYPES: dict[str, torch.dtype] = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
SCALE_BYTES = 4  # one float32 scale per row


def fp8_max(fmt: str) -> float:
    return float(torch.finfo(FP8_DTYPES[fmt]).max)


def quantize_planar(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., n) float -> (codes (..., n) uint8, scales (..., 1) float32)."""
    dtype, top = FP8_DTYPES[fmt], fp8_max(fmt)
    x = x.to(torch.float32)
    scale = x.abs().amax(dim=-1, keepdim=True) / top
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    # x / s can exceed the maximum by an ulp of float32 rounding: clamp so the cast never saturates to NaN
    codes = (x / safe).clamp(-top, top).to(dtype).view(torch.uint8)
    return codes, scale


def dequantize_planar(codes: torch.Tensor, scales: torch.Tensor, fmt: str, row_length: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes, scales) -> (..., row_length) ``dtype`` (the product in float32)."""
    if codes.dtype != torch.uint8 or codes.shape[-1] != row_length:
        raise ValueError(f"{fmt}: codes must be uint8 rows of {row_length} values, got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    values = codes.reshape(-1).contiguous().view(FP8_DTYPES[fmt]).reshape(codes.shape).to(torch.float32)
    return (values * scales.to(torch.float32)).to(dtype)


def pack(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Planar pair -> packed rows (..., 4 + n) uint8: the float32 scale's bytes, then the codes."""
    flat = scales.to(torch.float32).reshape(-1).contiguous()  # flat: also views an empty batch
    scale_bytes = flat.view(torch.uint8).reshape(*scales.shape[:-1], SCALE_BYTES)
    return torch.cat([scale_bytes, codes], dim=-1)


def unpack(packed: torch.Tensor, fmt: str, row_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    if packed.dtype != torch.uint8 or packed.ndim == 0 or packed.shape[-1] != row_length + SCALE_BYTES:
        raise ValueError(f"{fmt}: packed rows must be uint8 with {row_length + SCALE_BYTES} bytes, got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    head = packed[..., :SCALE_BYTES].reshape(-1).contiguous()
    scales = head.view(torch.float32).reshape(*packed.shape[:-1], 1)
    return packed[..., SCALE_BYTES:], scales


def quantize_fp8(x: torch.Tensor, fmt: str) -> torch.Tensor:
    return pack(*quantize_planar(x, fmt))


def dequantize_fp8(packed: torch.Tensor, fmt: str, row_length: int, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_planar(*unpack(packed, fmt, row_length), fmt, row_length, dtype)
