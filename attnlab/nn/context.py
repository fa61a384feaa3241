"""Per-forward context threaded through topology nodes to attention layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class ForwardContext:
    """``positions``: absolute positions of the T input tokens, (T,) or (B, T).
    ``attention_impl``: ``fused`` (one SDPA call) or ``eager`` (the reference; tests, debugging)."""

    positions: torch.Tensor
    attention_impl: Literal["fused", "eager"] = "fused"
