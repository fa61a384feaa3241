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
    ``attention_impl``: ``fused`` (one SDPA call) or ``eager`` (the reference; tests, debugging).
    With a ``cache``: ``step`` says where the new tokens are written (``step.offsets``; the first
    ``step.valid[b]`` are real, the rest right padding) and attention reads keys
    ``0 .. step.lengths[b] - 1``. The decode runtime builds the step and advances lengths."""

    positions: torch.Tensor
    attention_impl: Literal["fused", "eager"] = "fused"
    cache: "ModelCache | None" = None
    step: "CacheStep | None" = None
