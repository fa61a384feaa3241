"""The attention zoo: one interface (``AttentionLayer``), one builder."""

from attnlab.config.attention import DecoupledAttentionConfig
from attnlab.nn.attention.base import AttentionLayer, Projected
from attnlab.nn.attention.decoupled import DecoupledAttention
from attnlab.nn.attention.functional import eager_attention, fused_causal_attention
from attnlab.nn.attention.standard import StandardAttention


def build_attention(cfg, d_model: int, layer_index: int) -> AttentionLayer:
    """Construct the attention layer a config describes."""
    if isinstance(cfg, DecoupledAttentionConfig):
        return DecoupledAttention(cfg, d_model, layer_index)
    return StandardAttention(cfg, d_model, layer_index)


__all__ = ["AttentionLayer", "DecoupledAttention", "Projected", "StandardAttention",
           "build_attention", "eager_attention", "fused_causal_attention"]
