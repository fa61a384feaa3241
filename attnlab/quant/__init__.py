"""Cache storage formats: exact byte accounting (and, later, quantize/dequantize)."""

from attnlab.quant.formats import FORMATS, Format, get_format

__all__ = ["FORMATS", "Format", "get_format"]
