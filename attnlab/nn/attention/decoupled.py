"""Decoupled Bottleneck Attention (DBA, paper 3.3-3.5).

score = q_sem.k_sem / sqrt(d_sem) + q_geo.k_geo / sqrt(d_geo): a low-rank semantic path without
position information and a geometric path with RoPE. Options: null token (base class), tied
semantic Q/K, a per-head query-side gate that trades the two paths off per token, and GQA.
"""

from __future__ import annotations

import torch
from torch import nn

from attnlab.config.attention import DecoupledAttentionConfig, attention_dims
from attnlab.nn.attention.base import AttentionLayer, Projected, split_heads
from attnlab.nn.rope import RotaryEmbedding


class DecoupledAttention(AttentionLayer):
    """Key fields ``k_sem`` (no RoPE) and ``k_geo`` (RoPE); values of their own width."""

    def __init__(self, cfg: DecoupledAttentionConfig, d_model: int, layer_index: int):
        dims = attention_dims(cfg, d_model)
        super().__init__(dims, layer_index, cfg.dropout)
        sem, geo = dims.key_fields
        h, kv = dims.num_heads, dims.num_kv_heads
        self.tie_qk = cfg.tie_qk
        self.query_sem = nn.Linear(d_model, h * sem.head_dim, bias=cfg.bias)
        # tied: k_sem = query_sem(x) (tie_qk requires num_kv_heads == num_heads)
        self.key_sem = None if cfg.tie_qk else nn.Linear(d_model, kv * sem.head_dim, bias=cfg.bias)
        self.query_geo = nn.Linear(d_model, h * geo.head_dim, bias=cfg.bias)
        self.key_geo = nn.Linear(d_model, kv * geo.head_dim, bias=cfg.bias)
        self.value = nn.Linear(d_model, kv * dims.v_head_dim, bias=cfg.bias)
        self.out = nn.Linear(h * dims.v_head_dim, d_model, bias=cfg.bias)
        self.rope = RotaryEmbedding(cfg.rope, geo.head_dim)
        # gate logits start at 0 -> both paths weighted 2*sigmoid(0) = 1, i.e. plain DBA
        self.gate = nn.Linear(d_model, h, bias=True) if cfg.gate else None

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> Projected:
        h, kv = self.dims.num_heads, self.dims.num_kv_heads
        q_sem = split_heads(self.query_sem(x), h)
        k_sem = q_sem if self.key_sem is None else split_heads(self.key_sem(x), kv)
        q_geo = self.rope(split_heads(self.query_geo(x), h), positions)
        k_geo = self.rope(split_heads(self.key_geo(x), kv), positions)
        v = split_heads(self.value(x), kv)
        if self.gate is not None:
            g = torch.sigmoid(self.gate(x)).transpose(1, 2).unsqueeze(-1)  # (B, H, T, 1)
            q_sem, q_geo = q_sem * (2 * g), q_geo * (2 * (1 - g))
        return Projected([q_sem, q_geo], [k_sem, k_geo], v)
