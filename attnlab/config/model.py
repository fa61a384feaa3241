"""Typed spec of a decoder language model, including per-layer attention and topology nodes."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

from attnlab.config.attention import check_attention_against_width
from attnlab.config.base import StrictModel
from attnlab.config.limits import Limits, check_count, human_count, limits_from
from attnlab.config.variants import AttentionConfig


def _default_attention_type(value):
    """``attention:`` without ``type`` is standard attention (as documented)."""
    if isinstance(value, dict) and "type" not in value:
        return {"type": "standard", **value}
    return value


class MLPConfig(StrictModel):
    """Feed-forward block. ``d_ff`` defaults to 4*d_model (gelu) or the Llama rule (swiglu:
    8/3*d_model rounded up to a multiple of 64)."""

    type: Literal["swiglu", "gelu"] = "swiglu"
    d_ff: int | None = Field(None, gt=0)
    bias: bool = False

    @field_validator("d_ff", mode="after")
    @classmethod
    def _check_width(cls, value: int | None, info: ValidationInfo) -> int | None:
        check_count(value, limits_from(info.context).max_width, "d_ff", "max_width")
        return value

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

    _attn_type = field_validator("attention", mode="before")(_default_attention_type)


class AttentionNode(StrictModel):
    """A bare attention layer (no norm, no residual): compose it with ``residual``/``norm``."""

    type: Literal["attention"] = "attention"
    attention: AttentionConfig | None = None

    _attn_type = field_validator("attention", mode="before")(_default_attention_type)


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

    @field_validator("count", mode="after")
    @classmethod
    def _check_count(cls, value: int, info: ValidationInfo) -> int:
        check_count(value, limits_from(info.context).max_repeat, "repeat count", "max_repeat")
        return value


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

    _attn_type = field_validator("attention", mode="before")(_default_attention_type)

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

    _attn_type = field_validator("attention", mode="before")(_default_attention_type)

    @field_validator("vocab_size", "d_model", "block_size", "num_layers", mode="after")
    @classmethod
    def _check_size(cls, value: int | None, info: ValidationInfo) -> int | None:
        limits = limits_from(info.context)
        maximum, knob = {"vocab_size": (limits.max_vocab, "max_vocab"), "d_model": (limits.max_width, "max_width"),
                         "block_size": (limits.max_context, "max_context"),
                         "num_layers": (limits.max_layers, "max_layers")}[info.field_name]
        check_count(value, maximum, info.field_name, knob)
        return value

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "ModelConfig":
        if (self.num_layers is None) == (self.topology is None):
            raise ValueError("give exactly one of 'num_layers' (a stack of blocks) or 'topology'")
        limits = limits_from(info.context)
        if self.topology is not None:
            _check_topology_size(self.topology, limits)  # before anything walks the expanded tree
        params = estimate_parameters(self)
        if params > limits.max_params:
            raise ValueError(f"this model has about {human_count(params)} parameters, over the limit of "
                             f"{human_count(limits.max_params)} (raise defaults.limits.max_params or "
                             "ATTNLAB_MAX_PARAMS to allow it)")
        if self.topology is not None and self.layer_overrides:
            raise ValueError("'layer_overrides' applies to the num_layers stack; with 'topology' set the attention per node")
        for i, ov in enumerate(self.layer_overrides):
            if ov.layers is not None:
                bad = [x for x in ov.layers if not 0 <= x < self.num_layers]
                if bad:
                    raise ValueError(f"layer_overrides[{i}].layers has {bad} outside 0..{self.num_layers - 1}")
        for spec in self.attention_specs():
            check_attention_against_width(spec, self.d_model)
            spec.check_context(self.block_size)
        return self

    def layer_dims(self) -> list:
        """Cache spec (``AttentionDims``) of every attention layer, in forward order."""
        return [spec.dims(self.d_model) for spec in self.attention_specs()]

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


# ---------------------------------------------------------------- size estimates (nothing is built)
def _check_topology_size(root, limits: Limits) -> None:
    """Refuse a topology whose expanded layer or node count exceeds the limits, without
    expanding it (repeat counts multiply)."""

    def count(node) -> tuple[int, int]:  # (blocks + bare attention/MLP layers, nodes), expanded
        if isinstance(node, RepeatNode):
            layers, nodes = count(node.body)
            return layers * node.count, nodes * node.count + 1
        if isinstance(node, SequentialNode | ResidualNode | ParallelNode):
            layers = nodes = 0
            for child in node.children:
                cl, cn = count(child)
                layers, nodes = layers + cl, nodes + cn
            return layers, nodes + 1
        if isinstance(node, BlockNode | AttentionNode | MLPNode):
            return 1, 1  # a block counts as one layer, as in num_layers
        return 0, 1

    layers, nodes = count(root)
    if layers > limits.max_layers:
        raise ValueError(f"the topology expands to {layers} layers (blocks, attention and MLP nodes), over the limit of "
                         f"{limits.max_layers} (raise defaults.limits.max_layers or ATTNLAB_MAX_LAYERS)")
    if nodes > limits.max_topology_nodes:
        raise ValueError(f"the topology expands to {nodes} nodes, over the limit of {limits.max_topology_nodes} "
                         "(raise defaults.limits.max_topology_nodes or ATTNLAB_MAX_TOPOLOGY_NODES)")


def _attention_params(spec, d_model: int) -> int:
    return spec.approx_params(d_model)


def _mlp_params(spec: MLPConfig, d_model: int) -> int:
    return (3 if spec.type == "swiglu" else 2) * d_model * spec.hidden_dim(d_model)


def estimate_parameters(cfg: "ModelConfig") -> int:
    """Approximate parameter count from the config alone (weights of the projections,
    embeddings and norms; biases and small extras ignored). Used to refuse absurd sizes
    before a module exists; ``attnlab.model.stats`` counts exactly."""
    d = cfg.d_model
    total = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + d
    if cfg.topology is None:
        for i in range(cfg.num_layers):
            spec = cfg.attention
            for ov in cfg.layer_overrides:
                if ov.attention is not None and ov.matches(i):
                    spec = ov.attention
            total += _attention_params(spec, d) + _mlp_params(cfg.mlp_for_layer(i), d) + 2 * d
        return total

    def walk(node) -> int:
        if isinstance(node, RepeatNode):
            return node.count * walk(node.body)
        if isinstance(node, SequentialNode | ResidualNode | ParallelNode):
            return sum(walk(c) for c in node.children)
        if isinstance(node, BlockNode):
            return (_attention_params(node.attention or cfg.attention, d) + _mlp_params(node.mlp or cfg.mlp, d)
                    + 2 * d)
        if isinstance(node, AttentionNode):
            return _attention_params(node.attention or cfg.attention, d)
        if isinstance(node, MLPNode):
            return _mlp_params(node.mlp or cfg.mlp, d)
        return d  # norm

    return total + walk(cfg.topology)
