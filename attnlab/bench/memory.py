"""KV-cache memory: analytic bytes vs bytes allocated by a real cache (a ``DecodeRuntime``
preallocated for the context: exactly the analytic bytes, plus the exact-tail ring), peak device
memory, and the long-context decomposition

    standard_fp16  --architecture-->  arch_fp16  --quantization-->  arch_policy

``standard_fp16`` is a standard multi-head model of the same width, depth and head count
(``num_kv_heads == num_heads``) with an fp16 cache; ``arch_fp16`` is this model with an fp16
cache; ``arch_policy`` is this model under the benchmark's cache policy. The ratios split the
end-to-end saving into the part the architecture buys and the part quantization buys
(end_to_end = architecture x quantization).
"""

from __future__ import annotations

import torch

from attnlab.bench.context import BenchContext
from attnlab.bench.latency import (
    bench_tokens,
    chunk_size,
    chunked_prefill,
    resolve_policy,
    sync,
)
from attnlab.cache import CachePolicy, ModelCache, layer_cache
from attnlab.infer.runtime import DecodeRuntime
from attnlab.config.attention import (
    AttentionDims,
    StandardAttentionConfig,
    attention_dims,
)
from attnlab.config.bench import MemoryBench
from attnlab.config.model import ModelConfig
from attnlab.errors import ConfigError
from attnlab.model import build_model

CONFIGS = ("standard_fp16", "arch_fp16", "arch_policy")


def standard_counterpart(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with every attention layer replaced by standard multi-head attention with the
    model-level head count (``num_kv_heads = num_heads``, head_dim = d_model / num_heads, RoPE);
    per-layer / per-node attention overrides are dropped, MLP overrides kept."""
    heads = cfg.attention.num_heads
    if cfg.d_model % heads:
        raise ConfigError("model.attention.num_heads", f"a standard counterpart needs d_model={cfg.d_model} "
                          f"divisible by num_heads", heads)
    data = cfg.model_dump()
    data["attention"] = StandardAttentionConfig(num_heads=heads).model_dump()
    overrides = []
    for ov in data.get("layer_overrides") or []:
        ov["attention"] = None
        if ov.get("mlp") is not None:
            overrides.append(ov)
    data["layer_overrides"] = overrides

    def strip(node):
        if isinstance(node, dict):
            if "attention" in node:
                node["attention"] = None
            for value in node.values():
                strip(value)
        elif isinstance(node, list):
            for value in node:
                strip(value)

    strip(data.get("topology"))
    return ModelConfig.model_validate(data)


def config_dims(cfg: ModelConfig) -> list[AttentionDims]:
    """Attention dims of every layer, from the config alone (no model)."""
    return [attention_dims(spec, cfg.d_model) for spec in cfg.attention_specs()]


def analytic(dims: list[AttentionDims], policy: CachePolicy, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes per token of one sequence over all layers, fixed bytes: the tail ring and any
    window + summary layer's window pool and running sums) from the formats: the cache's own accounting, built on the meta device (no memory; the capacity does
    not change either number)."""
    policy.check_fields(dims)
    meta = torch.device("meta")
    cache = ModelCache([layer_cache(d, policy, 1, 1, meta, dtype) for d in dims], 1, 1, policy)
    report = cache.report(0)
    return report.bytes_per_token, report.tail_bytes + report.fixed_bytes


def measure(model, policy: CachePolicy, ctx: BenchContext, context: int, chunk: int | None) -> dict:
    """Prefill ``context`` tokens into a batch-1 runtime allocated for ``context`` positions:
    the field storage its cache allocated (``measured_bytes``: bytes_per_token x context, as the
    estimate), its exact-tail ring (``measured_tail_bytes``), and on CUDA the peak device-memory
    increase over allocation and prefill (cache + activations)."""
    ids = bench_tokens(ctx, context, 1)
    cuda = ctx.device.type == "cuda"
    if cuda:
        sync(ctx.device)
        torch.cuda.reset_peak_memory_stats(ctx.device)
        base = torch.cuda.memory_allocated(ctx.device)
    runtime = DecodeRuntime(model, policy, batch=1, max_length=context)
    chunked_prefill(runtime, ids, chunk)
    peak = None
    if cuda:
        sync(ctx.device)
        peak = torch.cuda.max_memory_allocated(ctx.device) - base
    report = runtime.report()
    del runtime, ids
    return {"measured_bytes": report.bytes_allocated - report.tail_bytes, "measured_tail_bytes": report.tail_bytes,
            "peak_device_bytes": peak}


def _build_on(cfg: ModelConfig, device: torch.device):
    """A randomly initialised model (memory does not depend on weights), built directly on CUDA
    (no host copy of a large model); on CPU built plainly."""
    if device.type == "cpu":
        return build_model(cfg)
    with torch.device(device):
        return build_model(cfg)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def run_memory(cfg: MemoryBench, ctx: BenchContext) -> list[dict]:
    """Three rows per context (``config`` = standard_fp16 | arch_fp16 | arch_policy):

    ``context, config, policy, bytes_per_token`` (analytic, one sequence, all layers),
    ``tail_bytes`` (fixed full-precision tail ring, 0 without ``tail``), ``estimate_bytes``
    (bytes_per_token x context + tail_bytes), ``measured_bytes`` (field storage a decode runtime
    preallocated for ``context`` tokens, measured after prefilling them: equals bytes_per_token x
    context; None beyond ``measure_up_to``), ``measured_tail_bytes`` (the tail ring it allocated:
    equals tail_bytes; None when not measured), ``peak_device_bytes`` (CUDA peak increase over
    allocation and prefill; None on CPU or when not measured), and ``ratio_architecture``
    (standard_fp16 / arch_fp16), ``ratio_quantization`` (arch_fp16 / arch_policy),
    ``ratio_end_to_end`` (standard_fp16 / arch_policy) from the estimates — set on arch_policy
    rows, None on the others."""
    model = ctx.model
    for i, context in enumerate(cfg.contexts):
        if context < 1:
            raise ConfigError(f"contexts[{i}]", "must be >= 1", context)
    chunk = chunk_size(model, cfg.chunk)
    fp16 = CachePolicy.parse("fp16")
    policy = resolve_policy(cfg.policy, ctx, heterogeneous_default=True)
    std_cfg = standard_counterpart(model.config)
    arch_dims = [layer.dims for layer in model.attention_layers()]
    setups = {"standard_fp16": (fp16, analytic(config_dims(std_cfg), fp16, ctx.dtype)),
              "arch_fp16": (fp16, analytic(arch_dims, fp16, ctx.dtype)),
              "arch_policy": (policy, analytic(arch_dims, policy, ctx.dtype))}
    measure_any = any(c <= cfg.measure_up_to for c in cfg.contexts)
    std_model = _build_on(std_cfg, ctx.device).to(dtype=ctx.dtype).eval() if measure_any else None

    rows: list[dict] = []
    for context in cfg.contexts:
        estimates = {name: bpt * context + tail for name, (_, (bpt, tail)) in setups.items()}
        for name in CONFIGS:
            pol, (bpt, tail) = setups[name]
            row = {"context": context, "config": name, "policy": pol.label, "bytes_per_token": bpt,
                   "tail_bytes": tail, "estimate_bytes": estimates[name], "measured_bytes": None,
                   "measured_tail_bytes": None, "peak_device_bytes": None, "ratio_architecture": None,
                   "ratio_quantization": None, "ratio_end_to_end": None}
            if context <= cfg.measure_up_to:
                row.update(measure(std_model if name == "standard_fp16" else model, pol, ctx, context, chunk))
                _free(ctx.device)
            if name == "arch_policy":
                std, arch, quant = (estimates[k] for k in CONFIGS)
                row.update(ratio_architecture=std / arch, ratio_quantization=arch / quant,
                           ratio_end_to_end=std / quant)
            rows.append(row)
    del std_model
    _free(ctx.device)
    return rows
