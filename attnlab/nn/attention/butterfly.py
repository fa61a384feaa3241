"""Butterfly compressed attention, registered as the variant ``butterfly``: a zero-training sparse
retrofit of standard (GQA) attention.

A query at position p in block ``b = p // block_size`` sees

- the raw keys/values of the last ``window`` positions, p - window + 1 .. p, and
- the *summaries* (mean of the post-RoPE keys and of the values over the block, per kv head) of
  the sink block 0, the local block b - 1 and its partner block, restricted to completed blocks
  that end before the window starts ((j + 1) * block_size <= p - window + 1), so no token is
  counted twice; a block named by two rules is one key,

under one softmax (an exact merge of the window and summary streams). The partner of query
block b at ``stage`` s is (``partner_block``): ``causal_shift`` b - 2^s; ``xor`` b XOR 2^s,
dropped when later than b; ``random`` a fixed hash of (b, s) in 0..b-1; ``local_only`` none.
The stage of a layer is ``stage`` when given (e.g. the index among swapped layers, which the
retrofit writes), else the layer index mod ``num_stages``; ``num_stages`` defaults to
ceil(log2(number of blocks in the context)), filled in from the model's ``block_size``
(``for_context``).

The weights are those of ``StandardAttention`` (same names and shapes), so a standard layer's
state dict loads unchanged: retrofitting is a config change (``attnlab.convert.butterfly``).

Paths (all compute the same function; tests compare them):

- ``reference_attention``: the definition, per query from its explicit key set
  (``key_set``), in float64-capable torch; slow, for tests.
- training / prefill without a cache: keys ``[k ; block means]`` with ``ButterflyMask`` through
  ``backends.attend`` — FlexAttention (a block mask) where it can run, else the dense eager
  reference ``functional.masked_attention``.
- cached (``cache.summary.SummaryLayerCache``: a window ring + one summary row per block): a
  chunk attends over the ring, its own rows and the completed blocks' summaries; one new token
  (decode) over the ring plus its three candidate summaries, fixed shapes and device-side
  positions only, so the step can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from attnlab.config.attention import (
    PARTNER_RULES,
    AttentionDims,
    KeyField,
    PartnerRule,
    StandardAttentionConfig,
    SummaryLayout,
)
from attnlab.config.limits import check_count, limits_from
from attnlab.config.variants import register_variant
from attnlab.nn.attention.backends import attend
from attnlab.nn.attention.base import Projected
from attnlab.nn.attention.functional import masked_attention
from attnlab.nn.attention.standard import StandardAttention
from attnlab.nn.context import ForwardContext



class ButterflyAttentionConfig(StandardAttentionConfig):
    """Standard attention's projections with the Butterfly key set (module docstring)."""

    description: ClassVar[str] = ("butterfly: sliding window + sink/local/partner block summaries (zero-train "
                                  "sparse retrofit of standard attention)")
    mixed_policy: ClassVar[dict[str, str]] = {"k": "q8_0", "v": "q8_0", "k_sum": "q8_0", "v_sum": "q8_0"}

    type: Literal["butterfly"] = "butterfly"  # type: ignore[assignment]
    window: int = Field(64, gt=0, description="raw positions each query sees (itself included)")
    block_size: int = Field(128, gt=0, description="positions per summarised block")
    partner: PartnerRule = "causal_shift"
    stage: int | None = Field(None, ge=0, description="this layer's stage; default: layer index mod num_stages")
    num_stages: int | None = Field(None, gt=0, description="default: ceil(log2(context blocks))")

    @field_validator("window", "block_size", mode="after")
    @classmethod
    def _check_size(cls, value: int, info: ValidationInfo) -> int:
        check_count(value, limits_from(info.context).max_context, info.field_name, "max_context")
        return value

    def check_context(self, context: int) -> None:
        for name in ("window", "block_size"):
            if getattr(self, name) > context:
                raise ValueError(f"butterfly {name}={getattr(self, name)} is larger than the context "
                                 f"(block_size={context})")

    def for_context(self, context: int) -> "ButterflyAttentionConfig":
        if self.num_stages is not None:
            return self
        return self.model_copy(update={"num_stages": default_num_stages(context, self.block_size)})

    def dims(self, d_model: int) -> AttentionDims:
        hd = self.head_dim if self.head_dim is not None else d_model // self.num_heads
        return AttentionDims(self.num_heads, self.kv_heads, (KeyField("k", hd, self.rope is not None),), hd,
                             summaries=SummaryLayout(self.window, self.block_size))

    def label(self, dims: AttentionDims) -> str:
        kv = f"/kv{dims.num_kv_heads}" if dims.num_kv_heads != dims.num_heads else ""
        return (f"butterfly h{dims.num_heads}{kv} hd{dims.v_head_dim} w{self.window}/b{self.block_size} "
                f"{self.partner}")


def default_num_stages(context: int, block_size: int) -> int:
    """ceil(log2(N)) for N = ceil(context / block_size) blocks, at least 1."""
    blocks = -(-context // block_size)
    return max(1, math.ceil(math.log2(blocks))) if blocks > 1 else 1


# ---------------------------------------------------------------- the key set
def partner_block(rule: str, block: torch.Tensor, stage: int) -> torch.Tensor:
    """The partner of query block(s) ``block`` (integer tensor, any shape; broadcasting ops only,
    so FlexAttention can evaluate it under vmap); -1 where there is none."""
    step = 1 << stage
    if rule == "causal_shift":
        out = block - step
    elif rule == "xor":
        out = block ^ step
        out = torch.where(out > block, torch.full_like(out, -1), out)
    elif rule == "random":
        mixed = (block * 2654435761 + (stage + 1) * 2246822519) % 2147483647
        out = torch.where(block > 0, mixed % block.clamp(min=1), torch.full_like(block, -1))
    elif rule == "local_only":
        out = torch.full_like(block, -1)
    else:
        raise ValueError(f"unknown butterfly partner rule {rule!r} (rules: {', '.join(PARTNER_RULES)})")
    return torch.where(out >= 0, out, torch.full_like(out, -1))


def key_set(p: int, *, window: int, block_size: int, rule: str, stage: int) -> tuple[list[int], list[int]]:
    """The explicit key set of a query at position p: (raw positions, summarised blocks)."""
    start = max(0, p - window + 1)
    qb = p // block_size
    partner = int(partner_block(rule, torch.tensor(qb), stage))
    blocks = sorted({j for j in (0, qb - 1, partner) if j >= 0 and (j + 1) * block_size <= start})
    return list(range(start, p + 1)), blocks


def block_means(x: torch.Tensor, block_size: int, num_blocks: int | None = None) -> torch.Tensor:
    """Means over complete blocks: (B, KV, T, d) -> (B, KV, n, d) for the first n =
    ``num_blocks`` (default T // block_size) blocks; accumulated in float32 or better."""
    n = x.shape[2] // block_size if num_blocks is None else num_blocks
    acc = torch.promote_types(x.dtype, torch.float32)
    blocks = x[:, :, : n * block_size].to(acc).unflatten(2, (n, block_size))
    return blocks.mean(dim=3).to(x.dtype)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, window: int,
                        block_size: int, rule: str, stage: int) -> torch.Tensor:
    """The definition: per query, its explicit key set (``key_set``) -> (B, H, T, d_v) in the
    float32-or-better softmax dtype of the inputs. q (B, H, T, d); k, v (B, KV, T, d)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=acc, device=q.device)
    for p in range(q.shape[2]):
        raw, blocks = key_set(p, window=window, block_size=block_size, rule=rule, stage=stage)
        keys = [k[:, :, raw]] + [k[:, :, j * block_size:(j + 1) * block_size].mean(2, keepdim=True) for j in blocks]
        vals = [v[:, :, raw]] + [v[:, :, j * block_size:(j + 1) * block_size].mean(2, keepdim=True) for j in blocks]
        keys = torch.cat(keys, 2).repeat_interleave(group, 1)  # (B, H, n, d)
        vals = torch.cat(vals, 2).repeat_interleave(group, 1)
        probs = torch.softmax((q[:, :, p:p + 1] @ keys.transpose(-1, -2)) * scale, dim=-1)
        out[:, :, p] = (probs @ vals)[:, :, 0]
    return out


@dataclass(frozen=True)
class ButterflyMask:
    """The key set as a mask over ``num_raw`` raw keys followed by one key per block summary
    (kv index ``num_raw + j`` is block j): the mask interface ``backends.attend`` reads
    (``visible``, ``dense``, ``check``, ``to``, ``q_offset``, ``key_lengths``). Queries sit at
    positions ``q_offset + i``; raw key j at position j."""

    num_raw: int
    window: int
    block_size: int
    rule: str
    stage: int
    q_offset: int = 0
    key_lengths: None = None
    is_causal_only: ClassVar[bool] = False

    def check(self, t_len: int, s_len: int) -> None:
        if s_len < self.num_raw:
            raise ValueError(f"ButterflyMask over {self.num_raw} raw keys got only {s_len} keys")

    def to(self, device) -> "ButterflyMask":
        return self

    def visible(self, b, q_pos: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        raw = (kv_idx <= q_pos) & (kv_idx > q_pos - self.window)
        block = kv_idx - self.num_raw
        return torch.where(kv_idx < self.num_raw, raw, summary_visible(
            q_pos, block, window=self.window, block_size=self.block_size, rule=self.rule, stage=self.stage))

    def dense(self, batch: int, t_len: int, s_len: int, device) -> torch.Tensor:
        q_pos = torch.arange(t_len, device=device).view(1, -1, 1) + self.q_offset
        kv = torch.arange(s_len, device=device).view(1, 1, -1)
        return self.visible(None, q_pos, kv)


def summary_visible(q_pos: torch.Tensor, block: torch.Tensor, *, window: int, block_size: int, rule: str,
                    stage: int) -> torch.Tensor:
    """Whether the summary of ``block`` is in the key set of a query at ``q_pos`` (broadcasting)."""
    qb = q_pos // block_size
    named = (block == 0) | (block == qb - 1) | (block == partner_block(rule, qb, stage))
    return named & (block >= 0) & ((block + 1) * block_size <= q_pos - window + 1)


# ---------------------------------------------------------------- the layer
class ButterflyAttention(StandardAttention):
    """``StandardAttention`` with the Butterfly key set. Cache spec: ``k`` and ``v`` with a
    ``SummaryLayout`` (window pool + summary pool)."""

    def __init__(self, cfg: ButterflyAttentionConfig, d_model: int, layer_index: int):
        super().__init__(cfg, d_model, layer_index)
        self.window, self.block_size, self.rule = cfg.window, cfg.block_size, cfg.partner
        stages = cfg.num_stages if cfg.num_stages is not None else 1
        self.stage = cfg.stage if cfg.stage is not None else layer_index % stages

    def mask_for(self, num_raw: int, q_offset: int = 0) -> ButterflyMask:
        return ButterflyMask(num_raw, self.window, self.block_size, self.rule, self.stage, q_offset)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if ctx.cache is not None:
            return super().forward(x, ctx)
        batch, t_len, _ = x.shape
        p = self.project(x, ctx.positions)
        (q,), (k,), v = p.q, p.k, p.v
        keys = torch.cat([k, block_means(k, self.block_size)], dim=2)
        values = torch.cat([v, block_means(v, self.block_size)], dim=2)
        y = attend([q], [keys], values, self.scales, mask=self.mask_for(t_len), impl=ctx.attention_impl,
                   dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, t_len, -1))

    def _attend_cached(self, p: Projected, ctx: ForwardContext, null_k, null_v) -> torch.Tensor:
        cache = ctx.cache.layers[self.layer_index]
        (q,), (k,), v = p.q, p.k, p.v
        step = ctx.step
        if v.shape[2] == 1 and (step.host_valid is None or all(n == 1 for n in step.host_valid)):
            return self._decode(q, k, v, cache, step)
        return self._chunk(q, k, v, cache, ctx.step)

    def _decode(self, q, k, v, cache, step) -> torch.Tensor:
        """One new token per sequence: fixed shapes, positions on the device (capturable)."""
        from attnlab.kernels.butterfly import decode_step, kernel_serves  # local: kernels on use

        if kernel_serves(q, cache):  # one fused launch: write + attend
            return decode_step(q, k, v, cache, step.offsets, window=self.window, block_size=self.block_size,
                               rule=self.rule, stage=self.stage, scale=self.scales[0])
        pos = step.offsets.to(torch.long)  # (B,) the new token's position
        cache.append_token(pos, {"k": k, "v": v})
        ring_k, ring_v, ring_pos = cache.ring_rows(pos, {"k": k, "v": v})  # (B, KV, R, d), (B, R)
        qb = pos // self.block_size
        candidates = torch.stack([torch.zeros_like(qb), qb - 1, partner_block(self.rule, qb, self.stage)], 1)
        ok = summary_visible(pos.unsqueeze(1), candidates, window=self.window, block_size=self.block_size,
                             rule=self.rule, stage=self.stage)
        # one key per block: a candidate equal to an earlier one is dropped
        ok[:, 1] &= candidates[:, 1] != candidates[:, 0]
        ok[:, 2] &= (candidates[:, 2] != candidates[:, 0]) & (candidates[:, 2] != candidates[:, 1])
        sum_k, sum_v = cache.summary_rows(candidates.clamp(min=0))  # (B, KV, 3, d)
        raw_ok = (ring_pos >= 0) & (ring_pos <= pos.unsqueeze(1)) & (ring_pos > pos.unsqueeze(1) - self.window)
        visible = torch.cat([raw_ok, ok], dim=1).unsqueeze(1)  # (B, 1, R + 3)
        return masked_attention([q], [torch.cat([ring_k, sum_k], 2)], torch.cat([ring_v, sum_v], 2), self.scales,
                                visible).to(v.dtype)

    def _chunk(self, q, k, v, cache, step) -> torch.Tensor:
        """A chunk of T > 1 tokens per sequence (host offsets): over the ring (older raw rows),
        the chunk's own rows and every completed block's summary."""
        fields = {"k": k, "v": v}
        cache.append_chunk(step.host_offsets, step.host_valid, fields)  # summaries first
        out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=v.dtype, device=v.device)
        ring_k, ring_v, ring_pos = cache.stored_ring()  # (B, KV, R, d), (B, R): read once per chunk
        ends = [o + n for o, n in zip(step.host_offsets, step.host_valid)]
        sum_k, sum_v = cache.summary_prefix(max(ends) // self.block_size)  # (B, KV, blocks, d)
        for b, (offset, n) in enumerate(zip(step.host_offsets, step.host_valid)):
            if n == 0:
                continue
            blocks = (offset + n) // self.block_size
            keys = torch.cat([ring_k[b:b + 1], k[b:b + 1, :, :n], sum_k[b:b + 1, :, :blocks]], 2)
            values = torch.cat([ring_v[b:b + 1], v[b:b + 1, :, :n], sum_v[b:b + 1, :, :blocks]], 2)
            q_pos = torch.arange(offset, offset + n, device=q.device).view(-1, 1)
            older = torch.where(ring_pos[b] < offset, ring_pos[b], torch.full_like(ring_pos[b], -1))
            raw_pos = torch.cat([older, q_pos.view(-1)]).view(1, -1)
            raw_ok = (raw_pos >= 0) & (raw_pos <= q_pos) & (raw_pos > q_pos - self.window)
            sum_ok = summary_visible(q_pos, torch.arange(blocks, device=q.device).view(1, -1), window=self.window,
                                     block_size=self.block_size, rule=self.rule, stage=self.stage)
            visible = torch.cat([raw_ok, sum_ok], 1).unsqueeze(0)  # (1, n, R + n + blocks)
            out[b:b + 1, :, :n] = masked_attention([q[b:b + 1, :, :n]], [keys], values, self.scales, visible)
        cache.write_ring(step.host_offsets, step.host_valid, fields)
        return out


register_variant(ButterflyAttentionConfig, ButterflyAttention)

__all__ = ["PARTNER_RULES", "ButterflyAttention", "ButterflyAttentionConfig", "ButterflyMask", "block_means",
           "default_num_stages", "key_set", "partner_block", "reference_attention", "summary_visible"]
