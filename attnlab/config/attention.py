"""Typed specs for the attention zoo and rotary position embeddings.

Every variant is described by *key fields*: attention scores are ``sum_f scale_f * (q_f . k_f)``
over one field (standard/bottleneck: ``k``) or two (decoupled: ``k_sem`` without RoPE and
``k_geo`` with RoPE), followed by softmax and a weighted sum of ``v``. ``AttentionDims`` is that
description in numbers; caches, byte accounting and kernels all read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

from attnlab.config.base import StrictModel
from attnlab.config.limits import check_count, limits_from


class Llama3RopeScaling(StrictModel):
    """Llama-3 style frequency scaling (``rope_scaling.rope_type == "llama3"`` in Hugging Face)."""

    type: Literal["llama3"] = "llama3"
    factor: float = Field(8.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_position: int = Field(8192, gt=0)

    @field_validator("original_max_position", mode="after")
    @classmethod
    def _check_context(cls, value: int, info: ValidationInfo) -> int:
        check_count(value, limits_from(info.context).max_context, "original_max_position", "max_context")
        return value

    @model_validator(mode="after")
    def _check_order(self) -> "Llama3RopeScaling":
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"high_freq_factor={self.high_freq_factor} must exceed low_freq_factor={self.low_freq_factor}"
            )
        return self


class RopeConfig(StrictModel):
    """Rotary embedding. ``style``: ``half`` rotates (x[i], x[i+d/2]) as Hugging Face / NeoX do;
    ``interleaved`` rotates (x[2i], x[2i+1]) as Meta's original Llama and llama2.c do.

    ``inv_freq`` is an explicit list of per-pair angular frequencies (length head_dim/2), or one
    such list per kv head (query heads use their group's list); when set, ``theta`` and
    ``scaling`` are ignored (upcycling keeps a teacher's chosen frequencies this way).
    """

    theta: float = Field(10000.0, gt=0)
    style: Literal["half", "interleaved"] = "half"
    scaling: Llama3RopeScaling | None = None
    inv_freq: list[float] | list[list[float]] | None = None


class _AttentionBase(StrictModel):
    num_heads: int = Field(gt=0)
    num_kv_heads: int | None = Field(None, gt=0, description="GQA/MQA: defaults to num_heads")
    bias: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("num_heads", "num_kv_heads", "head_dim", "attn_dim", "sem_dim", "geo_dim", "v_dim",
                     mode="after", check_fields=False)
    @classmethod
    def _check_width(cls, value: int | None, info: ValidationInfo) -> int | None:
        check_count(value, limits_from(info.context).max_width, info.field_name, "max_width")
        return value

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @model_validator(mode="after")
    def _check_heads(self):
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.kv_heads}"
            )
        return self


def _check_rope(rope: RopeConfig | None, head_dim: int, what: str, kv_heads: int | None = None) -> None:
    if rope is None:
        return
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even {what}, got {head_dim}")
    freqs = rope.inv_freq
    if freqs is None:
        return
    lists = freqs if freqs and isinstance(freqs[0], list) else [freqs]
    if len(lists) > 1 and kv_heads is not None and len(lists) != kv_heads:
        raise ValueError(f"rope.inv_freq has {len(lists)} per-head lists; num_kv_heads={kv_heads} needs one each")
    for entry in lists:
        if len(entry) != head_dim // 2:
            raise ValueError(f"rope.inv_freq has {len(entry)} entries; {what}={head_dim} needs {head_dim // 2}")


class StandardAttentionConfig(_AttentionBase):
    """Multi-head attention; ``num_kv_heads`` < ``num_heads`` gives GQA (1 gives MQA).

    ``head_dim`` defaults to d_model / num_heads.
    """

    type: Literal["standard"] = "standard"
    head_dim: int | None = Field(None, gt=0)
    rope: RopeConfig | None = Field(default_factory=RopeConfig)


class BottleneckAttentionConfig(_AttentionBase):
    """Q/K/V projected to ``attn_dim`` < d_model before scoring (paper section 3.2)."""

    type: Literal["bottleneck"] = "bottleneck"
    attn_dim: int = Field(gt=0)
    rope: RopeConfig | None = Field(default_factory=RopeConfig)

    @model_validator(mode="after")
    def _check_dims(self) -> "BottleneckAttentionConfig":
        if self.attn_dim % self.num_heads:
            raise ValueError(f"attn_dim={self.attn_dim} is not divisible by num_heads={self.num_heads}")
        _check_rope(self.rope, self.attn_dim // self.num_heads, "attn_dim/num_heads", self.kv_heads)
        return self


class DecoupledAttentionConfig(_AttentionBase):
    """Decoupled Bottleneck Attention (paper 3.3-3.5).

    score = q_sem.k_sem / sqrt(sem_head_dim) + q_geo.k_geo / sqrt(geo_head_dim), RoPE on the
    geometric path only. ``sem_dim``/``geo_dim``/``v_dim`` are query-side totals over all heads
    (per-head dims are these divided by ``num_heads``); the KV side has ``num_kv_heads`` heads.
    """

    type: Literal["decoupled"] = "decoupled"
    sem_dim: int = Field(gt=0)
    geo_dim: int = Field(gt=0)
    v_dim: int | None = Field(None, gt=0, description="defaults to sem_dim + geo_dim")
    rope: RopeConfig = Field(default_factory=RopeConfig)
    null_token: bool = False
    tie_qk: bool = False
    gate: bool = False

    @model_validator(mode="after")
    def _check_dims(self) -> "DecoupledAttentionConfig":
        for name in ("sem_dim", "geo_dim", "v_dim"):
            value = getattr(self, name)
            if value is not None and value % self.num_heads:
                raise ValueError(f"{name}={value} is not divisible by num_heads={self.num_heads}")
        _check_rope(self.rope, self.geo_dim // self.num_heads, "geo_dim/num_heads", self.kv_heads)
        if self.tie_qk and self.kv_heads != self.num_heads:
            raise ValueError(
                "tie_qk needs num_kv_heads == num_heads (a tied semantic projection cannot "
                f"differ between query and key heads); got num_heads={self.num_heads}, "
                f"num_kv_heads={self.kv_heads}"
            )
        return self


AttentionConfig = Annotated[
    Union[StandardAttentionConfig, BottleneckAttentionConfig, DecoupledAttentionConfig],
    Field(discriminator="type"),
]


@dataclass(frozen=True)
class KeyField:
    """One key field of a cache: ``name`` (``k``, ``k_sem``, ``k_geo``), per-head dim, RoPE'd."""

    name: str
    head_dim: int
    rotary: bool


@dataclass(frozen=True)
class AttentionDims:
    """Numbers every consumer of an attention spec needs, resolved against d_model."""

    num_heads: int
    num_kv_heads: int
    key_fields: tuple[KeyField, ...]
    v_head_dim: int
    null_token: bool = False

    @property
    def qk_head_dim(self) -> int:
        return sum(f.head_dim for f in self.key_fields)

    @property
    def cache_fields(self) -> dict[str, int]:
        """Cache field name -> per-kv-head dim, keys first then ``v``."""
        out = {f.name: f.head_dim for f in self.key_fields}
        out["v"] = self.v_head_dim
        return out


def attention_dims(cfg: StandardAttentionConfig | BottleneckAttentionConfig | DecoupledAttentionConfig,
                   d_model: int) -> AttentionDims:
    """Resolve per-head dims of ``cfg`` for a model of width ``d_model``."""
    h, kv = cfg.num_heads, cfg.kv_heads
    if isinstance(cfg, DecoupledAttentionConfig):
        v_dim = cfg.v_dim if cfg.v_dim is not None else cfg.sem_dim + cfg.geo_dim
        fields = (KeyField("k_sem", cfg.sem_dim // h, False), KeyField("k_geo", cfg.geo_dim // h, True))
        return AttentionDims(h, kv, fields, v_dim // h, cfg.null_token)
    if isinstance(cfg, BottleneckAttentionConfig):
        hd = cfg.attn_dim // h
    else:
        hd = cfg.head_dim if cfg.head_dim is not None else d_model // h
    return AttentionDims(h, kv, (KeyField("k", hd, cfg.rope is not None),), hd)


def check_attention_against_width(cfg, d_model: int) -> None:
    """Cross-checks that need d_model; raises ValueError with the reason."""
    if isinstance(cfg, StandardAttentionConfig) and cfg.head_dim is None:
        if d_model % cfg.num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={cfg.num_heads}")
        _check_rope(cfg.rope, d_model // cfg.num_heads, "head_dim", cfg.kv_heads)
    elif isinstance(cfg, StandardAttentionConfig):
        _check_rope(cfg.rope, cfg.head_dim, "head_dim", cfg.kv_heads)
    if isinstance(cfg, BottleneckAttentionConfig) and cfg.attn_dim >= d_model:
        raise ValueError(f"bottleneck attn_dim={cfg.attn_dim} must be smaller than d_model={d_model}")
