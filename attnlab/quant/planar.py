"""The kernel-native ("planar") layout of the block formats q8_0, q4_0 and nf4.

The *values* are the format's (ggml's scale and codes for q8_0/q4_0; QLoRA's absmax and codes
for nf4): ``quantize`` computes them with the ggml-exact quantizers of this package. Only where
the bytes lie differs, so that a kernel can stream a row with 16-byte vector loads:

* ``codes`` (..., code_bytes) uint8, in element order:
  q8_0: byte e = the int8 code of element e (two's complement);
  q4_0 / nf4: byte i = code[2i] | code[2i + 1] << 4 (q4_0's code is the ggml nibble, q + 8).
  ``code_bytes`` = blocks x 32 (q8_0, nf4) or blocks x 16 (q4_0): always a multiple of 16.
* ``scales`` (..., blocks) fp16: each block's scale (ggml's ``d``; nf4's absmax).

A row of n values therefore takes exactly ``Format.row_bytes(n)`` bytes, as in ggml's stream
(blocks x 34 / 18 / 34). ``to_ggml`` gives back the ggml byte stream of rows (what
``quant.quantize`` returns, and for q8_0/q4_0 what ``gguf.quants.quantize`` writes), so the
byte-exactness tests run on the bytes this layout holds.

The fp8 formats (:mod:`attnlab.quant.fp8`) share the interface with one block per row: ``codes``
(..., n) are the fp8 bytes in element order, ``scales`` (..., 1) the row's float32 scale
(``scale_dtype``), and ``to_ggml`` gives the packed row ``quant.quantize`` returns.
"""

from __future__ import annotations

import torch

from attnlab.quant import fp8, ggml, nf4
from attnlab.quant.blocks import num_blocks, pack_nibbles, unpack_nibbles
from attnlab.quant.formats import get_format

#: format -> (values per block, code bytes per block, bits per code)
PLANAR_FORMATS: dict[str, tuple[int, int, int]] = {"q8_0": (32, 32, 8), "q4_0": (32, 16, 4), "nf4": (64, 32, 4)}
_GGML_QUANTIZERS = {"q8_0": ggml.quantize_q8_0, "q4_0": ggml.quantize_q4_0, "nf4": nf4.quantize_nf4}


def scale_dtype(fmt: str) -> torch.dtype:
    """dtype of the ``scales`` plane: float32 for fp8's row scales, fp16 for the block formats."""
    return torch.float32 if fmt in fp8.FP8_DTYPES else torch.float16


def _check(fmt: str) -> tuple[int, int, int]:
    get_format(fmt)
    if fmt not in PLANAR_FORMATS:
        raise ValueError(f"{fmt!r} is not a block format (planar formats: {', '.join(PLANAR_FORMATS)})")
    return PLANAR_FORMATS[fmt]


def planar_widths(fmt: str, row_length: int) -> tuple[int, int]:
    """(code bytes, scales) per row of ``row_length`` values."""
    if fmt in fp8.FP8_DTYPES:
        return row_length, 1
    qk, code_bytes, _ = _check(fmt)
    nb = num_blocks(row_length, qk)
    return nb * code_bytes, nb


def _ggml_blocks_to_planar(packed: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    qk, code_bytes, bits = _check(fmt)
    block_bytes = get_format(fmt).block_bytes
    blocks = packed.reshape(*packed.shape[:-1], -1, block_bytes)              # (..., nb, bb)
    scales = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1)    # (..., nb)
    quants = blocks[..., 2:]
    if bits == 8:
        codes = quants.contiguous()                                          # element order already
    else:
        element_order = unpack_nibbles(quants)                               # (..., nb, qk): ggml's halves
        codes = element_order[..., 0::2] | (element_order[..., 1::2] << 4)   # byte i = c[2i] | c[2i+1] << 4
    return codes.flatten(-2), scales


def quantize(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., n) float -> (codes (..., code_bytes) uint8, scales (..., blocks) fp16): the format's
    exact values (a row that is not whole blocks is zero-padded first, as ggml does); fp8: (codes
    (..., n), float32 row scales (..., 1))."""
    if fmt in fp8.FP8_DTYPES:
        return fp8.quantize_planar(x, fmt)
    _check(fmt)
    return _ggml_blocks_to_planar(_GGML_QUANTIZERS[fmt](x), fmt)


def from_ggml(packed: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml byte stream (..., blocks x block_bytes) -> (codes, scales) (fp8: a packed row)."""
    if fmt in fp8.FP8_DTYPES:
        return fp8.unpack(packed, fmt, packed.shape[-1] - fp8.SCALE_BYTES)
    return _ggml_blocks_to_planar(packed, fmt)


def to_ggml(codes: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """(codes, scales) -> the rows' ggml byte stream (..., blocks x block_bytes) uint8 (fp8: the
    packed row of ``quant.quantize``)."""
    if fmt in fp8.FP8_DTYPES:
        return fp8.pack(codes, scales)
    qk, code_bytes, bits = _check(fmt)
    nb = scales.shape[-1]
    if codes.dtype != torch.uint8 or codes.shape[-1] != nb * code_bytes:
        raise ValueError(f"{fmt}: codes must be uint8 with {nb * code_bytes} bytes for {nb} blocks, "
                         f"got {codes.dtype} {tuple(codes.shape)}")
    blocks = codes.reshape(*codes.shape[:-1], nb, code_bytes)
    if bits == 4:
        element_order = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2)  # (..., nb, qk)
        blocks = pack_nibbles(element_order)                                 # ggml: c[j] | c[j + qk/2] << 4
    scale_bytes = scales.to(torch.float16).contiguous().view(torch.uint8).reshape(*scales.shape, 2)
    return torch.cat([scale_bytes, blocks], dim=-1).flatten(-2)


def element_codes(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """Codes in element order (..., blocks x qk): int8 q (q8_0), q + 8 in 0..15 (q4_0), nf4 codes."""
    _, _, bits = _check(fmt)
    if bits == 8:
        return codes.view(torch.int8)
    return torch.stack([codes & 0x0F, codes >> 4], dim=-1).flatten(-2)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, fmt: str, row_length: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes, scales) -> (..., row_length) ``dtype``; the products are exact in fp32."""
    if fmt in fp8.FP8_DTYPES:
        return fp8.dequantize_planar(codes, scales, fmt, row_length, dtype)
    qk, _, _ = _check(fmt)
    q = element_codes(codes, fmt)
    if fmt == "q4_0":
        values = q.to(torch.float32) - 8.0
    elif fmt == "nf4":
        values = torch.tensor(nf4.NF4_CODEBOOK, dtype=torch.float32, device=codes.device)[q.long()]
    else:
        values = q.to(torch.float32)
    values = values.unflatten(-1, (-1, qk)) * scales.to(torch.float32).unsqueeze(-1)
    return values.flatten(-2)[..., :row_length].to(dtype)


__all__ = ["PLANAR_FORMATS", "dequantize", "element_codes", "from_ggml", "planar_widths", "quantize", "scale_dtype",
           "to_ggml"]
