"""Typed specs for the attention zoo and rotary position embeddings.

Every variant is described by *key fields*: attention scores are ``sum_f scale_f * (q_f . k_f)``
over one field (standard/bottleneck: ``k``) or two (decoupled: ``k_sem`` without RoPE and
``k_geo`` with RoPE), followed by softmax and a weighted sum of ``v``. ``AttentionDims`` is that
description in numbers; caches, byte accounting and kernels all read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

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


class AttentionSpec(StrictModel):
    """Base of every attention variant's config. A variant (see ``attnlab.config.variants``)
    subclasses it with a ``type: Literal["name"]`` field and says, in numbers, what its layer
    computes and caches (``dims``); everything else (plans, byte accounting, cache allocation,
    policy checks, summaries) reads that description.

    Class attributes: ``description`` (one line for plans), ``mixed_policy`` (the variant's
    heterogeneous cache policy, field -> format: the paper's analogue for this variant)."""

    description: ClassVar[str] = ""
    mixed_policy: ClassVar[dict[str, str]] = {}  # names every field the variant stores

    type: str
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

    def dims(self, d_model: int) -> "AttentionDims":
        """The layer's cache spec and per-head dims for a model of width ``d_model``."""
        raise NotImplementedError(f"attention variant {type(self).__name__} must define dims()")

    def check_width(self, d_model: int) -> None:
        """Cross-checks that need d_model; raises ValueError with the reason."""

    def check_context(self, context: int) -> None:
        """Cross-checks that need the model's context length (``block_size``); raises
        ValueError with the reason."""

    def for_context(self, context: int) -> "AttentionSpec":
        """This spec with anything derived from the context length filled in (what the layer
        is built from; default: unchanged)."""
        return self

    def for_model(self, context: int, num_layers: int) -> "AttentionSpec":
        """This spec with anything derived from the model (context length, number of layers)
        filled in; default: ``for_context``."""
        return self.for_context(context)

    def approx_params(self, d_model: int) -> int:
        """Weights of the projections (biases and small extras ignored), from ``dims``; variants
        whose projections are not q/k/v/out of these widths override it."""
        dims = self.dims(d_model)
        h, kv = dims.num_heads, dims.num_kv_heads
        qk, v = dims.qk_head_dim, dims.v_head_dim
        return d_model * (h * qk + kv * qk + kv * v) + h * v * d_model

    def label(self, dims: "AttentionDims") -> str:
        """A compact label for summaries, e.g. 'standard h12/kv4 hd64'."""
        widths = "/".join(f"{f.name}{f.head_dim}" for f in dims.key_fields)
        return f"{self.type} {_heads(dims)} {widths}/v{dims.v_head_dim}"


def _heads(dims: "AttentionDims") -> str:
    return f"h{dims.num_heads}" + (f"/kv{dims.num_kv_heads}" if dims.num_kv_heads != dims.num_heads else "")


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


def check_recent_window(value: int, info: ValidationInfo) -> int:
    """A ``window`` of recent positions besides the query's own (attamba's L, sliding_window's):
    >= 0 and within ``limits.max_context``."""
    if value < 0:
        raise ValueError(f"window must be >= 0 (recent positions besides the query's own), got {value}")
    check_count(max(value, 1), limits_from(info.context).max_context, "window", "max_context")
    return value


class StandardAttentionConfig(AttentionSpec):
    """Multi-head attention; ``num_kv_heads`` < ``num_heads`` gives GQA (1 gives MQA).

    ``head_dim`` defaults to d_model / num_heads.
    """

    description: ClassVar[str] = "multi-head attention (GQA/MQA via num_kv_heads), RoPE on q/k"
    mixed_policy: ClassVar[dict[str, str]] = {"k": "q8_0", "v": "q4_0"}

    type: Literal["standard"] = "standard"
    head_dim: int | None = Field(None, gt=0)
    rope: RopeConfig | None = Field(default_factory=RopeConfig)

    def dims(self, d_model: int) -> "AttentionDims":
        hd = self.head_dim if self.head_dim is not None else d_model // self.num_heads
        return AttentionDims(self.num_heads, self.kv_heads, (KeyField("k", hd, self.rope is not None),), hd)

    def check_width(self, d_model: int) -> None:
        if self.head_dim is None and d_model % self.num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={self.num_heads}")
        _check_rope(self.rope, self.dims(d_model).v_head_dim, "head_dim", self.kv_heads)

    def label(self, dims: "AttentionDims") -> str:
        return f"standard {_heads(dims)} hd{dims.v_head_dim}"


class BottleneckAttentionConfig(AttentionSpec):
    """Q/K/V projected to ``attn_dim`` < d_model before scoring (paper section 3.2)."""

    description: ClassVar[str] = "bottleneck attention: q/k/v projected to attn_dim < d_model"
    mixed_policy: ClassVar[dict[str, str]] = {"k": "q8_0", "v": "q4_0"}

    type: Literal["bottleneck"] = "bottleneck"
    attn_dim: int = Field(gt=0)
    rope: RopeConfig | None = Field(default_factory=RopeConfig)

    def dims(self, d_model: int) -> "AttentionDims":
        hd = self.attn_dim // self.num_heads
        return AttentionDims(self.num_heads, self.kv_heads, (KeyField("k", hd, self.rope is not None),), hd)

    def check_width(self, d_model: int) -> None:
        if self.attn_dim >= d_model:
            raise ValueError(f"bottleneck attn_dim={self.attn_dim} must be smaller than d_model={d_model}")

    def label(self, dims: "AttentionDims") -> str:
        return f"bottleneck {_heads(dims)} hd{dims.v_head_dim}"

    @model_validator(mode="after")
    def _check_dims(self) -> "BottleneckAttentionConfig":
        if self.attn_dim % self.num_heads:
            raise ValueError(f"attn_dim={self.attn_dim} is not divisible by num_heads={self.num_heads}")
        _check_rope(self.rope, self.attn_dim // self.num_heads, "attn_dim/num_heads", self.kv_heads)
        return self


class DecoupledAttentionConfig(AttentionSpec):
    """Decoupled Bottleneck Attention (paper 3.3-3.5).

    score = q_sem.k_sem / sqrt(sem_head_dim) + q_geo.k_geo / sqrt(geo_head_dim), RoPE on the
    geometric path only. ``sem_dim``/``geo_dim``/``v_dim`` are query-side totals over all heads
    (per-head dims are these divided by ``num_heads``); the KV side has ``num_kv_heads`` heads.
    """

    description: ClassVar[str] = ("decoupled bottleneck attention (DBA): semantic keys without RoPE + "
                                  "geometric keys with RoPE")
    mixed_policy: ClassVar[dict[str, str]] = {"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}  # the paper's

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

    def dims(self, d_model: int) -> "AttentionDims":
        h = self.num_heads
        v_dim = self.v_dim if self.v_dim is not None else self.sem_dim + self.geo_dim
        fields = (KeyField("k_sem", self.sem_dim // h, False), KeyField("k_geo", self.geo_dim // h, True))
        return AttentionDims(h, self.kv_heads, fields, v_dim // h, self.null_token)

    def label(self, dims: "AttentionDims") -> str:
        sem, geo = dims.key_fields
        extras = [x for x, on in (("null", self.null_token), ("tied", self.tie_qk), ("gate", self.gate)) if on]
        text = f"decoupled {_heads(dims)} sem{sem.head_dim}/geo{geo.head_dim}/v{dims.v_head_dim}"
        return text + (f" +{'+'.join(extras)}" if extras else "")


@dataclass(frozen=True)
class KeyField:
    """One key field of a cache: ``name`` (``k``, ``k_sem``, ``k_geo``, ``c_kv``, ...), per-head
    dim, RoPE'd. ``row``: what one stored row is — ``token`` (one per token; the only kind the
    caches and kernels store today), ``block`` (one per block of tokens) or ``state`` (a
    recurrent state)."""

    name: str
    head_dim: int
    rotary: bool
    row: Literal["token", "block", "state"] = "token"


#: Butterfly's partner-block rules (``attnlab.nn.attention.butterfly.partner_block``)
PartnerRule = Literal["causal_shift", "xor", "random", "local_only"]
PARTNER_RULES: tuple[str, ...] = get_args(PartnerRule)


@dataclass(frozen=True)
class SummaryLayout:
    """A cache that keeps a sliding window of raw rows plus one summary row per completed
    block instead of every token (Butterfly): ``window`` newest positions, blocks of
    ``block_size`` positions. Its stored fields are the layer's fields (the window pool) and
    ``<field>_sum`` (the summary pool), each with its own format."""

    window: int
    block_size: int


@dataclass(frozen=True)
class ChunkLayout:
    """A cache that keeps key/value rows only at chunk boundaries plus a window of the newest
    raw rows, and recurrent states (Attamba): chunks of ``chunk_size`` positions, ``window`` recent
    positions besides the newest, ``states`` the (name, per-sequence shape) of every recurrent
    state the layer carries between tokens (kept in float32 or better); without ``boundary_rows`` the
    cache is the window ring alone (a sliding-window layer)."""

    chunk_size: int
    window: int
    states: tuple[tuple[str, tuple[int, ...]], ...] = ()
    boundary_rows: bool = True  # False: the window alone (a sliding-window layer)


@dataclass(frozen=True)
class AttentionDims:
    """Numbers every consumer of an attention spec needs, resolved against d_model."""

    num_heads: int
    num_kv_heads: int
    key_fields: tuple[KeyField, ...]
    v_head_dim: int
    null_token: bool = False
    value_alias: str | None = None  # values are read from this key field (MLA: the latent c_kv)
    summaries: SummaryLayout | None = None  # window + block summaries instead of every token
    chunks: ChunkLayout | None = None  # boundary rows + window + recurrent states instead of every token

    @property
    def token_fields(self) -> dict[str, int]:
        """Fields stored per token (the window pool when ``summaries``): keys then ``v``."""
        out = {f.name: f.head_dim for f in self.key_fields}
        if self.value_alias is None:
            out["v"] = self.v_head_dim
        return out

    def __post_init__(self):
        if self.value_alias is not None:
            field = next((f for f in self.key_fields if f.name == self.value_alias), None)
            if field is None or field.head_dim != self.v_head_dim or field.rotary:
                raise ValueError(f"value_alias={self.value_alias!r} must name an unrotated key field of "
                                 f"v's width {self.v_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        return sum(f.head_dim for f in self.key_fields)

    @property
    def value_field(self) -> str:
        """The stored field values are read from: ``v`` or the aliased key field."""
        return self.value_alias or "v"

    @property
    def cache_fields(self) -> dict[str, int]:
        """Stored field name -> per-kv-head dim, keys first then ``v`` (absent when aliased), then
        with ``summaries`` the summary pool's ``<field>_sum`` of each."""
        out = self.token_fields
        if self.summaries is not None:
            out.update({f"{name}_sum": hd for name, hd in list(out.items())})
        return out


def attention_dims(cfg: AttentionSpec, d_model: int) -> AttentionDims:
    """Resolve per-head dims of ``cfg`` for a model of width ``d_model``."""
    return cfg.dims(d_model)


def check_attention_against_width(cfg: AttentionSpec, d_model: int) -> None:
    """Cross-checks that need d_model; raises ValueError with the reason."""
    cfg.check_width(d_model)
