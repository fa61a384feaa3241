"""Attamba, registered as the variant ``attamba``: keys and values made by selective state space
models that restart at every chunk of P tokens; a query attends to the keys at chunk boundaries
plus its L most recent tokens.

Per layer (``u_k = x`` or ``W_k x`` with ``kv_proj``, likewise ``u_v``):

    K = u_k + SSM_K(u_k)      V = u_v + SSM_V(u_v)      (``nn.ssm.SelectiveSSM``, Mamba-2 style)

RoPE rotates the queries and the SSM-made keys. Chunks: positions are cut into regions
[cP, (c+1)P); region c's chunk ends at ``c*P + end_offset(c)``; the SSM state and its conv window
restart at the first token after every chunk end (and at position 0), so a token's K/V depends
only on tokens of its own chunk. ``chunking``:

- ``uniform``: ends at P-1, 2P-1, ... (``end_offset = P - 1``);
- ``cyclic``: layer l shifts the ends by s = min(P-1, l * (P // num_layers)) (ends at
  s-1, s-1+P, ...; ``end_offset = (P - 1 + s) mod P``);
- ``jitter``: ``end_offset(c)`` a fixed hash of (c, layer) in 0..P-1: chunks of 1..2P-1 tokens,
  P on average, placed differently in every layer.

Boundaries are the chunk ends plus position 0 (and the sequence's last position, which only its
own query could read, through the window). Query t sees key k iff

    (k < t and k is a boundary) or t - L <= k <= t.

Paths (tests compare them):

- ``reference_attention``: the definition with the explicit per-query key set (``key_set``) in
  float64-capable torch, from K/V made by the sequential SSM recurrence;
- training / prefill without a cache: ``AttambaMask`` through ``backends.attend`` (FlexAttention
  where it runs, else the eager masked reference), K/V from the chunked (SSD) scan on the CPU and
  the fused Triton scan on CUDA;
- cached (``cache.chunked.ChunkedLayerCache``): K/V only at boundaries (one row per region plus
  the sink), a ring of the newest L + 1 (+ rollback) raw rows, and the SSM/conv states of the
  newest positions; one new token (decode) advances both SSMs by one step and attends over the
  ring and the boundary rows, with fixed shapes and device-side positions only (CUDA-graph
  capturable); a chunk (prefill) runs the scan from the stored state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from attnlab.config.attention import (AttentionDims, AttentionSpec, ChunkLayout, KeyField, RopeConfig, _check_rope,
                                      check_recent_window)
from attnlab.config.limits import check_count, limits_from
from attnlab.config.variants import register_variant
from attnlab.errors import AttnlabError
from attnlab.nn.attention.base import AttentionLayer, Projected, split_heads
from attnlab.nn.attention.functional import masked_attention
from attnlab.nn.context import ForwardContext
from attnlab.nn.rope import RotaryEmbedding
from attnlab.nn.ssm import SelectiveSSM, SSMState

Chunking = Literal["uniform", "cyclic", "jitter"]


class AttambaAttentionConfig(AttentionSpec):
    """SSM-made keys/values over chunks (module docstring). ``head_dim`` defaults to d_model /
    num_heads; without ``kv_proj`` the key/value width num_kv_heads * head_dim must equal d_model
    (K = x + SSM(x))."""

    description: ClassVar[str] = ("attamba: keys/values made by chunk-restarting selective SSMs; queries see "
                                  "chunk-boundary keys plus a window of recent tokens")
    mixed_policy: ClassVar[dict[str, str]] = {"k": "q8_0", "v": "q8_0"}

    type: Literal["attamba"] = "attamba"
    head_dim: int | None = Field(None, gt=0)
    chunk_size: int = Field(8, description="P: tokens per chunk (>= 1)")
    window: int = Field(32, description="L: recent positions each query sees besides itself (>= 0)")
    chunking: Chunking = "uniform"
    d_state: int = Field(16, gt=0, description="SSM state size N")
    ssm_heads: int | None = Field(None, gt=0, description="SSM heads; default width / 16 (at least 1)")
    expand: int = Field(1, gt=0, description="SSM inner width = expand * key width")
    conv_width: int = Field(4, gt=1)
    kv_proj: bool = Field(False, description="W_k / W_v before the SSMs (the paper's ablation)")
    num_layers: int | None = Field(None, gt=0, description="layers of the model (cyclic shifts); filled in")
    rope: RopeConfig | None = Field(default_factory=RopeConfig)

    @field_validator("chunk_size", mode="after")
    @classmethod
    def _check_chunk(cls, value: int, info: ValidationInfo) -> int:
        if value < 1:
            raise ValueError(f"attamba chunk_size (P) must be >= 1, got {value}")
        check_count(value, limits_from(info.context).max_context, "chunk_size", "max_context")
        return value

    _check_window = field_validator("window", mode="after")(check_recent_window)

    def head_width(self, d_model: int) -> int:
        return self.head_dim if self.head_dim is not None else d_model // self.num_heads

    def ssm_width(self, d_model: int) -> int:
        return self.kv_heads * self.head_width(d_model)

    def ssm_head_count(self, d_model: int) -> int:
        width = self.ssm_width(d_model)
        return self.ssm_heads if self.ssm_heads is not None else max(1, width // 16)

    def check_width(self, d_model: int) -> None:
        if self.head_dim is None and d_model % self.num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={self.num_heads}")
        width = self.ssm_width(d_model)
        if not self.kv_proj and width != d_model:
            raise ValueError(f"attamba without kv_proj makes K = x + SSM(x), so num_kv_heads * head_dim "
                             f"({self.kv_heads} * {self.head_width(d_model)} = {width}) must equal "
                             f"d_model={d_model}; set kv_proj: true")
        d_inner, heads = self.expand * width, self.ssm_head_count(d_model)
        if d_inner % heads:
            raise ValueError(f"attamba ssm_heads={heads} does not divide the SSM width expand * key width = "
                             f"{self.expand} * {width} = {d_inner}")
        _check_rope(self.rope, self.head_width(d_model), "head_dim", self.kv_heads)

    def check_context(self, context: int) -> None:
        for name in ("chunk_size", "window"):
            if getattr(self, name) > context:
                raise ValueError(f"attamba {name}={getattr(self, name)} is larger than the context "
                                 f"(block_size={context})")

    def for_model(self, context: int, num_layers: int) -> "AttambaAttentionConfig":
        if self.num_layers is not None:
            return self
        return self.model_copy(update={"num_layers": num_layers})

    def dims(self, d_model: int) -> AttentionDims:
        hd = self.head_width(d_model)
        width, heads = self.ssm_width(d_model), self.ssm_head_count(d_model)
        d_inner = self.expand * width
        conv_dim = d_inner + 2 * self.d_state
        states = tuple((f"{name}_{part}", shape) for name in ("k", "v")
                       for part, shape in (("conv", (conv_dim, self.conv_width - 1)),
                                           ("ssm", (heads, d_inner // heads, self.d_state))))
        layout = ChunkLayout(self.chunk_size, self.window, states)
        return AttentionDims(self.num_heads, self.kv_heads, (KeyField("k", hd, self.rope is not None),), hd,
                             chunks=layout)

    def approx_params(self, d_model: int) -> int:
        dims = self.dims(d_model)
        h, hd = dims.num_heads, dims.v_head_dim
        width, heads = self.ssm_width(d_model), self.ssm_head_count(d_model)
        d_inner = self.expand * width
        ssm = width * (2 * d_inner + 2 * self.d_state + heads) + d_inner * width
        return 2 * d_model * h * hd + 2 * ssm + (2 * d_model * width if self.kv_proj else 0)

    def label(self, dims: AttentionDims) -> str:
        kv = f"/kv{dims.num_kv_heads}" if dims.num_kv_heads != dims.num_heads else ""
        extra = " +Wkv" if self.kv_proj else ""
        return (f"attamba h{dims.num_heads}{kv} hd{dims.v_head_dim} P{self.chunk_size}/L{self.window} "
                f"{self.chunking} N{self.d_state}{extra}")


# ---------------------------------------------------------------- chunk boundaries
@dataclass(frozen=True)
class ChunkRule:
    """Where one layer's chunks end (module docstring): broadcasting integer ops only, so the
    same code runs in the eager mask, under FlexAttention's vmap and in a captured decode step.
    Hash arithmetic stays below 2^31 (FlexAttention's indices are int32)."""

    chunk_size: int
    chunking: str
    shift: int = 0
    layer: int = 0

    @classmethod
    def for_layer(cls, cfg: AttambaAttentionConfig, layer_index: int) -> "ChunkRule":
        p = cfg.chunk_size
        layers = cfg.num_layers if cfg.num_layers is not None else layer_index + 1
        shift = min(p - 1, layer_index * (p // layers)) if cfg.chunking == "cyclic" else 0
        return cls(p, cfg.chunking, shift, layer_index)

    def end_offset(self, region: torch.Tensor) -> torch.Tensor:
        """Offset in region ``region`` (integer tensor) of its chunk's last token."""
        p = self.chunk_size
        if self.chunking == "jitter":
            mixed = ((region % 65521) * 32749 + 7919 * (self.layer % 64 + 1)) % 65521
            return mixed % p
        return torch.full_like(region, (p - 1 + self.shift) % p)

    def is_end(self, pos: torch.Tensor) -> torch.Tensor:
        """Whether ``pos`` is the last token of its chunk (False for negative positions)."""
        p = self.chunk_size
        region = torch.div(pos, p, rounding_mode="floor")
        return (pos >= 0) & (pos - region * p == self.end_offset(region))

    def is_boundary(self, pos: torch.Tensor) -> torch.Tensor:
        return (pos == 0) | self.is_end(pos)

    def restarts(self, pos: torch.Tensor) -> torch.Tensor:
        """Whether the SSM state restarts before absorbing ``pos`` (a chunk starts there)."""
        return (pos <= 0) | self.is_end(pos - 1)

    def end_position(self, region: torch.Tensor) -> torch.Tensor:
        """The position of region ``region``'s chunk end."""
        return region * self.chunk_size + self.end_offset(region)


def key_set(t: int, *, window: int, rule: ChunkRule) -> list[int]:
    """The explicit key set of a query at position t: boundaries before t, then t - L .. t."""
    recent = set(range(max(0, t - window), t + 1))
    pos = torch.arange(t)
    boundaries = set(pos[rule.is_boundary(pos)].tolist())
    return sorted(recent | boundaries)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, window: int,
                        rule: ChunkRule) -> torch.Tensor:
    """The definition: per query, its explicit key set -> (B, H, T, d_v) in the float32-or-better
    dtype of the inputs. q (B, H, T, d); k, v (B, KV, T, d)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=acc, device=q.device)
    for t in range(q.shape[2]):
        keys = key_set(t, window=window, rule=rule)
        kk = k[:, :, keys].repeat_interleave(group, 1)
        vv = v[:, :, keys].repeat_interleave(group, 1)
        probs = torch.softmax((q[:, :, t:t + 1] @ kk.transpose(-1, -2)) * scale, dim=-1)
        out[:, :, t] = (probs @ vv)[:, :, 0]
    return out


@dataclass(frozen=True)
class AttambaMask:
    """The key set as a mask over raw keys (key j at position j; queries at ``q_offset + i``):
    the mask interface ``backends.attend`` reads."""

    window: int
    rule: ChunkRule
    q_offset: int = 0
    key_lengths: None = None
    is_causal_only: ClassVar[bool] = False

    def check(self, t_len: int, s_len: int) -> None:
        if s_len < self.q_offset + t_len:
            raise ValueError(f"AttambaMask: {t_len} queries at offset {self.q_offset} need {self.q_offset + t_len} "
                             f"keys, got {s_len}")

    def to(self, device) -> "AttambaMask":
        return self

    def visible(self, b, q_pos: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        recent = (kv_idx <= q_pos) & (kv_idx >= q_pos - self.window)
        return recent | ((kv_idx < q_pos) & self.rule.is_boundary(kv_idx))

    def dense(self, batch: int, t_len: int, s_len: int, device) -> torch.Tensor:
        q_pos = torch.arange(t_len, device=device).view(1, -1, 1) + self.q_offset
        kv = torch.arange(s_len, device=device).view(1, 1, -1)
        return self.visible(None, q_pos, kv)


# ---------------------------------------------------------------- the layer
class AttambaAttention(AttentionLayer):
    """Queries by a linear map, keys and values by ``u + SSM(u)``; cache spec ``k``, ``v`` with a
    ``ChunkLayout`` (boundary rows + window ring + SSM states)."""

    def __init__(self, cfg: AttambaAttentionConfig, d_model: int, layer_index: int):
        dims = cfg.dims(d_model)
        super().__init__(dims, layer_index, cfg.dropout)
        h, kv, hd = dims.num_heads, dims.num_kv_heads, dims.v_head_dim
        width = kv * hd
        self.query = nn.Linear(d_model, h * hd, bias=cfg.bias)
        self.out = nn.Linear(h * hd, d_model, bias=cfg.bias)
        self.key = nn.Linear(d_model, width, bias=cfg.bias) if cfg.kv_proj else None
        self.value = nn.Linear(d_model, width, bias=cfg.bias) if cfg.kv_proj else None
        ssm = dict(d_state=cfg.d_state, num_heads=cfg.ssm_head_count(d_model), expand=cfg.expand,
                   conv_width=cfg.conv_width)
        self.ssm_k = SelectiveSSM(width, **ssm)
        self.ssm_v = SelectiveSSM(width, **ssm)
        self.rope = RotaryEmbedding(cfg.rope, hd) if cfg.rope is not None else None
        self.window, self.chunk_size = cfg.window, cfg.chunk_size
        self.rule = ChunkRule.for_layer(cfg, layer_index)
        self.mask = AttambaMask(cfg.window, self.rule)
        self.scan = "auto"  # SelectiveSSM scan: "auto" | "chunked" | "reference" | "kernel"

    # ------------------------------------------------------------------ shared pieces
    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.key(x) if self.key is not None else x), (self.value(x) if self.value is not None else x)

    def _heads(self, q, k, v, positions):
        q = split_heads(q, self.dims.num_heads)
        k = split_heads(k, self.dims.num_kv_heads)
        v = split_heads(v, self.dims.num_kv_heads)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        return q, k, v

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> Projected:
        """Training / prefill without a cache: the SSMs over the whole sequence, restarting at
        chunk starts (absolute ``positions``; the sequence's first token always starts one)."""
        restart = self.rule.restarts(positions)
        uk, uv = self._inputs(x)
        k = uk + self.ssm_k(uk, restart, scan=self.scan)
        v = uv + self.ssm_v(uv, restart, scan=self.scan)
        q, k, v = self._heads(self.query(x), k, v, positions)
        return Projected([q], [k], v)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if ctx.cache is None:
            return super().forward(x, ctx)
        batch, t_len, _ = x.shape
        cache = ctx.cache.layers[self.layer_index]
        step = ctx.step
        if t_len == 1 and (step.host_valid is None or all(n == 1 for n in step.host_valid)):
            y = self._decode(x, cache, step)
        else:
            y = self._chunk(x, cache, step)
        return self.out(y.transpose(1, 2).reshape(batch, t_len, -1))

    # ------------------------------------------------------------------ one token (capturable)
    def _decode(self, x: torch.Tensor, cache, step) -> torch.Tensor:
        pos = step.offsets.to(torch.long)  # (B,) the new token's position
        restart = self.rule.restarts(pos)
        states = cache.load_states(pos - 1)
        uk, uv = self._inputs(x[:, 0])
        st_k = SSMState(states["k_conv"], states["k_ssm"])
        st_v = SSMState(states["v_conv"], states["v_ssm"])
        k = uk + self.ssm_k.step(uk, st_k, restart)
        v = uv + self.ssm_v.step(uv, st_v, restart)
        cache.store_states(pos, {"k_conv": st_k.conv, "k_ssm": st_k.ssm, "v_conv": st_v.conv, "v_ssm": st_v.ssm})
        q, k, v = self._heads(self.query(x), k.unsqueeze(1), v.unsqueeze(1), pos.unsqueeze(1))
        row = torch.where(pos == 0, torch.zeros_like(pos),
                          torch.where(self.rule.is_end(pos), 1 + torch.div(pos, self.chunk_size, rounding_mode="floor"),
                                      torch.full_like(pos, cache.scratch_row)))
        cache.append_token(pos, row, {"k": k, "v": v})
        ring_k, ring_v, ring_pos = cache.ring_rows(pos, {"k": k, "v": v})
        num_rows = cache.rows_for(step.max_length)
        pool_k, pool_v = cache.boundary_rows(num_rows)
        pool_pos = self.row_positions(num_rows, q.device)
        p = pos.unsqueeze(1)
        ring_ok = (ring_pos >= 0) & (ring_pos <= p) & (ring_pos >= p - self.window)
        pool_ok = (pool_pos.unsqueeze(0) >= 0) & (pool_pos.unsqueeze(0) < p - self.window)
        visible = torch.cat([ring_ok, pool_ok.expand(pos.shape[0], -1)], 1).unsqueeze(1)  # (B, 1, R + rows)
        return masked_attention([q], [torch.cat([ring_k, pool_k], 2)], torch.cat([ring_v, pool_v], 2),
                                self.scales, visible).to(v.dtype)

    def row_positions(self, num_rows: int, device) -> torch.Tensor:
        """Position held by boundary rows 0..num_rows-1: row 0 the sink (position 0), row 1 + c
        region c's chunk end; -1 where region c's end is position 0 (the sink row holds it)."""
        rows = torch.arange(num_rows, device=device)
        ends = self.rule.end_position(rows - 1)
        return torch.where(rows == 0, torch.zeros_like(rows), torch.where(ends == 0, torch.full_like(rows, -1), ends))

    # ------------------------------------------------------------------ chunks (host offsets)
    def _chunk(self, x: torch.Tensor, cache, step) -> torch.Tensor:
        if step.host_offsets is None:
            raise AttnlabError("an attamba chunk of several tokens needs host offsets (eager runtime steps)")
        batch, t_len, _ = x.shape
        hd = self.dims.v_head_dim
        out = torch.zeros(batch, self.dims.num_heads, t_len, hd, dtype=x.dtype, device=x.device)
        ends = [o + n for o, n in zip(step.host_offsets, step.host_valid)]
        cache.check_capacity(max(ends))
        for b, (offset, n) in enumerate(zip(step.host_offsets, step.host_valid)):
            if n == 0:
                continue
            positions = torch.arange(offset, offset + n, device=x.device)
            k, v = self._chunk_kv(x[b:b + 1, :n], positions, cache, b)
            q, k, v = self._heads(self.query(x[b:b + 1, :n]), k, v, positions)
            ring_k, ring_v, ring_pos = cache.stored_ring(b)  # (1, KV, R, d), (R,)
            num_rows = cache.rows_for(offset)
            pool_k, pool_v = cache.boundary_rows(num_rows, b)
            pool_pos = self.row_positions(num_rows, x.device)
            qp = positions.view(-1, 1)
            ring_ok = (ring_pos >= 0) & (ring_pos < offset) & (ring_pos >= qp - self.window)
            own_ok = self.mask.visible(None, qp, positions.view(1, -1))
            pool_ok = (pool_pos >= 0) & (pool_pos < offset) & (pool_pos < qp - self.window)
            visible = torch.cat([ring_ok, own_ok, pool_ok], 1).unsqueeze(0)  # (1, n, R + n + rows)
            keys = torch.cat([ring_k, k, pool_k], 2)
            values = torch.cat([ring_v, v, pool_v], 2)
            out[b:b + 1, :, :n] = masked_attention([q], [keys], values, self.scales, visible)
            is_end = self.rule.is_end(positions)
            rows = torch.where(positions == 0, torch.zeros_like(positions),
                               1 + torch.div(positions, self.chunk_size, rounding_mode="floor"))
            keep = is_end | (positions == 0)
            cache.write_chunk(b, positions, rows[keep], keep, {"k": k, "v": v})
        return out

    def _chunk_kv(self, x: torch.Tensor, positions: torch.Tensor, cache, b: int):
        """K/V (1, n, width) of one sequence's chunk at ``positions``, continuing from the stored
        state of position ``positions[0] - 1``; the states of the chunk's newest positions are
        stored (the last ``cache.history`` of them by single steps, so that a rollback into the
        chunk finds its state)."""
        offset, n = int(positions[0]), positions.numel()
        restart = self.rule.restarts(positions).view(1, -1)
        prior = cache.states_at(b, offset - 1) if offset > 0 else None
        uk, uv = self._inputs(x)
        stepped = min(n, cache.history)
        outs = []
        for name, ssm, u in (("k", self.ssm_k, uk), ("v", self.ssm_v, uv)):
            state = None if prior is None else SSMState(prior[f"{name}_conv"], prior[f"{name}_ssm"])
            pieces = []
            if n > stepped:
                y, state = ssm(u[:, :n - stepped], restart[:, :n - stepped], scan=self.scan, state=state,
                               return_state=True)
                pieces.append(y)
            if state is None:
                state = ssm.zero_state(1, u.device)
            for i in range(n - stepped, n):
                pieces.append(ssm.step(u[:, i], state, restart[:, i]).unsqueeze(1))
                cache.store_state(b, int(positions[i]), name, state)
            outs.append(u + torch.cat(pieces, 1))
        return outs[0], outs[1]


register_variant(AttambaAttentionConfig, AttambaAttention)

__all__ = ["AttambaAttention", "AttambaAttentionConfig", "AttambaMask", "ChunkRule", "key_set",
           "reference_attention"]
