"""The attention zoo: one interface (``AttentionLayer``), one builder, and the registration of the
built-in variants (``attnlab.config.variants``). A new variant is one module that defines its
config and layer and calls ``register_variant``; importing it here makes it built in."""

from attnlab.config.attention import BottleneckAttentionConfig, DecoupledAttentionConfig, StandardAttentionConfig
from attnlab.config.variants import build_layer, register_variant
from attnlab.nn.attention.base import AttentionLayer, Projected
from attnlab.nn.attention.decoupled import DecoupledAttention
from attnlab.nn.attention.functional import eager_attention, fused_causal_attention
from attnlab.nn.attention.standard import StandardAttention

register_variant(StandardAttentionConfig, StandardAttention)
register_variant(BottleneckAttentionConfig, StandardAttention)
register_variant(DecoupledAttentionConfig, DecoupledAttention)

from attnlab.nn.attention import attamba, butterfly, mla, sliding_window  # noqa: E402,F401  (register themselves)


def build_attention(cfg, d_model: int, layer_index: int) -> AttentionLayer:
    """Construct the attention layer a config describes (through the variant registry)."""
    return build_layer(cfg, d_model, layer_index)


__all__ = ["AttentionLayer", "DecoupledAttention", "Projected", "StandardAttention",
           "build_attention", "eager_attention", "fused_causal_attention"]
