"""Typed spec of a decoder language model, including per-layer attention and topology nodes."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from attnlab.config.attention import AttentionConfig, check_attention_against_width
from attnlab.config.base import StrictModel


class MLPConfig(StrictModel):
    """Feed-forward block. ``d_ff`` defaults to 4*d_model (gelu) or the Llama rule (swiglu:
    8/3*d_model rounded up to a multiple of 64)."""

    type: Literal["swiglu", "gelu"] = "swiglu"
    d_ff: int | None = Field(None, gt=0)
    bias: bool = False

    def hidden_dim(self, d_model: int) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.type == "gelu":
            return 4 * d_model
        raw = int(8 * d_model / 3)
        return 64 * ((raw + 63) // 64)


# ---------------------------------------------------------------- topology nodes
class BlockNode(StrictModel):
    """A pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).
    ``attention``/``mlp`` replace the model-level defaults for this block only."""

    type: Literal["block"] = "block"
    attention: AttentionConfig | None = None
    mlp: MLPConfig | None = None


class AttentionNode(StrictModel):
    """A bare attention layer (no norm, no residual): compose it with ``residual``/``norm``."""

    type: Literal["attention"] = "attention"
    attention: AttentionConfig | None = None


class MLPNode(StrictModel):
    type: Literal["mlp"] = "mlp"
    mlp: MLPConfig | None = None


class NormNode(StrictModel):
    type: Literal["norm"] = "norm"


class SequentialNode(StrictModel):
    """Children applied one after another."""

    type: Literal["sequential"] = "sequential"
    children: list["TopologyNode"] = Field(min_length=1)


class ResidualNode(StrictModel):
    """x + children(x), the children applied in sequence."""

    type: Literal["residual"] = "residual"
    children: list["TopologyNode"] = Field(min_length=1)


class ParallelNode(StrictModel):
    """Sum of every child applied to the same input (e.g. GPT-J's parallel attention + MLP
    inside a ``residual``)."""

    type: Literal["parallel"] = "parallel"
    children: list["TopologyNode"] = Field(min_length=2)


class RepeatNode(StrictModel):
    """``count`` copies of ``body``, each with its own parameters."""

    type: Literal["repeat"] = "repeat"
    count: int = Field(gt=0)
    body: "TopologyNode"


TopologyNode = Annotated[
    Union[BlockNode, AttentionNode, MLPNode, NormNode, SequentialNode, ResidualNode, ParallelNode, RepeatNode],
    Field(discriminator="type"),
]
for _node in (SequentialNode, ResidualNode, ParallelNode, RepeatNode):
    _node.model_rebuild()


class LayerOverride(StrictModel):
    """Replace attention and/or MLP in selected layers of the default stack.

    Select with ``layers: [0, 5]`` or ``every: 4`` (+ ``offset``): layer i matches when
    i % every == offset. Later overrides win.
    """

    layers: list[int] | None = None
    every: int | None = Field(None, gt=0)
    offset: int = Field(0, ge=0)
    attention: AttentionConfig | None = None
    mlp: MLPConfig | None = None

    @model_validator(mode="after")
    def _check_selector(self) -> "LayerOverride":
        if (self.layers is None) == (self.every is None):
            raise ValueError("give exactly one of 'layers' or 'every'")
        if self.every is not None and self.offset >= self.every:
            raise ValueError(f"offset={self.offset} must be smaller than every={self.every}")
        if self.attention is None and self.mlp is None:
            raise ValueError("an override needs 'attention' and/or 'mlp'")
        return self

    def matches(self, index: int) -> bool:
        if self.layers is not None:
            return index in self.layers
        return index % self.every == self.offset


class ModelConfig(StrictModel):
    """Decoder LM: embedding -> body -> final norm -> LM head.

    The body is either ``num_layers`` pre-norm blocks (with ``layer_overrides`` for hybrid
    stacks) or an explicit ``topology`` tree; exactly one of the two.
    """

    vocab_size: int = Field(gt=0)
    d_model: int = Field(gt=0)
    block_size: int = Field(gt=0, description="longest sequence one forward pass accepts")
    attention: AttentionConfig
    num_layers: int | None = Field(None, gt=0)
    mlp: MLPConfig = Field(default_factory=MLPConfig)
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = True
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_std: float = Field(0.02, gt=0)
    layer_overrides: list[LayerOverride] = Field(default_factory=list)
    topology: TopologyNode | None = None

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if (self.num_layers is None) == (self.topology is None):
            raise ValueError("give exactly one of 'num_layers' (a stack of blocks) or 'topology'")
        if self.topology is not None and self.layer_overrides:
            raise ValueError("'layer_overrides' applies to the num_layers stack; with 'topology' set the attention per node")
        for i, ov in enumerate(self.layer_overrides):
            if ov.layers is not None:
                bad = [x for x in ov.layers if not 0 <= x < self.num_layers]
                if bad:
                    raise ValueError(f"layer_overrides[{i}].layers has {bad} outside 0..{self.num_layers - 1}")
        for spec in self.attention_specs():
            check_attention_against_width(spec, self.d_model)
        return self

    def attention_specs(self) -> list:
        """Attention config of every attention layer, in forward order."""
        if self.topology is None:
            specs = []
            for i in range(self.num_layers):
                spec = self.attention
                for ov in self.layer_overrides:
                    if ov.attention is not None and ov.matches(i):
                        spec = ov.attention
                specs.append(spec)
            return specs
        out: list = []

        def walk(node, default_attn):
            if isinstance(node, BlockNode | AttentionNode):
                out.append(node.attention or default_attn)
            elif isinstance(node, RepeatNode):
                for _ in range(node.count):
                    walk(node.body, default_attn)
            elif isinstance(node, SequentialNode | ResidualNode | ParallelNode):
                for child in node.children:
                    walk(child, default_attn)

        walk(self.topology, self.attention)
        return out

    def mlp_for_layer(self, index: int) -> MLPConfig:
        spec = self.mlp
        for ov in self.layer_overrides:
            if ov.mlp is not None and ov.matches(index):
                spec = ov.mlp
        return spec
