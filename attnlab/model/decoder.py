"""Decoder-only language model: token embedding -> topology body -> final norm -> LM head."""

from __future__ import annotations

import math

import torch
from torch import nn

from typing import TYPE_CHECKING

from attnlab.config.model import ModelConfig
from attnlab.errors import InputError
from attnlab.model.topology import TopologyBuilder
from attnlab.nn.attention import AttentionLayer
from attnlab.nn.context import ForwardContext
from attnlab.nn.mlp import GeluMLP, SwiGLU
from attnlab.nn.norm import build_norm

if TYPE_CHECKING:
    from attnlab.cache.kv import CacheStep, ModelCache


class DecoderLM(nn.Module):
    """``model(input_ids)`` -> logits (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        builder = TopologyBuilder(cfg)
        self.body = builder.default_stack() if cfg.topology is None else builder.build(cfg.topology)
        self.final_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.dropout = nn.Dropout(cfg.dropout)
        self.reset_parameters()

    # ------------------------------------------------------------------ structure
    def attention_layers(self) -> list[AttentionLayer]:
        """Attention layers in forward order (index i == layer.layer_index)."""
        layers = [m for m in self.modules() if isinstance(m, AttentionLayer)]
        return sorted(layers, key=lambda m: m.layer_index)

    def num_parameters(self, *, exclude_embedding: bool = False) -> int:
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        if exclude_embedding:
            total -= self.embed.weight.numel()
        return total

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, init_std); residual output projections scaled by
        1/sqrt(2 * num_attention_layers); norms 1; biases and gates 0; null tokens N(0, init_std)."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * max(1, len(self.attention_layers())))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
        # projections that write into the residual stream
        residual_outputs = [m.out for m in self.attention_layers()]
        residual_outputs += [m.down for m in self.modules() if isinstance(m, (SwiGLU, GeluMLP))]
        for linear in residual_outputs:
            nn.init.normal_(linear.weight, 0.0, residual_std)
        for layer in self.attention_layers():
            gate = getattr(layer, "gate", None)
            if gate is not None:
                nn.init.zeros_(gate.weight)
                nn.init.zeros_(gate.bias)
            if layer.dims.null_token:
                for p in layer.null_keys.values():
                    nn.init.normal_(p, 0.0, std)
                nn.init.normal_(layer.null_value, 0.0, std)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                cache: "ModelCache | None" = None, step: "CacheStep | None" = None,
                attention_impl: str = "fused") -> torch.Tensor:
        """Logits (B, T, vocab). With ``cache`` and ``step`` (built by the decode runtime,
        ``attnlab.infer.runtime``) the tokens continue each cached sequence at ``step.offsets``;
        the model writes them into the cache but never changes lengths: the runtime does."""
        hidden = self.hidden_states(input_ids, positions=positions, cache=cache, step=step,
                                    attention_impl=attention_impl)
        return self.lm_head(hidden)

    def hidden_states(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                      cache: "ModelCache | None" = None, step: "CacheStep | None" = None,
                      attention_impl: str = "fused") -> torch.Tensor:
        """Final-norm hidden states (B, T, d_model)."""
        batch, t_len = input_ids.shape
        if t_len > self.config.block_size:
            raise InputError(f"{t_len} tokens in one forward pass exceed block_size {self.config.block_size}; "
                             f"feed longer inputs in chunks through a cache (chunked prefill)")
        if cache is None:
            if positions is None:
                positions = torch.arange(t_len, device=input_ids.device)
            ctx = ForwardContext(positions=positions, attention_impl=attention_impl)
        else:
            if step is None:
                raise InputError("a cached forward needs a CacheStep (use attnlab.infer.DecodeRuntime)")
            if cache.batch != batch or step.positions.shape != (batch, t_len):
                raise InputError(f"cache holds {cache.batch} sequences and the step {tuple(step.positions.shape)} "
                                 f"positions; the input is {tuple(input_ids.shape)}")
            ctx = ForwardContext(positions=step.positions, attention_impl=attention_impl, cache=cache, step=step)
        x = self.dropout(self.embed(input_ids))
        return self.final_norm(self.body(x, ctx))


def build_model(cfg: ModelConfig) -> DecoderLM:
    """Build a freshly initialized model from a validated config."""
    return DecoderLM(cfg)
