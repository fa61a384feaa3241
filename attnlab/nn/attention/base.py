"""The attention family's shared forward: project -> (fused | eager) attention -> output proj."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnlab.config.attention import AttentionDims
from attnlab.nn.attention.backends import CAUSAL, attend
from attnlab.nn.attention.functional import MaskSpec, default_scales
from attnlab.nn.context import ForwardContext


@dataclass
class Projected:
    """Per-field queries (B, H, T, d_f) and keys (B, KV, T, d_f), aligned with
    ``dims.key_fields``; values (B, KV, T, d_v). Rotary fields are already rotated."""

    q: list[torch.Tensor]
    k: list[torch.Tensor]
    v: torch.Tensor


class AttentionLayer(nn.Module):
    """Base of every variant. Subclasses define the projections (``project``) and may own a null
    token (``null_keys``/``null_value``); scoring, masking and the output projection live here.

    ``dims`` is the layer's cache spec (what a cached forward stores and scores over). A variant
    whose cached form differs from its training form (MLA's absorbed decode: the cache holds a
    shared latent, not per-head keys) overrides ``project_cached`` (queries/fields in the cached
    form, aligned with ``dims``) and ``values_from_cache`` (attention output in the cached
    form -> per-head values for ``out``)."""

    dims: AttentionDims
    out: nn.Linear
    mask: MaskSpec = CAUSAL  # which keys a query may read in training/prefill (a variant may narrow it)

    def __init__(self, dims: AttentionDims, layer_index: int, dropout: float):
        super().__init__()
        self.dims = dims
        self.layer_index = layer_index
        self.dropout = dropout
        self.scales = default_scales([f.head_dim for f in dims.key_fields])
        if dims.null_token:
            kv = dims.num_kv_heads
            self.null_keys = nn.ParameterDict(
                {f.name: nn.Parameter(torch.zeros(kv, f.head_dim)) for f in dims.key_fields})
            self.null_value = nn.Parameter(torch.zeros(kv, dims.v_head_dim))

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> Projected:
        raise NotImplementedError  # abstract: every variant defines its projections

    def project_cached(self, x: torch.Tensor, positions: torch.Tensor) -> Projected:
        """Queries and fields as the cache stores them (default: the training projections)."""
        return self.project(x, positions)

    def values_from_cache(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, dims.v_head_dim) attention output of a cached forward -> the per-head
        values ``out`` takes (default: unchanged)."""
        return y

    def null_kv(self) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
        if not self.dims.null_token:
            return None, None
        return [self.null_keys[f.name] for f in self.dims.key_fields], self.null_value

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        batch, t_len, _ = x.shape
        null_k, null_v = self.null_kv()
        if ctx.cache is not None:
            p = self.project_cached(x, ctx.positions)
            y = self.values_from_cache(self._attend_cached(p, ctx, null_k, null_v))
            return self.out(y.transpose(1, 2).reshape(batch, t_len, -1))
        p = self.project(x, ctx.positions)
        # the backend follows from the mask and the device (backends.select_backend)
        y = attend(p.q, p.k, p.v, self.scales, mask=self.mask, impl=ctx.attention_impl, null_k=null_k,
                   null_v=null_v, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, t_len, -1)  # (B, T, H * d_v)
        return self.out(y)


    def _attend_cached(self, p: Projected, ctx: ForwardContext, null_k, null_v) -> torch.Tensor:
        """Write this step's key fields and values into the layer cache, then attend over it."""
        from attnlab.kernels import cached_attention, write_cache  # local: model code stays importable without caches

        fields = {f.name: k for f, k in zip(self.dims.key_fields, p.k)}
        fields["v"] = p.v  # an aliased value (dims.value_alias) is that key field: not stored twice
        if torch.compiler.is_compiling():  # an opaque op: torch.compile fuses around it
            from attnlab.kernels.ops import cached_layer_attention

            s = ctx.step
            return cached_layer_attention(self.layer_index, ",".join(fields), list(self.scales), p.q,
                                          list(fields.values()), s.offsets, s.valid, s.lengths, s.positions,
                                          null_k or [], null_v)
        layer_cache = ctx.cache.layers[self.layer_index]
        # one new token: its exact copy can enter the tail ring first (nothing needed is
        # evicted); a longer chunk updates the ring only after attention read the older tokens
        single = p.v.shape[2] == 1
        write_cache(layer_cache, ctx.step, fields, include_tail=single)
        y = cached_attention(p.q, layer_cache, self.scales, ctx.step, null_k=null_k, null_v=null_v, fresh=fields)
        if not single:
            layer_cache.write_tail(ctx.step, fields)
        return y


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, heads * d) -> (B, heads, T, d)."""
    batch, t_len, _ = x.shape
    return x.view(batch, t_len, num_heads, -1).transpose(1, 2)
