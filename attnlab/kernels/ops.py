"""The cache write + attention of one layer as an opaque PyTorch custom op, so ``torch.compile``
can fuse everything around it (norms, projections, RoPE, MLP) without tracing the kernels.

As in vLLM, the op finds the caches through a forward context that the decode runtime sets
around a compiled forward (``active_cache``); the compiled graph only carries the layer's index,
so one compilation serves every runtime of the same model and batch. The op is used only while
``torch.compile`` traces; eager forwards call ``write_cache``/``cached_attention`` directly.
"""

from __future__ import annotations

import contextlib

import torch
from torch import library as op_registry

from attnlab.cache.kv import CacheStep

OP_NAMESPACE = __package__.split(".")[0]  # the custom-op namespace, named after the package
_ACTIVE: list = []  # [(ModelCache, max_length)] while a compiled forward runs


@contextlib.contextmanager
def active_cache(cache, max_length: int):
    """Make ``cache`` the one compiled forwards write to and attend over."""
    _ACTIVE.append((cache, max_length))
    try:
        yield
    finally:
        _ACTIVE.pop()


def _current():
    if not _ACTIVE:
        raise RuntimeError("a compiled cached forward ran outside DecodeRuntime (no active cache)")
    return _ACTIVE[-1]


@op_registry.custom_op(OP_NAMESPACE + "::cached_layer_attention", mutates_args=())
def cached_layer_attention(layer_index: int, names: str, scales: list[float], q: list[torch.Tensor],
                           fields: list[torch.Tensor], offsets: torch.Tensor, valid: torch.Tensor,
                           lengths: torch.Tensor, positions: torch.Tensor, null_k: list[torch.Tensor],
                           null_v: torch.Tensor | None) -> torch.Tensor:
    """Write ``fields`` (aligned with the comma-separated ``names``: key fields then ``v``, each
    (B, KV, T, hd)) into layer ``layer_index`` of the active cache, attend, return (B, H, T, d_v).
    ``null_k``: the null token's keys per key field, or empty."""
    from attnlab.kernels import cached_attention, write_cache

    cache, max_length = _current()
    layer = cache.layers[layer_index]
    step = CacheStep(offsets, valid, lengths, positions, max_length)
    if not q[0].is_cuda:  # the reference path needs the host numbers (a sync is harmless on the CPU)
        step.host_offsets, step.host_valid = offsets.tolist(), valid.tolist()
    by_name = dict(zip(names.split(","), fields))
    null_k = list(null_k) or None
    single = positions.shape[1] == 1
    write_cache(layer, step, by_name, include_tail=single)
    out = cached_attention(q, layer, scales, step, null_k=null_k, null_v=null_v, fresh=by_name, own_output=True)
    if not single:
        layer.write_tail(step, by_name)
    return out


@cached_layer_attention.register_fake
def _(layer_index, names, scales, q, fields, offsets, valid, lengths, positions, null_k, null_v):
    batch, heads, t_len, _ = q[0].shape
    return q[0].new_empty(batch, heads, t_len, fields[-1].shape[-1])


__all__ = ["active_cache", "cached_layer_attention"]
