"""Field descriptors the kernels take instead of cache objects: what a field is (``FieldSpec``:
name, storage format, kv heads, per-head dim) and where its tensors are (``FieldData``).

``FieldData`` per format: float formats (fp32/fp16/bf16) ``data`` (B, capacity, n); block formats
(q8_0/q4_0/nf4) the planar ``codes`` (B, capacity, code_bytes) uint8 and ``scales`` (B, capacity,
blocks) fp16 (``attnlab.quant.planar``); ``ring``: the exact tail (B, R, n) in the model dtype,
slot of position j = j % R, or None. n = num_kv_heads * head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class FieldSpec:
    name: str
    format: str
    num_kv_heads: int
    head_dim: int

    @property
    def row_length(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass
class FieldData:
    data: Tensor | None = None
    codes: Tensor | None = None
    scales: Tensor | None = None
    ring: Tensor | None = None


__all__ = ["FieldData", "FieldSpec"]
