"""Compute over caches: one entry point for writing new tokens (``write_cache``) and one for
attention over a layer cache (``cached_attention``).

On CUDA (with Triton) every call goes to a fused kernel: the quantize-on-write kernel
(``cache_write``: every field and the exact tail in one launch), the decode kernel for one new
token per sequence (``decode``) and the chunk kernel for prefill chunks (``prefill``). Kernels
receive field descriptors (``fields.FieldSpec`` + the field's tensors), never cache objects.
Elsewhere, and for what a kernel cannot serve, the torch paths run: ``LayerCache.write`` and the
chunked reference (``reference.py``); on CUDA such a fallback is logged once, with its reason
(logger ``attnlab.kernels``). Kernel plans (layouts, splits, scratch buffers) are computed once
per layer cache and shape bucket and kept in ``LayerCache.kernel_plans``, so a decode step does
no planning and no allocation (it can be captured in a CUDA graph).

``ATTNLAB_DECODE_KERNEL=reference`` forces the torch paths (A/B checks). With
``TRITON_INTERPRET=1`` and ``ATTNLAB_KERNELS_ON_CPU=1``, CPU tensors take the kernel paths too,
through Triton's interpreter (tests of the whole model through the kernels, without a GPU).
"""

from __future__ import annotations

import logging
import os

import torch

from attnlab.kernels.reference import cached_attention_reference

log = logging.getLogger(__name__)
_reported: set[str] = set()
_triton_error: list[str] = []  # the import error, once looked up


def report_fallback(reason: str) -> None:
    if reason not in _reported:
        _reported.add(reason)
        log.warning("on CUDA a torch path runs instead of a fused kernel: %s", reason)


def triton_missing() -> str | None:
    if not _triton_error:
        try:
            import triton  # noqa: F401

            from attnlab.kernels import cache_write, decode, prefill  # noqa: F401
            _triton_error.append("")
        except ImportError as e:  # no triton, or one without what the kernels need
            _triton_error.append(f"triton is not importable ({e})")
    return _triton_error[0] or None


def _forced_reference() -> bool:
    return os.environ.get("ATTNLAB_DECODE_KERNEL", "") == "reference"


def uses_kernels(t: torch.Tensor) -> bool:
    """Whether calls on ``t``'s device go to the fused kernels (CUDA; or the CPU interpreter)."""
    if t.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("ATTNLAB_KERNELS_ON_CPU") == "1"


# ------------------------------------------------------------------ descriptors
def _memo(cache, key, make):
    """A value that depends only on the layer cache's static layout, computed once per cache
    (formats, shapes and storage never change after allocation)."""
    value = cache.kernel_plans.get(key, _MISSING)
    if value is _MISSING:
        value = cache.kernel_plans[key] = make()
    return value


_MISSING = object()


def field_specs(cache):
    """(key field specs, value spec) of a ``LayerCache`` (made once per cache)."""
    from attnlab.kernels.fields import FieldSpec

    def make():
        dims = cache.dims
        keys = [FieldSpec(f.name, cache.formats[f.name], dims.num_kv_heads, f.head_dim) for f in dims.key_fields]
        return keys, FieldSpec("v", cache.formats["v"], dims.num_kv_heads, dims.v_head_dim)  # maybe an alias

    return _memo(cache, ("field_specs",), make)


def field_data(cache):
    """(key fields' tensors, the value's tensors) of a ``LayerCache`` (made once per cache)."""
    from attnlab.kernels.fields import FieldData

    def one(name):
        store = cache.stores[name]
        ring = cache.window.rows[name] if cache.window is not None else None
        return FieldData(data=store.data, codes=store.codes, scales=store.scales, ring=ring)

    return _memo(cache, ("field_data",),
                 lambda: ([one(f.name) for f in cache.dims.key_fields], one(cache.dims.value_field)))


# ------------------------------------------------------------------ writes
def write_unsupported_reason(cache, step) -> str | None:
    if _forced_reference():
        return "ATTNLAB_DECODE_KERNEL=reference"
    missing = triton_missing()
    if missing:
        return missing
    from attnlab.kernels import cache_write

    return _memo(cache, ("write_reason",), lambda: cache_write.unsupported_reason(_write_targets(cache, True)))


def _write_targets(cache, with_ring: bool):
    """The write kernel's targets (the cache's planes, and its ring when ``with_ring``)."""
    from attnlab.kernels.cache_write import WriteTarget

    def make():
        targets = []
        for name, store in cache.stores.items():
            ring = cache.window.rows[name] if (with_ring and cache.window is not None) else None
            targets.append(WriteTarget(store.name, data=store.data, codes=store.codes, scales=store.scales,
                                       ring=ring))
        return targets

    return _memo(cache, ("write_targets", with_ring), make)


def write_cache(cache, step, fields: dict[str, torch.Tensor], *, include_tail: bool = True) -> None:
    """Store this forward's new tokens (``fields[name]``: (B, KV, T, head_dim)) at ``step``'s
    offsets: one fused launch on CUDA, ``LayerCache.write`` elsewhere."""
    if uses_kernels(next(iter(fields.values()))):
        reason = write_unsupported_reason(cache, step)
        if reason is None:
            from attnlab.kernels.cache_write import write_fields

            with_ring = include_tail and cache.window is not None
            rows = [fields[name].transpose(1, 2) for name in cache.stores]  # (B, T, KV, hd) views
            write_fields(_write_targets(cache, with_ring), rows, step.offsets, step.valid,
                         ring_positions=cache.window.slot_position if with_ring else None)
            return
        report_fallback(f"cache write: {reason}")
    cache.write(step, fields, include_tail=include_tail)


# ------------------------------------------------------------------ attention
def kernel_unsupported_reason(q, cache, *, null_k=None) -> str | None:
    """Why a CUDA call cannot use a fused attention kernel; None when it can."""
    if _forced_reference():
        return "ATTNLAB_DECODE_KERNEL=reference"
    missing = triton_missing()
    if missing:
        return missing
    t_len, q_dtype, num_heads = q[0].shape[2], q[0].dtype, q[0].shape[1]

    def reason() -> str | None:
        keys, value = field_specs(cache)
        if cache.window is not None and cache.dtype == torch.float64:
            return "float64 tail ring"
        if t_len == 1:
            from attnlab.kernels.decode import unsupported_reason

            return unsupported_reason(keys, value, q_dtype=q_dtype, num_heads=num_heads)
        from attnlab.kernels.prefill import unsupported_reason

        return unsupported_reason(keys, value, q_dtype=q_dtype, num_heads=num_heads, t_len=t_len)

    return _memo(cache, ("attention_reason", t_len, q_dtype, num_heads), reason)


def _bucket(n: int, cap: int) -> int:
    """Plans are kept per power-of-two bucket of the longest length (at most the capacity)."""
    return min(cap, max(256, 1 << max(0, (n - 1).bit_length())))


def decode_plan(cache, num_heads: int, q_dtype: torch.dtype, max_length: int, has_null: bool,
                device: torch.device):
    """The decode kernel's plan for this layer cache (computed once per length bucket)."""
    from attnlab.kernels.decode import plan_decode

    bucket = _bucket(max_length, cache.capacity)
    key = ("decode", num_heads, q_dtype, bucket, has_null)
    plan = cache.kernel_plans.get(key)
    if plan is None:
        keys, value = field_specs(cache)
        ring = cache.window.size if cache.window is not None else 1
        plan = cache.kernel_plans[key] = plan_decode(
            keys, value, num_heads=num_heads, batch=cache.batch, max_length=bucket, tail=cache.tail,
            ring_size=ring, has_null=has_null, q_dtype=q_dtype, device=device)
    return plan


def cached_attention(q, cache, scales, step, *, null_k=None, null_v=None, fresh=None, own_output=False):
    """Attention of this forward's queries (per key field (B, H, T, d_f)) over a ``LayerCache``
    after the new tokens were written (see ``cached_attention_reference`` for the contract).
    ``own_output``: return a new tensor, never the decode plan's reused output buffer (what a
    custom op must do: torch.compile owns and may reuse the memory of an op's outputs).

    Decode (T == 1): the fused kernel reads the exact tail from the ring only (the layer wrote
    the new token into it first). Chunks (T > 1): the chunk kernel reads this chunk's exact
    rows from ``fresh`` and older ones from the ring."""
    if uses_kernels(q[0]):
        reason = kernel_unsupported_reason(q, cache, null_k=null_k)
        if reason is None:
            names = [f.name for f in cache.dims.key_fields]
            keys, value = field_data(cache)
            if q[0].shape[2] == 1:
                from attnlab.kernels.decode import decode_attention

                plan = decode_plan(cache, q[0].shape[1], q[0].dtype, step.max_length, null_k is not None,
                                   q[0].device)
                out = torch.empty_like(plan.out) if own_output else None
                return decode_attention(plan, q, keys, value, scales=scales, lengths=step.lengths,
                                        q_positions=step.positions, null_k=null_k, null_v=null_v, out=out)
            from attnlab.kernels.prefill import prefill_attention

            key_specs, value_spec = field_specs(cache)
            exact = cache.tail > 0
            return prefill_attention(
                q, keys, value, key_specs, value_spec, scales=scales, offsets=step.offsets, lengths=step.lengths,
                max_length=step.max_length, tail=cache.tail,
                fresh_keys=[fresh[n].transpose(1, 2).flatten(2) for n in names] if exact else None,
                fresh_value=fresh["v"].transpose(1, 2).flatten(2) if exact else None, null_k=null_k, null_v=null_v)
        report_fallback(f"attention: {reason}")
    if step.host_offsets is None:
        raise RuntimeError("the reference attention path needs host offsets (not available inside a CUDA graph)")
    key_lengths = [o + n for o, n in zip(step.host_offsets, step.host_valid)]
    return cached_attention_reference(q, cache, scales, q_positions=step.positions, key_lengths=key_lengths,
                                      null_k=null_k, null_v=null_v, fresh=fresh, offsets=step.host_offsets)


__all__ = ["cached_attention", "cached_attention_reference", "kernel_unsupported_reason", "write_cache"]
