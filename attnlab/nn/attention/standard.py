"""Standard multi-head attention (GQA/MQA via num_kv_heads) and bottleneck attention (the same
layer with Q/K/V projected to attn_dim < d_model, paper section 3.2)."""

from __future__ import annotations

import torch
from torch import nn

from attnlab.config.attention import BottleneckAttentionConfig, StandardAttentionConfig, attention_dims
from attnlab.nn.attention.base import AttentionLayer, Projected, split_heads
from attnlab.nn.rope import RotaryEmbedding


class StandardAttention(AttentionLayer):
    """One key field ``k`` (rotated when RoPE is on)."""

    def __init__(self, cfg: StandardAttentionConfig | BottleneckAttentionConfig, d_model: int, layer_index: int):
        dims = attention_dims(cfg, d_model)
        super().__init__(dims, layer_index, cfg.dropout)
        hd = dims.key_fields[0].head_dim
        h, kv = dims.num_heads, dims.num_kv_heads
        self.query = nn.Linear(d_model, h * hd, bias=cfg.bias)
        self.key = nn.Linear(d_model, kv * hd, bias=cfg.bias)
        self.value = nn.Linear(d_model, kv * hd, bias=cfg.bias)
        self.out = nn.Linear(h * hd, d_model, bias=cfg.bias)
        self.rope = RotaryEmbedding(cfg.rope, hd) if cfg.rope is not None else None

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> Projected:
        q = split_heads(self.query(x), self.dims.num_heads)
        k = split_heads(self.key(x), self.dims.num_kv_heads)
        v = split_heads(self.value(x), self.dims.num_kv_heads)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        return Projected([q], [k], v)
