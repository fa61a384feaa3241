"""Attention over key fields: the fused SDPA path and its eager reference.

Every variant scores ``sum_f scale_f * (q_f . k_f)`` over its key fields. Shapes:
q fields (B, H, T, d_f), k fields (B, KV, S, d_f), v (B, KV, S, d_v) with H a multiple of KV
(GQA: query head h reads kv head h // (H // KV)). Null token: one extra learned key/value per kv
head that every query may attend to ("attend nowhere"); null keys (KV, d_f), null value (KV, d_v).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
SDPA_HAS_GQA = _TORCH_VERSION >= (2, 5)


def concat_scaled_queries(q: Sequence[torch.Tensor], scales: Sequence[float]) -> torch.Tensor:
    """One query tensor whose dot product with ``cat(k)`` equals ``sum_f scale_f q_f . k_f``."""
    if len(q) == 1:
        return q[0] * scales[0]
    return torch.cat([qf * s for qf, s in zip(q, scales)], dim=-1)


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
    k_cat = k[0] if len(k) == 1 else torch.cat(list(k), dim=-1)
    if null_k is None:
        return sdpa(q_cat, k_cat, v, is_causal=True, scale=1.0, dropout_p=dropout_p)
    batch, num_kv = k_cat.shape[0], k_cat.shape[1]
    nk = torch.cat(list(null_k), dim=-1).to(k_cat.dtype)  # (KV, d_qk)
    nk = nk.view(1, num_kv, 1, -1).expand(batch, -1, -1, -1)
    nv = null_v.to(v.dtype).view(1, num_kv, 1, -1).expand(batch, -1, -1, -1)
    q_cat = F.pad(q_cat, (0, 0, 1, 0))
    out = sdpa(q_cat, torch.cat([nk, k_cat], dim=2), torch.cat([nv, v], dim=2),
               is_causal=True, scale=1.0, dropout_p=dropout_p)
    return out[:, :, 1:]


def eager_attention(q: Sequence[torch.Tensor], k: Sequence[torch.Tensor], v: torch.Tensor,
                    scales: Sequence[float], *, null_k: Sequence[torch.Tensor] | None = None,
                    null_v: torch.Tensor | None = None, q_offset: int = 0,
                    key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: explicit per-field scores, mask, float32 softmax -> (B, H, T, d_v).

    Query i sits at absolute position ``q_offset + i`` and sees keys 0..q_offset+i (keys are
    positions 0..S-1). ``key_lengths`` (B,) optionally hides keys at or past each sequence's length.
    """
    num_heads, num_kv = q[0].shape[1], k[0].shape[1]
    group = num_heads // num_kv
    t_len, s_len = q[0].shape[2], k[0].shape[2]
    acc = torch.promote_types(q[0].dtype, torch.float32)  # at least float32; float64 stays
    scores = None
    for qf, kf, scale in zip(q, k, scales):
        kf = kf.repeat_interleave(group, dim=1).to(acc)
        part = scale * (qf.to(acc) @ kf.transpose(-1, -2))
        scores = part if scores is None else scores + part
    q_pos = torch.arange(t_len, device=scores.device).unsqueeze(1) + q_offset
    k_pos = torch.arange(s_len, device=scores.device).unsqueeze(0)
    mask = k_pos > q_pos  # (T, S)
    if key_lengths is not None:
        mask = mask | (k_pos >= key_lengths.view(-1, 1, 1, 1))
    scores = scores.masked_fill(mask, float("-inf"))
    v_rep = v.repeat_interleave(group, dim=1).to(acc)
    if null_k is None:
        return (torch.softmax(scores, dim=-1) @ v_rep).to(v.dtype)
    null_scores = None
    for qf, nk, scale in zip(q, null_k, scales):
        nk = nk.to(acc).repeat_interleave(group, dim=0)  # (H, d_f)
        part = scale * torch.einsum("bhtd,hd->bht", qf.to(acc), nk).unsqueeze(-1)
        null_scores = part if null_scores is None else null_scores + part
    probs = torch.softmax(torch.cat([null_scores, scores], dim=-1), dim=-1)
    nv = null_v.to(acc).repeat_interleave(group, dim=0).view(1, num_heads, 1, -1)
    out = probs[..., :1] * nv + probs[..., 1:] @ v_rep
    return out.to(v.dtype)


def default_scales(head_dims: Sequence[int]) -> list[float]:
    return [1.0 / math.sqrt(d) for d in head_dims]
