"""Analytic numbers a user compares architectures by before training: parameters,
FLOPs per token and KV-cache bytes per token (per layer and total, per cache format)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attnlab.config.attention import AttentionDims, DecoupledAttentionConfig
from attnlab.config.model import ModelConfig
from attnlab.config.variants import mixed_policy
from attnlab.quant.formats import get_format

#: formats shown by default; every model also gets its variants' heterogeneous policy
DEFAULT_FORMATS = ("fp16", "q8_0", "q4_0")
PAPER_DBA_POLICY = DecoupledAttentionConfig.mixed_policy  # the paper's: k_sem q4_0, k_geo q8_0, v q4_0


def kv_bytes_per_token_layer(dims: AttentionDims, formats: dict[str, str] | str) -> int:
    """Bytes one token adds to one layer's cache; ``formats`` is one format or field -> format.
    A window + block-summary layer (``dims.summaries``) grows by its summary rows once per block:
    that, over the block size (rounded up); its window pool is fixed (``kv_fixed_bytes_layer``)."""
    def row(name: str, head_dim: int) -> int:
        fmt = formats if isinstance(formats, str) else formats.get(name, "fp16")
        return get_format(fmt).row_bytes(dims.num_kv_heads * head_dim)

    if dims.chunks is not None:  # one boundary row per chunk (none for a window alone)
        if not dims.chunks.boundary_rows:
            return 0
        return -(-sum(row(name, hd) for name, hd in dims.token_fields.items()) // dims.chunks.chunk_size)
    if dims.summaries is None:
        return sum(row(name, hd) for name, hd in dims.cache_fields.items())
    per_block = sum(row(f"{name}_sum", hd) for name, hd in dims.token_fields.items())
    return -(-per_block // dims.summaries.block_size)


def kv_fixed_bytes_layer(dims: AttentionDims, formats: dict[str, str] | str) -> int:
    """Bytes of a layer's cache (one sequence) that do not grow with the context: a window +
    summary layer's window pool (``window`` rows); a chunk-boundary layer's window (``window + 1``
    rows) and one float32 copy of its recurrent states; 0 for per-token caches."""
    if dims.summaries is None and dims.chunks is None:
        return 0
    rows = dims.summaries.window if dims.summaries is not None else dims.chunks.window + 1
    total = 0
    for name, head_dim in dims.token_fields.items():
        fmt = formats if isinstance(formats, str) else formats.get(name, "fp16")
        total += rows * get_format(fmt).row_bytes(dims.num_kv_heads * head_dim)
    if dims.chunks is not None:
        total += 4 * sum(math.prod(shape) for _, shape in dims.chunks.states)
    return total


def policy_label(formats: dict[str, str] | str) -> str:
    return formats if isinstance(formats, str) else ",".join(f"{k}={v}" for k, v in formats.items())


@dataclass
class ModelStats:
    params: int
    params_non_embedding: int
    flops_per_token_forward: int         # at a full block_size context (causal average)
    attention_dims: list[AttentionDims]
    kv_bytes: dict[str, list[int]] = field(default_factory=dict)  # policy label -> per layer

    @property
    def flops_per_token_train(self) -> int:
        return 3 * self.flops_per_token_forward

    def kv_total(self, label: str) -> int:
        return sum(self.kv_bytes[label])


def _meta_model(cfg: ModelConfig):
    from attnlab.model.decoder import DecoderLM  # local: building is only needed for counting

    with torch.device("meta"):
        return DecoderLM(cfg)


def count_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(total, non-embedding) parameter counts from the real module tree on the meta device."""
    model = _meta_model(cfg)
    return model.num_parameters(), model.num_parameters(exclude_embedding=True)


def model_stats(cfg: ModelConfig, formats: tuple[str, ...] = DEFAULT_FORMATS) -> ModelStats:
    model = _meta_model(cfg)
    total, non_embedding = model.num_parameters(), model.num_parameters(exclude_embedding=True)
    dims = [layer.dims for layer in model.attention_layers()]
    # matmul FLOPs: 2 per weight per token, LM head included, embedding lookup excluded;
    # norm weights, biases and null tokens cost no matmul
    matmul_params = sum(p.numel() for n, p in model.named_parameters()
                        if p.dim() == 2 and "null_" not in n and n != "embed.weight")
    matmul_params += cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    mean_context = (cfg.block_size + 1) / 2
    attn_flops = 0.0
    for d in dims:
        keys = mean_context + (1 if d.null_token else 0)
        if d.summaries is not None:  # a window plus at most three block summaries
            keys = min(keys, d.summaries.window + 3)
        if d.chunks is not None:  # the window plus one boundary per chunk before it
            boundaries = mean_context / d.chunks.chunk_size + 1 if d.chunks.boundary_rows else 0
            keys = min(keys, d.chunks.window + 1 + boundaries)
        attn_flops += 2 * d.num_heads * (d.qk_head_dim + d.v_head_dim) * keys
    stats = ModelStats(total, non_embedding, int(2 * matmul_params + attn_flops), dims)
    policies: list[dict[str, str] | str] = list(formats)
    mixed = mixed_policy(cfg.attention_specs())
    if mixed:
        policies.append(mixed)
    for policy in policies:
        stats.kv_bytes[policy_label(policy)] = [kv_bytes_per_token_layer(d, policy) for d in dims]
    return stats
