"""Per-forward context threaded through topology nodes to attention layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from attnlab.cache.kv import ModelCache


@dataclass
class ForwardContext:
    """``positions``: absolute positions of the T input tokens, (T,) or (B, T).
    ``attention_impl``: ``fused`` (one SDPA call) or ``eager`` (the reference; tests, debugging).
    With a ``cache``: the new tokens are written at ``cache_offsets[b]`` (``valid[b]`` of them are
    real, the rest right padding) and attention reads keys ``0 .. key_lengths[b] - 1``."""

    positions: torch.Tensor
    attention_impl: Literal["fused", "eager"] = "fused"
    cache: "ModelCache | None" = None
    cache_offsets: list[int] | None = None
    valid: list[int] | None = None
    key_lengths: list[int] | None = None
