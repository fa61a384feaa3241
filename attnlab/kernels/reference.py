"""Reference attention over a (possibly quantized) cache: walks the cache in chunks with an online
softmax, so a long cache is never dequantized whole. Runs on any device; the fused GPU kernels
are tested against it. Scores come from ``attnlab.nn.attention.functional`` (``group_queries``,
``grouped_scores``, ``grouped_null_scores``): the same math as the eager reference.

Exact tail: with a policy ``tail=N``, a query at position p reads key/value j at full precision
iff j > p - N (its N newest tokens), whatever the chunking — so chunked prefill, speculative
verification and token-by-token decoding see the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnlab.cache.kv import LayerCache
from attnlab.nn.attention.functional import grouped_null_scores, grouped_scores, group_queries, score_dtype


def cached_attention_reference(q: Sequence[torch.Tensor], cache: LayerCache, scales: Sequence[float], *,
                               q_positions: torch.Tensor, key_lengths: list[int],
                               null_k: Sequence[torch.Tensor] | None = None, null_v: torch.Tensor | None = None,
                               fresh: dict[str, torch.Tensor] | None = None, offsets: list[int] | None = None,
                               chunk_size: int = 1024) -> torch.Tensor:
    """Queries (per field (B, H, T, d_f), at absolute positions ``q_positions`` (B, T)) over the
    cache's keys 0..key_lengths[b]-1, causal (key j visible to a query at position p iff j <= p),
    plus the null token when given. ``fresh``/``offsets``: this forward's own key fields and
    values at full precision ((B, KV, T, d)) and where they start — the exact tail reads them
    (without them, the exact tail comes from the cache's window alone). Returns (B, H, T, d_v)."""
    batch, num_heads, t_len, _ = q[0].shape
    dims = cache.dims
    num_kv = dims.num_kv_heads
    group = num_heads // num_kv
    acc_dtype = score_dtype(q)
    device = q[0].device
    qg = group_queries(q, scales, num_kv, acc_dtype)  # (B, KV, G*T, d): a group shares each key read
    q_pos = q_positions.to(device).repeat(1, group).unsqueeze(-1)  # (B, G*T, 1), row index g*T + t
    lengths = torch.tensor(key_lengths, device=device).view(batch, 1, 1)
    rows = group * t_len
    tail = cache.tail
    if offsets is None:
        offsets = list(key_lengths) if fresh is None else [n - t_len for n in key_lengths]
    if null_k is not None:
        m = grouped_null_scores(qg, null_k)
        l_sum = torch.ones_like(m)
        acc = null_v.to(acc_dtype).view(1, num_kv, 1, -1).expand(batch, -1, rows, -1).clone()
    else:
        m = torch.full((batch, num_kv, rows), float("-inf"), dtype=acc_dtype, device=device)
        l_sum = torch.zeros_like(m)
        acc = torch.zeros(batch, num_kv, rows, dims.v_head_dim, dtype=acc_dtype, device=device)
    names = [f.name for f in dims.key_fields]
    first_exact = int(q_positions.min()) - tail + 1  # no query reads an older key exactly
    for start in range(0, max(key_lengths), chunk_size):
        end = min(start + chunk_size, max(key_lengths))
        k_pos = torch.arange(start, end, device=device).view(1, 1, -1)
        hidden = ((k_pos > q_pos) | (k_pos >= lengths)).unsqueeze(1)  # (B, 1, G*T, c)
        stored = {name: cache.read(name, start, end).to(acc_dtype) for name in names + ["v"]}
        scores = grouped_scores(qg, [stored[name] for name in names])  # (B, KV, G*T, c)
        exact_mask = None
        if tail > 0 and end > first_exact:
            exact = {name: cache.read_exact(name, start, end, offsets, None if fresh is None else fresh[name]).to(acc_dtype)
                     for name in names + ["v"]}
            exact_mask = (k_pos > q_pos - tail).unsqueeze(1)  # (B, 1, G*T, c)
            exact_scores = grouped_scores(qg, [exact[name] for name in names])
            scores = torch.where(exact_mask, exact_scores, scores)
        scores = scores.masked_fill(hidden, float("-inf"))
        m_new = torch.maximum(m, scores.amax(dim=-1))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with nothing visible yet
        alpha = torch.exp(m - safe)
        p = torch.exp(scores - safe.unsqueeze(-1))
        l_sum = l_sum * alpha + p.sum(dim=-1)
        if exact_mask is None:
            update = p @ stored["v"]
        else:
            p_exact = p * exact_mask
            update = (p - p_exact) @ stored["v"] + p_exact @ exact["v"]
        acc = acc * alpha.unsqueeze(-1) + update
        m = m_new
    out = acc / l_sum.unsqueeze(-1)
    return out.view(batch, num_kv, group, t_len, -1).reshape(batch, num_heads, t_len, -1).to(q[0].dtype)
