"""nf4: QLoRA's 4-bit NormalFloat codebook with per-block absmax scaling.

Blocks of 64 values along the row; every block is 34 bytes: its fp16 absmax ``s`` (2 little-endian
bytes) followed by 32 bytes of 4-bit codes, byte j = code[j] | code[j + 32] << 4 (the q4_0 nibble
convention: low nibbles hold the first half of the block, high nibbles the second half).

Quantize: ``s = fp16(amax)`` (saturated to fp16's largest finite value, 65504, so a huge block
clips instead of decoding to NaN); every value is normalised by the *stored* scale, ``v = x *
(1 / s)`` in fp32 (0 where s == 0), and mapped to the nearest codebook entry. Nearest is decided
by the 15 fp32 midpoints between consecutive entries: the code is the number of midpoints strictly
below ``v``, so a value exactly on a midpoint takes the lower (more negative) entry.
Dequantize: ``x = CODEBOOK[code] * s`` in fp32, then cast to the requested dtype.
"""

from __future__ import annotations

import torch

from attnlab.quant.blocks import pack_nibbles, scale_from_bytes, scale_to_bytes, split_blocks, to_blocks

BLOCK = 64
NF4_BYTES = 34    # 2 (fp16 absmax) + 32 bytes of nibbles

# QLoRA (Dettmers et al., 2023) / bitsandbytes NF4 levels, ascending; code i decodes to NF4_CODEBOOK[i].
NF4_CODEBOOK: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# Decision boundaries: midpoints of consecutive levels, computed in float64, stored as fp32.
NF4_MIDPOINTS: tuple[float, ...] = tuple((a + b) / 2 for a, b in zip(NF4_CODEBOOK, NF4_CODEBOOK[1:]))

_FP16_MAX = 65504.0
_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints (15,), byte table (256, 2)) fp32 on ``device``, built once per device.

    byte_table[b] = (CODEBOOK[b & 15], CODEBOOK[b >> 4]): both levels a packed byte decodes to.
    """
    tables = _TABLES.get(device)
    if tables is None:
        codebook = torch.tensor(NF4_CODEBOOK, dtype=torch.float32)
        byte = torch.arange(256)
        byte_table = torch.stack([codebook[byte & 15], codebook[byte >> 4]], dim=-1)
        tables = (torch.tensor(NF4_MIDPOINTS, dtype=torch.float32).to(device), byte_table.to(device))
        _TABLES[device] = tables
    return tables


def quantize_nf4(x: torch.Tensor) -> torch.Tensor:
    """(..., n) float -> (..., ceil(n / 64) * 34) uint8."""
    midpoints, _ = _tables(x.device)
    blocks = to_blocks(x, BLOCK)                                         # (..., nb, 64) fp32
    amax = blocks.abs().amax(dim=-1, keepdim=True).clamp_(max=_FP16_MAX)  # (..., nb, 1)
    s = amax.to(torch.float16).to(torch.float32)                         # the scale that is stored
    inv = torch.where(s == 0, torch.zeros_like(s), torch.ones_like(s) / s)
    codes = torch.bucketize(blocks * inv, midpoints, right=False)        # (..., nb, 64) int64
    out = torch.cat([scale_to_bytes(s), pack_nibbles(codes)], dim=-1)    # (..., nb, 34)
    return out.flatten(-2)


def dequantize_nf4(packed: torch.Tensor, row_length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., ceil(n / 64) * 34) uint8 -> (..., n) ``dtype``."""
    _, byte_table = _tables(packed.device)
    nb = -(-row_length // BLOCK)
    blocks = split_blocks(packed, "nf4", NF4_BYTES, nb * NF4_BYTES)      # (..., nb, 34)
    s = scale_from_bytes(blocks)                                         # (..., nb, 1) fp32
    qs = blocks[..., 2:]                                                 # (..., nb, 32) packed codes
    levels = byte_table.index_select(0, qs.reshape(-1).int()).view(*qs.shape, 2)  # (..., nb, 32, 2): (low, high)
    out = torch.empty(*blocks.shape[:-1], 2, 32, dtype=dtype, device=packed.device)  # (..., nb, 2, 32)
    torch.mul(levels.transpose(-1, -2), s.unsqueeze(-1), out=out)       # [..., 0, j] = element j, [..., 1, j] = j + 32
    row = out.flatten(-3)                                                # (..., nb * 64)
    return row if row.shape[-1] == row_length else row[..., :row_length].contiguous()
