"""Sliding-window attention, registered as the variant ``sliding_window``: standard (GQA)
attention where the query at position t sees keys t - window .. t only (``window`` recent
positions besides itself, as Attamba's L), and a cache that keeps just those rows.

The weights are ``StandardAttention``'s (a standard checkpoint loads unchanged). Paths: training /
prefill through ``backends.attend`` with ``MaskSpec(window=window + 1)`` (FlexAttention where it
runs, else the eager reference); cached decode over the window ring of a
``cache.chunked.ChunkedLayerCache`` without boundary rows (fixed shapes, device positions:
capturable); chunks over the ring's older rows plus their own.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator

from attnlab.config.attention import (AttentionDims, ChunkLayout, KeyField, StandardAttentionConfig,
                                      check_recent_window)
from attnlab.config.variants import register_variant
from attnlab.nn.attention.functional import MaskSpec, masked_attention
from attnlab.nn.attention.standard import StandardAttention
from attnlab.nn.context import ForwardContext


class SlidingWindowAttentionConfig(StandardAttentionConfig):
    """Standard attention restricted to the newest ``window`` + 1 positions (module docstring)."""

    description: ClassVar[str] = "sliding-window attention: standard attention over the newest window + 1 positions"
    mixed_policy: ClassVar[dict[str, str]] = {"k": "q8_0", "v": "q4_0"}

    type: Literal["sliding_window"] = "sliding_window"  # type: ignore[assignment]
    window: int = Field(description="recent positions each query sees besides itself (>= 0)")

    _check_window = field_validator("window", mode="after")(check_recent_window)

    def check_context(self, context: int) -> None:
        if self.window > context:
            raise ValueError(f"sliding_window window={self.window} is larger than the context (block_size={context})")

    def dims(self, d_model: int) -> AttentionDims:
        hd = self.head_dim if self.head_dim is not None else d_model // self.num_heads
        return AttentionDims(self.num_heads, self.kv_heads, (KeyField("k", hd, self.rope is not None),), hd,
                             chunks=ChunkLayout(1, self.window, (), boundary_rows=False))

    def label(self, dims: AttentionDims) -> str:
        kv = f"/kv{dims.num_kv_heads}" if dims.num_kv_heads != dims.num_heads else ""
        return f"sliding_window h{dims.num_heads}{kv} hd{dims.v_head_dim} w{self.window}"


class SlidingWindowAttention(StandardAttention):
    def __init__(self, cfg: SlidingWindowAttentionConfig, d_model: int, layer_index: int):
        super().__init__(cfg, d_model, layer_index)
        self.window = cfg.window
        self.mask = MaskSpec(window=cfg.window + 1)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if ctx.cache is None:
            return super().forward(x, ctx)
        batch, t_len, _ = x.shape
        cache, step = ctx.cache.layers[self.layer_index], ctx.step
        positions = step.positions
        p = self.project(x, positions)
        (q,), (k,), v = p.q, p.k, p.v
        if t_len == 1 and (step.host_valid is None or all(n == 1 for n in step.host_valid)):
            pos = step.offsets.to(torch.long)
            cache.append_token(pos, None, {"k": k, "v": v})
            ring_k, ring_v, ring_pos = cache.ring_rows(pos, {"k": k, "v": v})
            ok = (ring_pos >= 0) & (ring_pos <= pos.unsqueeze(1)) & (ring_pos >= pos.unsqueeze(1) - self.window)
            y = masked_attention([q], [ring_k], ring_v, self.scales, ok.unsqueeze(1)).to(v.dtype)
        else:
            y = torch.zeros(*q.shape[:3], v.shape[-1], dtype=v.dtype, device=v.device)
            cache.check_capacity(max(o + n for o, n in zip(step.host_offsets, step.host_valid)))
            for b, (offset, n) in enumerate(zip(step.host_offsets, step.host_valid)):
                if n == 0:
                    continue
                own = torch.arange(offset, offset + n, device=x.device)
                ring_k, ring_v, ring_pos = cache.stored_ring(b)
                qp = own.view(-1, 1)
                ring_ok = (ring_pos >= 0) & (ring_pos < offset) & (ring_pos >= qp - self.window)
                own_ok = (own.view(1, -1) <= qp) & (own.view(1, -1) >= qp - self.window)
                visible = torch.cat([ring_ok, own_ok], 1).unsqueeze(0)
                keys = torch.cat([ring_k, k[b:b + 1, :, :n]], 2)
                values = torch.cat([ring_v, v[b:b + 1, :, :n]], 2)
                y[b:b + 1, :, :n] = masked_attention([q[b:b + 1, :, :n]], [keys], values, self.scales, visible)
                cache.write_chunk(b, own, own[:0], torch.zeros(n, dtype=torch.bool, device=x.device),
                                  {"k": k[b:b + 1, :, :n], "v": v[b:b + 1, :, :n]})
        return self.out(y.transpose(1, 2).reshape(batch, t_len, -1))


register_variant(SlidingWindowAttentionConfig, SlidingWindowAttention)

__all__ = ["SlidingWindowAttention", "SlidingWindowAttentionConfig"]
