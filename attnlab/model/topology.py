"""Topology nodes ("architectures are graphs"): every node maps (x, ctx) -> x of the same shape.

The default decoder body is a ``Sequential`` of pre-norm ``Block``s; a manifest ``topology`` tree
builds any composition of sequential / residual / parallel / repeat around blocks, bare attention,
MLP and norm layers. Attention layers are numbered in forward order (their cache index later).
"""

from __future__ import annotations

import torch
from torch import nn

from attnlab.config.model import (
    AttentionNode,
    BlockNode,
    MLPNode,
    ModelConfig,
    NormNode,
    ParallelNode,
    RepeatNode,
    ResidualNode,
    SequentialNode,
)
from attnlab.nn.attention import build_attention
from attnlab.nn.context import ForwardContext
from attnlab.nn.mlp import build_mlp
from attnlab.nn.norm import build_norm


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)); x + mlp(norm(x))."""

    def __init__(self, attention: nn.Module, mlp: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.attention = attention
        self.mlp_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.mlp = mlp
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), ctx))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Sequential(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, ctx)
        return x


class Residual(Sequential):
    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return x + super().forward(x, ctx)


class Parallel(nn.Module):
    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        out = self.branches[0](x, ctx)
        for branch in self.branches[1:]:
            out = out + branch(x, ctx)
        return out


class Pointwise(nn.Module):
    """Adapts a context-free layer (MLP, norm) to the node interface."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.inner(x)


class TopologyBuilder:
    """Builds node modules from config, numbering attention layers in forward order."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.num_attention = 0
        self.num_blocks = 0
        self.total_attention = len(cfg.attention_specs())  # attention layers the model will have

    def _attention(self, spec) -> nn.Module:
        spec = (spec or self.cfg.attention).for_model(self.cfg.block_size, self.total_attention)
        layer = build_attention(spec, self.cfg.d_model, self.num_attention)
        self.num_attention += 1
        return layer

    def default_stack(self) -> Sequential:
        blocks = []
        for i, spec in enumerate(self.cfg.attention_specs()):
            attention = self._attention(spec)
            blocks.append(Block(attention, build_mlp(self.cfg.mlp_for_layer(i), self.cfg.d_model), self.cfg))
        self.num_blocks = len(blocks)
        return Sequential(blocks)

    def build(self, node) -> nn.Module:
        if isinstance(node, BlockNode):
            self.num_blocks += 1
            return Block(self._attention(node.attention), build_mlp(node.mlp or self.cfg.mlp, self.cfg.d_model), self.cfg)
        if isinstance(node, AttentionNode):
            return self._attention(node.attention)
        if isinstance(node, MLPNode):
            return Pointwise(build_mlp(node.mlp or self.cfg.mlp, self.cfg.d_model))
        if isinstance(node, NormNode):
            return Pointwise(build_norm(self.cfg.norm, self.cfg.d_model, self.cfg.norm_eps))
        if isinstance(node, RepeatNode):
            return Sequential([self.build(node.body) for _ in range(node.count)])
        if isinstance(node, ResidualNode):
            return Residual([self.build(c) for c in node.children])
        if isinstance(node, ParallelNode):
            return Parallel([self.build(c) for c in node.children])
        assert isinstance(node, SequentialNode), type(node)
        return Sequential([self.build(c) for c in node.children])
