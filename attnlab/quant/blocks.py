"""Shared block plumbing of the packed formats: row padding, fp16 scale bytes, nibble packing.

Every packed format stores a row as ``num_blocks`` consecutive blocks, each starting with its
fp16 scale as 2 little-endian bytes followed by the block's quants (ggml's ``block_q8_0`` /
``block_q4_0`` layout). All helpers are vectorised over any leading dims and device-agnostic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def num_blocks(row_length: int, block_size: int) -> int:
    return -(-row_length // block_size)


def to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(..., n) float -> (..., num_blocks, block_size) float32, zero-padding the last block."""
    x = x.to(torch.float32).contiguous()
    n = x.shape[-1]
    nb = num_blocks(n, block_size)
    if nb * block_size != n:
        x = F.pad(x, (0, nb * block_size - n))
    return x.reshape(*x.shape[:-1], nb, block_size)


def scaled_rows(q: torch.Tensor, d: torch.Tensor, row_length: int, dtype: torch.dtype) -> torch.Tensor:
    """``q * d`` -> (..., row_length) ``dtype``, padding stripped; q: (..., nb, k) ints, d: (..., nb, 1) fp32.

    One kernel: the product is computed in fp32 (exact for these formats) and rounded once to
    ``dtype`` on store. Returns a contiguous tensor.
    """
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    torch.mul(q, d, out=out)
    row = out.flatten(-2)
    if row.shape[-1] != row_length:
        row = row[..., :row_length].contiguous()
    return row


def split_blocks(packed: torch.Tensor, fmt_name: str, block_bytes: int, row_bytes: int) -> torch.Tensor:
    """(..., row_bytes) uint8 -> (..., num_blocks, block_bytes), validating dtype and width."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"{fmt_name}: packed rows must be uint8, got {packed.dtype}")
    if packed.ndim == 0 or packed.shape[-1] != row_bytes:
        raise ValueError(f"{fmt_name}: packed rows must have {row_bytes} bytes in the last dim, "
                         f"got shape {tuple(packed.shape)}")
    return packed.reshape(*packed.shape[:-1], row_bytes // block_bytes, block_bytes)


def scale_to_bytes(d: torch.Tensor) -> torch.Tensor:
    """fp32 scales (..., 1) -> fp16 rounded to nearest even, as 2 little-endian bytes (..., 2)."""
    return d.to(torch.float16).contiguous().view(torch.uint8)


def scale_from_bytes(blocks: torch.Tensor) -> torch.Tensor:
    """(..., block_bytes) uint8 -> the block's fp16 scale widened to fp32, (..., 1)."""
    return blocks[..., :2].contiguous().view(torch.float16).to(torch.float32)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., 2h) codes in 0..15 -> (..., h) bytes: byte j = code[j] | code[j + h] << 4."""
    half = codes.shape[-1] // 2
    codes = codes.to(torch.uint8)
    return codes[..., :half] | (codes[..., half:] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: (..., h) bytes -> (..., 2h) codes (uint8)."""
    half = packed.shape[-1]
    codes = torch.empty(*packed.shape[:-1], 2 * half, dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(packed, 0x0F, out=codes[..., :half])
    torch.bitwise_right_shift(packed, 4, out=codes[..., half:])
    return codes
