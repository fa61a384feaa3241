"""Rotary position embeddings: half-split (HF/NeoX) or interleaved pairs, Llama-3 scaling,
explicit frequency lists."""

from __future__ import annotations

import math

import torch
from torch import nn

from attnlab.config.attention import Llama3RopeScaling, RopeConfig


def rope_inv_freq(cfg: RopeConfig, head_dim: int) -> torch.Tensor:
    """Angular frequency of each rotated pair, float64: (head_dim // 2,), or (kv_heads,
    head_dim // 2) for per-head lists."""
    if cfg.inv_freq is not None:
        return torch.tensor(cfg.inv_freq, dtype=torch.float64)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / (cfg.theta ** exponents)
    if cfg.scaling is not None:
        inv_freq = apply_llama3_scaling(inv_freq, cfg.scaling)
    return inv_freq


def apply_llama3_scaling(inv_freq: torch.Tensor, s: Llama3RopeScaling) -> torch.Tensor:
    """Llama-3.1 frequency scaling: long wavelengths divided by ``factor``, short ones kept,
    a smooth blend in between."""
    low_freq_wavelen = s.original_max_position / s.low_freq_factor
    high_freq_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to tensors shaped (B, heads, T, head_dim) at given absolute positions.

    Angles are computed per call from the positions in float64 (exact far past 2^24 positions,
    no cache to grow, no host sync, so it traces cleanly under torch.compile); the cost is
    T * head_dim / 2 trig ops, negligible next to the projections.
    """

    def __init__(self, cfg: RopeConfig, head_dim: int):
        super().__init__()
        self.style = cfg.style
        self.head_dim = head_dim
        self.register_buffer("inv_freq", rope_inv_freq(cfg, head_dim), persistent=False)  # float64

    def _apply(self, fn, *args, **kwargs):
        # model.half()/.to(bf16) must not round the frequencies: keep them float64 on any device
        exact = self.inv_freq
        super()._apply(fn, *args, **kwargs)
        self.inv_freq = exact.to(self.inv_freq.device)
        return self

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, num_heads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin broadcastable against (B, heads, T, head_dim // 2) for integer ``positions``
        ((T,) or (B, T))."""
        inv_freq = self.inv_freq
        if inv_freq.dim() == 2:  # per kv head: query heads take their group's frequencies
            inv_freq = inv_freq.repeat_interleave(num_heads // inv_freq.shape[0], dim=0)[:, None, :]  # (heads, 1, P)
        pos = positions.to(torch.float64).unsqueeze(-1)  # (T, 1) or (B, T, 1)
        if pos.dim() == 3:
            pos = pos.unsqueeze(1)  # (B, 1, T, 1): broadcast over heads
        angles = pos * inv_freq
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return apply_rotary(x, *self._cos_sin_for(positions, x.dtype, x.shape[1]), self.style)

    def _cos_sin_for(self, positions: torch.Tensor, dtype: torch.dtype, num_heads: int):
        """cos/sin, reused for the next call with the same positions tensor (unchanged since),
        dtype and head count: queries and keys of one forward share them, which halves a decode
        step's rotary kernels. The memo holds the positions tensor, so its identity stays unique."""
        if torch.compiler.is_compiling():
            return self.cos_sin(positions, dtype, num_heads)
        heads = num_heads if self.inv_freq.dim() == 2 else 0
        memo = getattr(self, "_memo", None)
        if (memo is not None and memo[0] is positions and memo[1] == positions._version
                and memo[2] == (dtype, heads, positions.device)):
            return memo[3]
        cos_sin = self.cos_sin(positions, dtype, num_heads)
        self._memo = (positions, positions._version, (dtype, heads, positions.device), cos_sin)
        return cos_sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate pairs of ``x`` (…, T, d) by angles whose cos/sin are (…, T, d/2)."""
    if style == "half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x_pairs = x.unflatten(-1, (-1, 2))
    x1, x2 = x_pairs[..., 0], x_pairs[..., 1]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
