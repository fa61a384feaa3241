"""Attention over key fields: the scoring math (once), the fused SDPA path and the eager reference.

Every variant scores ``sum_f scale_f * (q_f . k_f)`` over its key fields. Shapes:
q fields (B, H, T, d_f), k fields (B, KV, S, d_f), v (B, KV, S, d_v) with H a multiple of KV
(GQA: query head h reads kv head h // (H // KV)). Null token: one extra learned key/value per kv
head that every query may attend to ("attend nowhere"); null keys (KV, d_f), null value (KV, d_v).

The numerical reference is ``field_scores``/``null_scores`` (and their grouped forms, which the
cached reference in ``attnlab.kernels.reference`` reads chunk by chunk): every path that needs
explicit scores (``eager_attention``, the cached reference, the surgery's logit measurements)
calls them. Grouped layout: the G = H // KV query heads of kv head g are rows of one matrix,
(B, H, T, d) -> (B, KV, G*T, d) with row index ``g_local * T + t``, so a key is read once per
group and no kv head is copied.

``MaskSpec`` (which keys each query sees: causal, sliding window, block-sparse layout, offsets,
key lengths) lives here too, so that the eager reference and every backend in ``backends.py``
read one definition of the mask; this module stays pure torch (the import-layering test keeps it
below ``kernels``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
SDPA_HAS_GQA = _TORCH_VERSION >= (2, 5)


# ------------------------------------------------------------------ the scoring math
def score_dtype(q: Sequence[torch.Tensor]) -> torch.dtype:
    """The reference accumulates in at least float32 (float64 stays float64)."""
    return torch.promote_types(q[0].dtype, torch.float32)


def group_queries(q: Sequence[torch.Tensor], scales: Sequence[float], num_kv: int,
                  dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Scaled query fields in the grouped layout: (B, H, T, d_f) -> (B, KV, G*T, d_f)."""
    batch, num_heads, t_len, _ = q[0].shape
    dtype = dtype or score_dtype(q)
    group = num_heads // num_kv
    return [(qf.to(dtype) * s).reshape(batch, num_kv, group * t_len, -1) for qf, s in zip(q, scales)]


def grouped_scores(qg: Sequence[torch.Tensor], k: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_f qg_f . k_f``: grouped scaled queries (B, KV, G*T, d_f) against keys (B, KV, S, d_f)
    -> (B, KV, G*T, S) in the queries' dtype."""
    out = None
    for qf, kf in zip(qg, k):
        part = qf @ kf.to(qf.dtype).transpose(-1, -2)
        out = part if out is None else out + part
    return out


def grouped_null_scores(qg: Sequence[torch.Tensor], null_k: Sequence[torch.Tensor]) -> torch.Tensor:
    """Scores of grouped scaled queries against the null keys (KV, d_f) -> (B, KV, G*T)."""
    out = None
    for qf, nk in zip(qg, null_k):
        part = torch.einsum("bkqd,kd->bkq", qf, nk.to(qf.dtype))
        out = part if out is None else out + part
    return out


def field_scores(q: Sequence[torch.Tensor], k: Sequence[torch.Tensor], scales: Sequence[float], *,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pre-softmax scores ``sum_f scale_f q_f . k_f`` with GQA, unmasked -> (B, H, T, S) in
    ``dtype`` (default: at least float32)."""
    batch, num_heads, t_len, _ = q[0].shape
    scores = grouped_scores(group_queries(q, scales, k[0].shape[1], dtype), k)
    return scores.reshape(batch, num_heads, t_len, -1)


def null_scores(q: Sequence[torch.Tensor], null_k: Sequence[torch.Tensor], scales: Sequence[float], *,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """Scores of every query against its kv head's null key -> (B, H, T)."""
    batch, num_heads, t_len, _ = q[0].shape
    return grouped_null_scores(group_queries(q, scales, null_k[0].shape[0], dtype), null_k).reshape(
        batch, num_heads, t_len)


def default_scales(head_dims: Sequence[int]) -> list[float]:
    return [1.0 / math.sqrt(d) for d in head_dims]


# ------------------------------------------------------------------ fused (SDPA) path
def concat_scaled_queries(q: Sequence[torch.Tensor], scales: Sequence[float]) -> torch.Tensor:
    """One query tensor whose dot product with ``cat(k)`` equals ``sum_f scale_f q_f . k_f``."""
    if len(q) == 1:
        return q[0] * scales[0]
    return torch.cat([qf * s for qf, s in zip(q, scales)], dim=-1)


def concat_keys(k: Sequence[torch.Tensor]) -> torch.Tensor:
    """Key fields side by side along the head dim (the partner of ``concat_scaled_queries``)."""
    return k[0] if len(k) == 1 else torch.cat(list(k), dim=-1)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool,
         scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with GQA: native ``enable_gqa`` where torch has it,
    else kv heads expanded."""
    num_heads, num_kv = q.shape[1], k.shape[1]
    if num_heads != num_kv:
        if SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale,
                                                  dropout_p=dropout_p, enable_gqa=True)
        k = k.repeat_interleave(num_heads // num_kv, dim=1)
        v = v.repeat_interleave(num_heads // num_kv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, dropout_p=dropout_p)


def fused_causal_attention(q: Sequence[torch.Tensor], k: Sequence[torch.Tensor], v: torch.Tensor,
                           scales: Sequence[float], *, null_k: Sequence[torch.Tensor] | None = None,
                           null_v: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal self-attention (T queries over the same T keys) in ONE SDPA call -> (B, H, T, d_v).

    Key fields are concatenated along the head dim with the queries pre-scaled, so SDPA runs with
    scale 1. The null token keeps the fast causal kernel: it is prepended as key/value position 0
    together with a dummy zero query at position 0, so the square causal mask lets every real query
    see null + its prefix; the dummy query's output is dropped.
    """
    q_cat = concat_scaled_queries(q, scales)
    k_cat = concat_keys(k)
    if null_k is None:
        return sdpa(q_cat, k_cat, v, is_causal=True, scale=1.0, dropout_p=dropout_p)
    batch, num_kv = k_cat.shape[0], k_cat.shape[1]
    nk = concat_keys(null_k).to(k_cat.dtype)  # (KV, d_qk)
    nk = nk.view(1, num_kv, 1, -1).expand(batch, -1, -1, -1)
    nv = null_v.to(v.dtype).view(1, num_kv, 1, -1).expand(batch, -1, -1, -1)
    q_cat = F.pad(q_cat, (0, 0, 1, 0))
    out = sdpa(q_cat, torch.cat([nk, k_cat], dim=2), torch.cat([nv, v], dim=2),
               is_causal=True, scale=1.0, dropout_p=dropout_p)
    return out[:, :, 1:]


# ------------------------------------------------------------------ the mask description
@dataclass(frozen=True, eq=False)
class BlockSparse:
    """Which key blocks each query block may read; blocks are ``block_size`` absolute positions
    (query block ``p // block_size`` for a query at position p, key block ``j // block_size``).
    Give exactly one of ``layout``, a boolean tensor (num_q_blocks, num_k_blocks), or ``block_fn``,
    a function of (query block, key block) integer tensors that returns a boolean tensor and is
    written with broadcasting torch ops (it is evaluated under ``vmap`` by FlexAttention), e.g. a
    butterfly partner ``lambda qb, kb: kb == (qb ^ 1)``. Compared and hashed by identity: build
    one per layer, not one per call (block masks are kept per object)."""

    block_size: int
    layout: torch.Tensor | None = None
    block_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"BlockSparse.block_size must be >= 1, got {self.block_size}")
        if (self.layout is None) == (self.block_fn is None):
            raise ValueError("BlockSparse needs exactly one of layout (tensor) or block_fn")
        if self.layout is not None and (self.layout.dim() != 2 or self.layout.dtype != torch.bool):
            raise ValueError(f"BlockSparse.layout must be a 2-d bool tensor, got {self.layout.dtype} "
                             f"{tuple(self.layout.shape)}")

    def allowed(self, q_block: torch.Tensor, k_block: torch.Tensor) -> torch.Tensor:
        if self.block_fn is not None:
            return self.block_fn(q_block, k_block)
        num_q, num_k = self.layout.shape  # clamped: only the null token's index can be past the end
        return self.layout[q_block.clamp(max=num_q - 1), k_block.clamp(max=num_k - 1)]

    def to(self, device: torch.device) -> BlockSparse:
        if self.layout is None or self.layout.device == torch.device(device):
            return self
        return replace(self, layout=self.layout.to(device))


@dataclass(frozen=True)
class MaskSpec:
    """Which keys a query sees. Query i sits at absolute position ``p = q_offset + i``; key j at
    position j (0..S-1). Key j is visible iff

        (not causal or j <= p) and (key_lengths is None or j < key_lengths[b]) and local(p, j)

    where ``local`` is True without ``window``/``block_sparse``, ``j > p - window`` with a sliding
    window (the query sees keys p-window+1..p), the block layout's entry with ``block_sparse``,
    and their union (window OR block) with both: a local window plus extra blocks, the shape of
    butterfly-style patterns. The null token is visible to every query. ``key_lengths``: (B,)
    tensor (not part of equality/hash)."""

    causal: bool = True
    window: int | None = None
    block_sparse: BlockSparse | None = None
    q_offset: int = 0
    key_lengths: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.window is not None and self.window < 1:
            raise ValueError(f"MaskSpec.window must be >= 1 (or None), got {self.window}")
        if self.q_offset < 0:
            raise ValueError(f"MaskSpec.q_offset must be >= 0, got {self.q_offset}")

    @property
    def is_causal_only(self) -> bool:
        """Plain causal: what one SDPA ``is_causal=True`` call computes (for T == S)."""
        return (self.causal and self.window is None and self.block_sparse is None and self.q_offset == 0
                and self.key_lengths is None)

    def to(self, device: torch.device) -> MaskSpec:
        lengths = None if self.key_lengths is None else self.key_lengths.to(device)
        blocks = None if self.block_sparse is None else self.block_sparse.to(device)
        if lengths is self.key_lengths and blocks is self.block_sparse:
            return self
        return replace(self, key_lengths=lengths, block_sparse=blocks)

    def check(self, t_len: int, s_len: int) -> None:
        """ValueError when a block layout does not cover the queries' and keys' positions."""
        bs = self.block_sparse
        if bs is None or bs.layout is None:
            return
        need = (-(-(self.q_offset + t_len) // bs.block_size), -(-s_len // bs.block_size))
        if bs.layout.shape[0] < need[0] or bs.layout.shape[1] < need[1]:
            raise ValueError(f"block layout {tuple(bs.layout.shape)} does not cover {need[0]} query blocks x "
                             f"{need[1]} key blocks (block_size {bs.block_size})")

    def visible(self, b: torch.Tensor | None, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """The rule above for absolute positions (broadcasting, or scalars under vmap); ``b``:
        batch index (only read with ``key_lengths``)."""
        ok = k_pos <= q_pos if self.causal else (k_pos >= 0)
        local = None
        if self.window is not None:
            local = k_pos > q_pos - self.window
        if self.block_sparse is not None:
            size = self.block_sparse.block_size
            blocks = self.block_sparse.allowed(q_pos // size, k_pos // size)
            local = blocks if local is None else local | blocks
        if local is not None:
            ok = ok & local
        if self.key_lengths is not None:
            ok = ok & (k_pos < self.key_lengths[b])
        return ok

    def dense(self, batch: int, t_len: int, s_len: int, device: torch.device) -> torch.Tensor:
        """Boolean visibility (B or 1, T, S) for T queries over S keys."""
        self.check(t_len, s_len)
        m = self.to(device)
        q_pos = torch.arange(t_len, device=device).view(1, -1, 1) + self.q_offset
        k_pos = torch.arange(s_len, device=device).view(1, 1, -1)
        b = torch.arange(batch, device=device).view(-1, 1, 1) if self.key_lengths is not None else None
        return m.visible(b, q_pos, k_pos).expand(-1 if b is not None else 1, t_len, s_len)


CAUSAL = MaskSpec()


# ------------------------------------------------------------------ eager reference
def eager_attention(q: Sequence[torch.Tensor], k: Sequence[torch.Tensor], v: torch.Tensor,
                    scales: Sequence[float], *, null_k: Sequence[torch.Tensor] | None = None,
                    null_v: torch.Tensor | None = None, q_offset: int = 0,
                    key_lengths: torch.Tensor | None = None, mask: MaskSpec | None = None,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """Reference: explicit per-field scores, mask, float32 softmax -> (B, H, T, d_v).

    ``mask`` (a ``MaskSpec``; default: causal) says which keys each query sees: query i
    sits at absolute position ``q_offset + i``, keys are positions 0..S-1 (see ``MaskSpec`` for
    windows and block-sparse layouts). ``q_offset``/``key_lengths`` (B,) are the older spelling
    of the same fields (only without ``mask``). The null token is always visible. A query that
    sees nothing (possible with a block layout and no null token) gets a zero output, as in
    FlexAttention.
    """
    if mask is None:
        mask = MaskSpec(q_offset=q_offset, key_lengths=key_lengths)
    elif q_offset != 0 or key_lengths is not None:
        raise ValueError("eager_attention: give q_offset/key_lengths inside mask, not beside it")
    batch, t_len = q[0].shape[0], q[0].shape[2]
    visible = mask.dense(batch, t_len, k[0].shape[2], q[0].device)
    return masked_attention(q, k, v, scales, visible, null_k=null_k, null_v=null_v, dropout_p=dropout_p)


def masked_attention(q: Sequence[torch.Tensor], k: Sequence[torch.Tensor], v: torch.Tensor,
                     scales: Sequence[float], visible: torch.Tensor, *,
                     null_k: Sequence[torch.Tensor] | None = None, null_v: torch.Tensor | None = None,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """The reference with an explicit visibility ``visible`` (B or 1, T, S) bool: per-field
    scores, masked, float32-or-better softmax -> (B, H, T, d_v). A query that sees nothing (and
    has no null token) gets a zero output."""
    num_heads = q[0].shape[1]
    group = num_heads // k[0].shape[1]
    acc = score_dtype(q)
    scores = field_scores(q, k, scales, dtype=acc)  # (B, H, T, S)
    visible = visible.unsqueeze(1)  # (B or 1, 1, T, S)
    scores = scores.masked_fill(~visible, float("-inf"))
    v_rep = v.repeat_interleave(group, dim=1).to(acc)
    if null_k is None:
        seen = visible.any(dim=-1, keepdim=True)  # rows with nothing visible: zero output, no NaN
        probs = torch.softmax(scores.masked_fill(~seen, 0.0), dim=-1) * seen
        return (F.dropout(probs, dropout_p) @ v_rep).to(v.dtype)
    nulls = null_scores(q, null_k, scales, dtype=acc).unsqueeze(-1)  # (B, H, T, 1)
    probs = F.dropout(torch.softmax(torch.cat([nulls, scores], dim=-1), dim=-1), dropout_p)
    nv = null_v.to(acc).repeat_interleave(group, dim=0).view(1, num_heads, 1, -1)
    out = probs[..., :1] * nv + probs[..., 1:] @ v_rep
    return out.to(v.dtype)
