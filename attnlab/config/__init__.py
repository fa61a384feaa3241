"""Typed, validated configuration for every area of attnlab (validated before any tensor exists)."""

from attnlab.config.attention import (
    AttentionDims,
    AttentionSpec,
    BottleneckAttentionConfig,
    DecoupledAttentionConfig,
    KeyField,
    Llama3RopeScaling,
    RopeConfig,
    StandardAttentionConfig,
    attention_dims,
)
from attnlab.config.base import StrictModel, validate_section
from attnlab.config.data import DataConfig, TokenizerConfig
from attnlab.config.model import (
    AttentionNode,
    BlockNode,
    LayerOverride,
    MLPConfig,
    MLPNode,
    ModelConfig,
    NormNode,
    ParallelNode,
    RepeatNode,
    ResidualNode,
    SequentialNode,
)
from attnlab.config.train import TrainConfig
from attnlab.config.variants import AttentionConfig

__all__ = [
    "AttentionConfig", "AttentionDims", "AttentionSpec", "AttentionNode", "BlockNode", "BottleneckAttentionConfig",
    "DataConfig", "DecoupledAttentionConfig", "KeyField", "LayerOverride", "Llama3RopeScaling",
    "MLPConfig", "MLPNode", "ModelConfig", "NormNode", "ParallelNode", "RepeatNode", "ResidualNode",
    "RopeConfig", "SequentialNode", "StandardAttentionConfig", "StrictModel", "TokenizerConfig",
    "TrainConfig", "attention_dims", "validate_section",
]
