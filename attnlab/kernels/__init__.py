"""Attention over caches: one entry point. On CUDA, one query token per sequence (decode) goes to
the fused Triton kernel (``triton_decode``); everything else runs the chunked reference. When a
CUDA call falls back to the reference, the reason is logged once (logger ``attnlab.kernels``).

``ATTNLAB_DECODE_KERNEL=reference`` forces the reference (for A/B checks)."""

from __future__ import annotations

import logging
import os

from attnlab.kernels.reference import cached_attention_reference

log = logging.getLogger(__name__)
_reported: set[str] = set()
_triton_error: list[str] = []  # the import error, once looked up


def _report_fallback(reason: str) -> None:
    if reason not in _reported:
        _reported.add(reason)
        log.warning("cached attention on CUDA uses the reference path: %s", reason)


def _triton_missing() -> str | None:
    if not _triton_error:
        try:
            import triton  # noqa: F401

            from attnlab.kernels import triton_decode  # noqa: F401
            _triton_error.append("")
        except ImportError as e:  # no triton, or one without what the kernel needs
            _triton_error.append(f"triton is not importable ({e})")
    return _triton_error[0] or None


def kernel_unsupported_reason(q, cache, *, null_k=None) -> str | None:
    """Why a CUDA call cannot use the fused decode kernel; None when it can."""
    if os.environ.get("ATTNLAB_DECODE_KERNEL", "") == "reference":
        return "ATTNLAB_DECODE_KERNEL=reference"
    if q[0].shape[2] != 1:
        return f"{q[0].shape[2]} query tokens per sequence (the fused kernel decodes one)"
    missing = _triton_missing()
    if missing:
        return missing
    from attnlab.kernels.triton_decode import unsupported_reason

    return unsupported_reason(q, cache, null_k=null_k)


def cached_attention(q, cache, scales, *, q_positions, key_lengths, null_k=None, null_v=None,
                     fresh=None, offsets=None):
    """Dispatch attention over a ``LayerCache`` (see ``cached_attention_reference`` for shapes).

    The fused kernel reads the exact tail from the cache's window only: for one new token the
    layer writes it into the window before attending (``LayerCache.write(include_tail=True)``),
    so ``fresh`` holds nothing the window lacks and is not read."""
    if q[0].is_cuda:
        reason = kernel_unsupported_reason(q, cache, null_k=null_k)
        if reason is None:
            from attnlab.kernels.triton_decode import decode_attention

            return decode_attention(q, cache, scales, q_positions=q_positions, key_lengths=key_lengths,
                                    null_k=null_k, null_v=null_v)
        _report_fallback(reason)
    return cached_attention_reference(q, cache, scales, q_positions=q_positions, key_lengths=key_lengths,
                                      null_k=null_k, null_v=null_v, fresh=fresh, offsets=offsets)


__all__ = ["cached_attention", "cached_attention_reference", "kernel_unsupported_reason"]
