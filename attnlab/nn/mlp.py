"""Feed-forward blocks: SwiGLU (Llama) and GELU (GPT-2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.config.model import MLPConfig


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, bias: bool):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=bias)
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GeluMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, bias: bool):
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


def build_mlp(cfg: MLPConfig, d_model: int) -> nn.Module:
    hidden = cfg.hidden_dim(d_model)
    if cfg.type == "swiglu":
        return SwiGLU(d_model, hidden, cfg.bias)
    return GeluMLP(d_model, hidden, cfg.bias)
