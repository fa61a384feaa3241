"""Multi-head latent attention (MLA, DeepSeek-V2), registered as the variant ``mla``.

The worked example of a variant as a plug-in (docs/ARCHITECTURE.md): this module is the whole
variant — its config (``MLAAttentionConfig``: what it computes and caches, in numbers), its layer
(``MLAAttention``) and the ``register_variant`` call; ``attnlab.nn.attention`` imports it.

Per token, keys and values come from one compressed latent ``c = norm(W_dkv x)`` (kv_lora_rank
r) and one decoupled RoPE key ``k_rope = rope(W_kr x)`` (qk_rope_head_dim d_r) shared by all
heads. Head h's key is ``[W_uk_h c, k_rope]`` and its value ``W_uv_h c``; its query is
``[q_nope_h, rope(q_rope_h)]``, from x directly or through a low-rank ``q_lora_rank`` bottleneck.

- Training / prefill without a cache: the per-head keys and values are materialised and the
  usual fused (SDPA) or eager path attends, scale 1 / sqrt(qk_nope_head_dim + d_r).
- Cached (absorbed) form: the cache holds only ``c_kv`` (r) and ``k_rope`` (d_r) per token — one
  "kv head" shared by every query head, values aliased to ``c_kv``. Scores are
  ``q_abs . c_kv + q_rope . k_rope`` with ``q_abs_h = W_uk_h^T q_nope_h``, the weighted sum runs
  over ``c_kv``, and ``W_uv_h`` maps the (B, H, T, r) result to per-head values afterwards. It is
  a two-key-field attention with a group of H query heads per kv head, so the decode kernels
  serve it unchanged.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn

from attnlab.config.attention import AttentionDims, AttentionSpec, KeyField, RopeConfig, _check_rope
from attnlab.config.limits import check_count, limits_from
from attnlab.config.variants import register_variant
from attnlab.nn.attention.base import AttentionLayer, Projected, split_heads
from attnlab.nn.norm import RMSNorm
from attnlab.nn.rope import RotaryEmbedding


class MLAAttentionConfig(AttentionSpec):
    """MLA. Widths are per head except the two ranks. The cache stores ``c_kv`` (kv_lora_rank)
    and ``k_rope`` (qk_rope_head_dim) per token and layer, whatever the head count."""

    description: ClassVar[str] = ("multi-head latent attention (DeepSeek-V2): a shared latent + one RoPE key "
                                  "per token; absorbed decode caches only those")
    mixed_policy: ClassVar[dict[str, str]] = {"c_kv": "q8_0", "k_rope": "q8_0"}

    type: Literal["mla"] = "mla"
    kv_lora_rank: int = Field(gt=0, description="latent width r (the cached c_kv)")
    qk_nope_head_dim: int = Field(gt=0, description="per-head query/key width without RoPE")
    qk_rope_head_dim: int = Field(gt=0, description="width of the shared RoPE key (cached)")
    v_head_dim: int = Field(gt=0)
    q_lora_rank: int | None = Field(None, gt=0, description="low-rank query bottleneck; null: direct")
    rope: RopeConfig = Field(default_factory=RopeConfig)

    @field_validator("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "q_lora_rank",
                     mode="after")
    @classmethod
    def _check_mla_width(cls, value: int | None, info: ValidationInfo) -> int | None:
        check_count(value, limits_from(info.context).max_width, info.field_name, "max_width")
        return value

    @model_validator(mode="after")
    def _check_mla(self) -> "MLAAttentionConfig":
        if self.num_kv_heads is not None:
            raise ValueError("mla has no num_kv_heads: every head reads the one shared latent (leave it unset)")
        _check_rope(self.rope, self.qk_rope_head_dim, "qk_rope_head_dim")
        if self.rope.inv_freq is not None and self.rope.inv_freq and isinstance(self.rope.inv_freq[0], list):
            raise ValueError("mla's RoPE key is shared by all heads: give rope.inv_freq as one list")
        return self

    def dims(self, d_model: int) -> AttentionDims:
        fields = (KeyField("c_kv", self.kv_lora_rank, False), KeyField("k_rope", self.qk_rope_head_dim, True))
        return AttentionDims(self.num_heads, 1, fields, self.kv_lora_rank, value_alias="c_kv")

    def approx_params(self, d_model: int) -> int:
        h, r, dr = self.num_heads, self.kv_lora_rank, self.qk_rope_head_dim
        q_width = h * (self.qk_nope_head_dim + dr)
        queries = (d_model * self.q_lora_rank + self.q_lora_rank * q_width) if self.q_lora_rank else d_model * q_width
        return queries + d_model * (r + dr) + r * h * (self.qk_nope_head_dim + self.v_head_dim) + h * self.v_head_dim * d_model

    def label(self, dims: AttentionDims) -> str:
        q = f" q{self.q_lora_rank}" if self.q_lora_rank else ""
        return (f"mla h{self.num_heads} latent{self.kv_lora_rank}/rope{self.qk_rope_head_dim} "
                f"nope{self.qk_nope_head_dim}/v{self.v_head_dim}{q}")


class MLAAttention(AttentionLayer):
    """Cache spec (``dims``): key fields ``c_kv`` (r, no RoPE) and ``k_rope`` (d_r, RoPE), one kv
    head, values aliased to ``c_kv``."""

    def __init__(self, cfg: MLAAttentionConfig, d_model: int, layer_index: int):
        super().__init__(cfg.dims(d_model), layer_index, cfg.dropout)
        h, r, dr = cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.nope, self.v_dim = cfg.qk_nope_head_dim, cfg.v_head_dim
        q_width = h * (self.nope + dr)
        if cfg.q_lora_rank:
            self.query_down = nn.Linear(d_model, cfg.q_lora_rank, bias=cfg.bias)
            self.query_norm = RMSNorm(cfg.q_lora_rank)
            self.query = nn.Linear(cfg.q_lora_rank, q_width, bias=False)
        else:
            self.query_down = self.query_norm = None
            self.query = nn.Linear(d_model, q_width, bias=cfg.bias)
        self.kv_down = nn.Linear(d_model, r + dr, bias=cfg.bias)  # latent + shared RoPE key
        self.kv_norm = RMSNorm(r)
        # no bias: the absorbed form folds these weights into queries and outputs exactly
        self.kv_up = nn.Linear(r, h * (self.nope + self.v_dim), bias=False)
        self.out = nn.Linear(h * self.v_dim, d_model, bias=cfg.bias)
        self.rope = RotaryEmbedding(cfg.rope, dr)
        scale = 1.0 / math.sqrt(self.nope + dr)  # the full head's width, in both forms
        self.scales = [scale, scale]

    def _queries(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_in = x if self.query_down is None else self.query_norm(self.query_down(x))
        q = split_heads(self.query(q_in), self.dims.num_heads)  # (B, H, T, nope + d_r)
        q_nope, q_rope = q.split([self.nope, q.shape[-1] - self.nope], dim=-1)
        return q_nope, self.rope(q_rope, positions)

    def _latent(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c_kv (B, 1, T, r) and the rotated shared key k_rope (B, 1, T, d_r)."""
        r = self.dims.v_head_dim
        c, k_rope = self.kv_down(x).split([r, self.kv_down.out_features - r], dim=-1)
        return self.kv_norm(c).unsqueeze(1), self.rope(k_rope.unsqueeze(1), positions)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk (H, nope, r) and W_uv (H, d_v, r) from the up-projection."""
        w = self.kv_up.weight.view(self.dims.num_heads, self.nope + self.v_dim, -1)
        return w[:, : self.nope], w[:, self.nope:]

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> Projected:
        q_nope, q_rope = self._queries(x, positions)
        c, k_rope = self._latent(x, positions)
        kv = split_heads(self.kv_up(c.squeeze(1)), self.dims.num_heads)  # (B, H, T, nope + d_v)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        return Projected([q_nope, q_rope], [k_nope, k_rope.expand(-1, self.dims.num_heads, -1, -1)], v)

    def project_cached(self, x: torch.Tensor, positions: torch.Tensor) -> Projected:
        q_nope, q_rope = self._queries(x, positions)
        c, k_rope = self._latent(x, positions)
        w_uk, _ = self._up_weights()
        q_abs = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)  # q_abs . c == q_nope . (W_uk c)
        return Projected([q_abs, q_rope], [c, k_rope], c)

    def values_from_cache(self, y: torch.Tensor) -> torch.Tensor:
        _, w_uv = self._up_weights()
        return torch.einsum("bhtr,hvr->bhtv", y, w_uv)  # softmax-weighted latent -> per-head values


register_variant(MLAAttentionConfig, MLAAttention)

__all__ = ["MLAAttention", "MLAAttentionConfig"]
