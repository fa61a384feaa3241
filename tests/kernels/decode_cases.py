"""Random LayerCaches and queries for the decode-kernel tests (shared by the test modules)."""

from __future__ import annotations

import math

import torch

from attnlab.cache.kv import LayerCache
from attnlab.cache.policy import CachePolicy
from attnlab.config.attention import AttentionDims, KeyField


def make_dims(num_heads: int, num_kv: int, key_dims: tuple[int, ...], v_dim: int, null: bool) -> AttentionDims:
    names = ("k",) if len(key_dims) == 1 else ("k_sem", "k_geo")
    fields = tuple(KeyField(n, d, n != "k_sem") for n, d in zip(names, key_dims))
    return AttentionDims(num_heads, num_kv, fields, v_dim, null)


def make_case(*, num_heads=4, num_kv=2, key_dims=(16,), v_dim=16, formats=None, lengths=(37,), tail=0,
              null=False, dtype=torch.float32, q_dtype=None, device="cpu", seed=0, rollback=8):
    """A filled LayerCache + queries. ``formats``: field -> format (missing: the native dtype)."""
    gen = torch.Generator().manual_seed(seed)
    dims = make_dims(num_heads, num_kv, key_dims, v_dim, null)
    policy = CachePolicy(formats=dict(formats or {}), tail=tail, rollback=rollback)
    batch = len(lengths)
    cache = LayerCache(dims, policy, batch, torch.device(device), dtype)
    t_max = max(lengths)
    fields = {name: torch.randn(batch, num_kv, t_max, hd, generator=gen).to(dtype).to(device)
              for name, hd in dims.cache_fields.items()}
    cache.write([0] * batch, list(lengths), fields)
    q_dtype = q_dtype or dtype
    q = [torch.randn(batch, num_heads, 1, f.head_dim, generator=gen).to(q_dtype).to(device)
         for f in dims.key_fields]
    scales = [1.0 / math.sqrt(f.head_dim) for f in dims.key_fields]
    q_positions = torch.tensor([[n - 1] for n in lengths], device=device)
    null_k = null_v = None
    if null:
        null_k = [torch.randn(num_kv, f.head_dim, generator=gen).to(dtype).to(device) for f in dims.key_fields]
        null_v = torch.randn(num_kv, v_dim, generator=gen).to(dtype).to(device)
    return dict(q=q, cache=cache, scales=scales, q_positions=q_positions, key_lengths=list(lengths),
                null_k=null_k, null_v=null_v)


def reference64(case) -> torch.Tensor:
    """The chunked reference with float64 queries, null token and accumulation."""
    from attnlab.kernels.reference import cached_attention_reference

    c = dict(case)
    c["q"] = [t.double() for t in case["q"]]
    if case["null_k"] is not None:
        c["null_k"] = [t.double() for t in case["null_k"]]
        c["null_v"] = case["null_v"].double()
    return cached_attention_reference(c["q"], c["cache"], c["scales"], q_positions=c["q_positions"],
                                      key_lengths=c["key_lengths"], null_k=c["null_k"], null_v=c["null_v"],
                                      chunk_size=64)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm())
