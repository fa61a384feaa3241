"""Storage formats of cached tensors and their exact byte cost.

Quantized formats pack blocks of values along a cache row (one token's field across all kv heads,
as ggml does): q8_0 = 32 int8 + fp16 scale (34 B), q4_0 = 32 nibbles + fp16 scale (18 B),
nf4 = 64 nibbles + fp16 absmax (34 B). A row whose length is not a block multiple is zero-padded
to the next block, and that padding is counted. fp8_e4m3 / fp8_e5m2 store one byte per value and
one float32 scale per row (n + 4 B).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    name: str
    block_size: int          # values per block
    block_bytes: int         # bytes per block, scale included
    quantized: bool
    row_overhead: int = 0    # bytes per row beside the blocks (fp8's float32 row scale)

    @property
    def bytes_per_value(self) -> float:
        return self.block_bytes / self.block_size

    def row_bytes(self, num_values: int) -> int:
        """Bytes one row of ``num_values`` occupies (padded to whole blocks, row overhead included)."""
        blocks = -(-num_values // self.block_size)
        return blocks * self.block_bytes + self.row_overhead


FORMATS: dict[str, Format] = {
    "fp64": Format("fp64", 1, 8, False),   # exact caches for float64 models (tests, references)
    "fp32": Format("fp32", 1, 4, False),
    "fp16": Format("fp16", 1, 2, False),
    "bf16": Format("bf16", 1, 2, False),
    "q8_0": Format("q8_0", 32, 34, True),
    "q4_0": Format("q4_0", 32, 18, True),
    "nf4": Format("nf4", 64, 34, True),
    # one fp8 code per value + one float32 scale per row (attnlab.quant.fp8)
    "fp8_e4m3": Format("fp8_e4m3", 1, 1, True, row_overhead=4),
    "fp8_e5m2": Format("fp8_e5m2", 1, 1, True, row_overhead=4),
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown cache format {name!r}; known: {', '.join(FORMATS)}") from None
