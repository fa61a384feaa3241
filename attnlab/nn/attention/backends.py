"""Attention backends for training and prefill, chosen from a mask description and the device.

One entry point, ``attend(q, k, v, scales, mask=..., impl=...)``, over the same per-field lists as
``functional.fused_causal_attention`` (q fields (B, H, T, d_f), k fields (B, KV, S, d_f),
v (B, KV, S, d_v), GQA, optional null token). Backends:

* ``sdpa``: ``functional.fused_causal_attention``, one ``F.scaled_dot_product_attention`` call
  (flash / memory-efficient kernels). Plain causal masks only (T queries over the same T keys).
* ``flex``: ``torch.nn.attention.flex_attention`` with a ``create_block_mask`` block mask built
  from the ``MaskSpec`` (sliding windows, block-sparse layouts, offsets, key lengths). Block masks
  are computed once per (mask, T, S, device) and kept (not when ``key_lengths`` is given). On CUDA
  the compiled kernel runs; on CPU the unfused eager implementation (torch >= 2.5), forward only:
  CPU FlexAttention has no backward, so calls that need gradients go to ``eager`` instead.
  Null token: appended as the last key/value (index S) with a mask_mod term that always allows
  it; appending (rather than prepending) keeps the real keys on the block mask's block grid.
* ``eager``: ``functional.eager_attention``, the numerical reference every fast path is tested
  against (explicit scores via ``functional.field_scores``, float32-or-better softmax).

The mask description (``MaskSpec``, ``BlockSparse``) is defined in ``functional`` (beside the
reference that reads it) and re-exported here. ``select_backend`` states the rules; a requested backend that cannot serve a call falls back to
``eager`` and says why once (logger ``attnlab.nn.attention.backends``).

Cached paths are not here: with a cache (decode, chunked prefill) ``AttentionLayer`` calls
``attnlab.kernels.cached_attention``, which runs the fused Triton decode/prefill kernels on CUDA
and ``kernels.reference.cached_attention_reference`` elsewhere. That reference reads the cache
chunk by chunk with an online softmax and scores with ``functional.grouped_scores`` /
``grouped_null_scores``, the same math as ``eager_attention``; its mask is causal over the cached
keys with ``key_lengths``, i.e. ``MaskSpec(q_offset=..., key_lengths=...)`` here.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch

from attnlab.nn.attention.functional import (
    CAUSAL,
    BlockSparse,
    MaskSpec,
    concat_keys,
    concat_scaled_queries,
    eager_attention,
    fused_causal_attention,
)

log = logging.getLogger(__name__)
_reported: set[str] = set()

Impl = Literal["auto", "fused", "sdpa", "flex", "eager"]
IMPLS = ("auto", "fused", "sdpa", "flex", "eager")

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    FLEX_IMPORT_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - old torch
    create_block_mask = flex_attention = None
    FLEX_IMPORT_ERROR = f"torch.nn.attention.flex_attention is not importable ({e})"


# ------------------------------------------------------------------ selection
def report_once(reason: str) -> None:
    if reason not in _reported:
        _reported.add(reason)
        log.warning("attention backend fallback: %s", reason)


def flex_unsupported_reason(device: torch.device, dtype: torch.dtype, *, needs_grad: bool = False,
                            dropout: bool = False, head_dim: int | None = None) -> str | None:
    """Why FlexAttention cannot serve a call; None when it can. ``head_dim``: the width of the
    concatenated query/key fields (the compiled CUDA kernel needs at least 16)."""
    device = torch.device(device)
    if FLEX_IMPORT_ERROR:
        return FLEX_IMPORT_ERROR
    if dropout:
        return "flex_attention has no attention dropout"
    if device.type == "cpu":
        if needs_grad:
            return "flex_attention has no backward on CPU"
        if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            return f"flex_attention on CPU does not take {dtype}"
        return None
    if device.type == "cuda":
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"the compiled flex_attention kernel does not take {dtype}"
        if head_dim is not None and head_dim < 16:
            return f"the compiled flex_attention kernel needs head dims >= 16, got {head_dim}"
        return None
    return f"flex_attention is not used on {device.type}"


def select_backend(mask: MaskSpec, device: torch.device | str, dtype: torch.dtype, requested: str = "auto",
                   *, needs_grad: bool = False, dropout: bool = False, head_dim: int | None = None) -> str:
    """``sdpa``, ``flex`` or ``eager`` for a call with this mask on this device/dtype. Rules:

    1. ``requested="eager"`` -> eager.
    2. ``auto`` (``fused`` is its older name): a plain causal mask (``mask.is_causal_only``) ->
       sdpa; any other mask -> flex where ``flex_unsupported_reason`` is None (CUDA: float32/
       bf16/fp16, no dropout; CPU: forward only), else eager (the reason logged once).
    3. ``sdpa`` for a mask that is not plain causal: ValueError (SDPA cannot express it).
    4. ``flex`` -> flex where it can serve the call, else eager (the reason logged once); flex
       also serves plain causal masks when asked for.
    ``needs_grad``: the call will be differentiated; ``dropout``: attention dropout > 0;
    ``head_dim``: the smaller of the summed key-field width and the value width.
    """
    if requested not in IMPLS:
        raise ValueError(f"attention impl must be one of {', '.join(IMPLS)}, got {requested!r}")
    if requested == "eager":
        return "eager"
    if requested == "sdpa" and not mask.is_causal_only:
        raise ValueError(f"the sdpa backend serves plain causal masks only, got {mask}")
    if requested in ("auto", "fused", "sdpa") and mask.is_causal_only:
        return "sdpa"
    reason = flex_unsupported_reason(device, dtype, needs_grad=needs_grad, dropout=dropout, head_dim=head_dim)
    if reason is None:
        return "flex"
    report_once(f"{reason}: eager attention runs instead")
    return "eager"


# ------------------------------------------------------------------ the flex backend
_BLOCK_MASKS: OrderedDict = OrderedDict()
_MAX_BLOCK_MASKS = 64
_compiled: list = []


def _flex_kernel(device: torch.device):
    """The compiled kernel on CUDA; on CPU the eager (unfused) implementation."""
    if device.type != "cuda":
        return flex_attention
    if not _compiled:
        # every distinct mask (a window, a butterfly rule and stage, ...) is one more
        # specialisation of the same function: allow a model's worth of them
        dynamo = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo, name):
                setattr(dynamo, name, max(getattr(dynamo, name), 64))
        _compiled.append(torch.compile(flex_attention, dynamic=False))
    return _compiled[0]


def block_mask(mask: MaskSpec, batch: int, t_len: int, s_len: int, device: torch.device, *,
               null_index: int | None = None):
    """The FlexAttention block mask of ``mask`` for T queries over S keys (plus, with
    ``null_index``, a null key at that kv index that every query sees)."""
    key = (mask, t_len, s_len, str(device), null_index)
    if mask.key_lengths is None and key in _BLOCK_MASKS:
        _BLOCK_MASKS.move_to_end(key)
        return _BLOCK_MASKS[key]
    mask.check(t_len, s_len)
    m, offset = mask.to(device), mask.q_offset

    def mask_mod(b, h, q_idx, kv_idx):
        ok = m.visible(b, q_idx + offset, kv_idx)
        return ok if null_index is None else ok | (kv_idx == null_index)

    kv_len = s_len + (null_index is not None)
    made = create_block_mask(mask_mod, batch if mask.key_lengths is not None else None, None, t_len, kv_len,
                             device=device)
    if mask.key_lengths is None:
        _BLOCK_MASKS[key] = made
        if len(_BLOCK_MASKS) > _MAX_BLOCK_MASKS:
            _BLOCK_MASKS.popitem(last=False)
    return made


def flex_field_attention(q: Sequence[torch.Tensor], k: Sequence[torch.Tensor], v: torch.Tensor,
                         scales: Sequence[float], *, mask: MaskSpec = CAUSAL,
                         null_k: Sequence[torch.Tensor] | None = None,
                         null_v: torch.Tensor | None = None) -> torch.Tensor:
    """FlexAttention over key fields -> (B, H, T, d_v): scaled queries and keys concatenated
    along the head dim (one dot product = the sum over fields), scale 1, GQA native."""
    if FLEX_IMPORT_ERROR:
        raise RuntimeError(FLEX_IMPORT_ERROR)
    q_cat, k_cat = concat_scaled_queries(q, scales), concat_keys(k)
    batch, num_heads, t_len, _ = q_cat.shape
    num_kv, s_len = k_cat.shape[1], k_cat.shape[2]
    null_index = None
    if null_k is not None:  # appended as kv index S
        nk = concat_keys(null_k).to(k_cat.dtype).view(1, num_kv, 1, -1).expand(batch, -1, -1, -1)
        nv = null_v.to(v.dtype).view(1, num_kv, 1, -1).expand(batch, -1, -1, -1)
        k_cat, v, null_index = torch.cat([k_cat, nk], dim=2), torch.cat([v, nv], dim=2), s_len
    bm = block_mask(mask, batch, t_len, s_len, q_cat.device, null_index=null_index)
    kernel = _flex_kernel(q_cat.device)
    with warnings.catch_warnings():  # on CPU the unfused path is the point, not a mistake
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return kernel(q_cat, k_cat, v, block_mask=bm, scale=1.0, enable_gqa=num_heads != num_kv)


# ------------------------------------------------------------------ the entry point
def attend(q: Sequence[torch.Tensor], k: Sequence[torch.Tensor], v: torch.Tensor, scales: Sequence[float], *,
           mask: MaskSpec = CAUSAL, impl: str = "auto", null_k: Sequence[torch.Tensor] | None = None,
           null_v: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention over key fields with ``mask`` by the backend ``select_backend`` picks for
    ``impl`` (auto | fused | sdpa | flex | eager) -> (B, H, T, d_v). ``dropout_p``: attention
    dropout (pass 0 outside training)."""
    # gradients matter only where flex may be chosen (CPU flex has no backward); plain causal
    # masks go to SDPA unless flex is asked for
    may_use_flex = impl == "flex" or not mask.is_causal_only
    needs_grad = may_use_flex and torch.is_grad_enabled() and any(
        t.requires_grad for t in [*q, *k, v, *(null_k or []), *([null_v] if null_v is not None else [])])
    widths = (sum(qf.shape[-1] for qf in q), v.shape[-1])
    name = select_backend(mask, q[0].device, q[0].dtype, impl, needs_grad=needs_grad, dropout=dropout_p > 0,
                          head_dim=min(widths))
    if name == "sdpa":
        if q[0].shape[2] != k[0].shape[2]:
            raise ValueError(f"the sdpa backend needs T == S (self-attention), got T={q[0].shape[2]} "
                             f"S={k[0].shape[2]}; give the queries' MaskSpec(q_offset=...)")
        return fused_causal_attention(q, k, v, scales, null_k=null_k, null_v=null_v, dropout_p=dropout_p)
    if name == "flex":
        return flex_field_attention(q, k, v, scales, mask=mask, null_k=null_k, null_v=null_v)
    return eager_attention(q, k, v, scales, null_k=null_k, null_v=null_v, mask=mask, dropout_p=dropout_p)


__all__ = ["BlockSparse", "CAUSAL", "MaskSpec", "attend", "block_mask", "flex_field_attention",
           "flex_unsupported_reason", "select_backend"]
