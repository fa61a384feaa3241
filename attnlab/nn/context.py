"""Per-forward context threaded through topology nodes to attention layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from attnlab.cache.kv import CacheStep, ModelCache


@dataclass
class ForwardContext:
    """``positions``: absolute positions of the T input tokens, (T,) or (B, T).
    ``attention_impl``: ``fused`` (the fastest backend for the layer's mask: one SDPA call for a
    causal mask, FlexAttention for others), ``eager`` (the reference; tests, debugging), or a
    backend by name (``sdpa``, ``flex``); see ``nn.attention.backends.select_backend``.
    With a ``cache``: ``step`` says where the new tokens are written (``step.offsets``; the first
    ``step.valid[b]`` are real, the rest right padding) and attention reads keys
    ``0 .. step.lengths[b] - 1``. The decode runtime builds the step and advances lengths."""

    positions: torch.Tensor
    attention_impl: Literal["fused", "eager", "sdpa", "flex"] = "fused"
    cache: "ModelCache | None" = None
    step: "CacheStep | None" = None
