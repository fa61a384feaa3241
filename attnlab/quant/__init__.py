"""Cache storage formats: exact byte accounting and pure quantize/dequantize.

``quantize(x, fmt)`` maps rows (last dim) to their stored form: a cast tensor for fp32/fp16/bf16,
ggml-layout uint8 blocks (fp16 scale, then quants) for q8_0/q4_0/nf4; ``dequantize(packed, fmt,
row_length, dtype)`` inverts it. See :mod:`attnlab.quant.codec`.
"""

from attnlab.quant.codec import dequantize, quantize, row_bytes, storage_dtype
from attnlab.quant.formats import FORMATS, Format, get_format
from attnlab.quant.nf4 import NF4_CODEBOOK

__all__ = ["FORMATS", "Format", "NF4_CODEBOOK", "dequantize", "get_format", "quantize", "row_bytes",
           "storage_dtype"]
