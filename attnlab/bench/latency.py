"""Latency: prefill tokens/s and decode ms/token over prompt lengths x generation lengths.

Every measurement goes through one ``DecodeRuntime`` per prompt length, allocated (untimed) for
the prompt plus the longest generation. Prefill of a prompt longer than ``block_size`` goes in
chunks (``runtime.forward``); each repeat starts from ``runtime.reset()`` in the untimed setup.
Decode is timed as a whole loop of ``gen_len`` greedy ``runtime.step`` calls (CUDA-graph replays
on CUDA) after an untimed prefill, so it never includes the prefill; the device is synchronised
only around the timed loop, and the graph is captured in the untimed setup.

The small helpers below (policy resolution, benchmark tokens, chunked prefill, device sync,
greedy step, warm-up step) are shared by the memory, context-sweep, quality and lm-eval modules.
"""

from __future__ import annotations

import numpy as np
import torch

from attnlab.bench.context import BenchContext
from attnlab.bench.kv_policies import default_policies
from attnlab.bench.timing import time_fn
from attnlab.cache import CachePolicy
from attnlab.config.bench import LatencyBench
from attnlab.errors import ConfigError
from attnlab.infer.runtime import DecodeRuntime


# ---------------------------------------------------------------- shared helpers
def heterogeneous_policy(model) -> str:
    """The heterogeneous policy of this model's attention variants (their ``mixed_policy``; DBA:
    the paper's ``k_sem=q4_0,k_geo=q8_0,v=q4_0``)."""
    return default_policies(model)[-1]


def resolve_policy(policy: str | None, ctx: BenchContext, *, heterogeneous_default: bool = False) -> CachePolicy:
    """``policy`` if given, else the run's ``ctx.cache_policy``, else the heterogeneous policy
    (``heterogeneous_default``) or the model's native dtype (exact cache)."""
    text = policy if policy is not None else ctx.cache_policy
    if text is None and heterogeneous_default:
        text = heterogeneous_policy(ctx.model)
    return CachePolicy.parse(text)


def chunk_size(model, chunk: int | None, where: str = "chunk") -> int:
    """Prefill chunk: ``chunk`` or ``block_size``; must lie in 1..block_size."""
    block = model.config.block_size
    size = block if chunk is None else chunk
    if not 1 <= size <= block:
        raise ConfigError(where, f"prefill chunk must lie in 1..block_size ({block})", chunk)
    return size


def bench_tokens(ctx: BenchContext, length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """(batch, length) token ids on ``ctx.device``: held-out tokens (row b starts at an evenly
    spaced offset; the stream wraps around when shorter than ``length``), or seeded random
    tokens when ``ctx.heldout`` is None."""
    vocab = ctx.model.config.vocab_size
    if ctx.heldout is not None and len(ctx.heldout) > 0:
        stream = np.asarray(ctx.heldout)
        n = len(stream)
        rows = [np.take(stream, np.arange(b * n // batch, b * n // batch + length) % n) for b in range(batch)]
        ids = torch.from_numpy(np.stack(rows).astype(np.int64))
        if int(ids.max()) >= vocab:
            raise ConfigError("heldout", f"held-out token id {int(ids.max())} is outside the model's vocab "
                              f"(size {vocab})", show_value=False)
    else:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (batch, length), generator=gen)
    return ids.to(ctx.device)


def chunked_prefill(runtime: DecodeRuntime, ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Append ``ids`` (B, T) to the runtime's sequences in chunks of ``chunk`` tokens (default
    block_size) through ``runtime.forward``; returns the logits of the last chunk (B, t_last, V)."""
    size = chunk_size(runtime.model, chunk)
    logits = None
    for start in range(0, ids.shape[1], size):
        logits = runtime.forward(ids[:, start: start + size])
    assert logits is not None, "chunked_prefill needs at least one token"
    return logits


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy_next(logits: torch.Tensor) -> torch.Tensor:
    """(B, 1) argmax token of the last position of ``logits`` (B, T, V), or of ``runtime.step``'s
    logits (B, V); a new tensor on the device (the step's output buffer may be reused)."""
    if logits.dim() == 2:
        return logits.argmax(dim=-1, keepdim=True)
    return logits[:, -1:].argmax(dim=-1)


def warm_up_step(runtime: DecodeRuntime, token: torch.Tensor) -> None:
    """One untimed ``runtime.step`` and the lengths put back: on CUDA the step's graph is captured
    (and its kernels compiled) here, outside any timed region. The rows it wrote lie past each
    length; the next step writes the same positions again."""
    lengths = runtime.host_lengths
    runtime.step(token)
    runtime.set_lengths(lengths)


# ---------------------------------------------------------------- benchmark
class _Runner:
    """Timed prefill and decode of one prompt through one runtime (allocated once for the prompt
    plus ``max_new`` tokens); each repeat starts from ``reset`` in the untimed setup (the decode
    setup also prefills, untimed)."""

    def __init__(self, model, policy: CachePolicy, prompt: torch.Tensor, device: torch.device, max_new: int):
        self.prompt, self.device = prompt, device
        self.runtime = DecodeRuntime(model, policy, batch=prompt.shape[0], max_length=prompt.shape[1] + max_new)
        self.next: torch.Tensor | None = None
        self.steps = 0
        self._warm = False

    def reset(self) -> None:
        self.runtime.reset()

    def prefill(self) -> None:
        self.next = greedy_next(chunked_prefill(self.runtime, self.prompt))

    def prefilled(self) -> None:
        self.reset()
        self.prefill()
        if not self._warm:  # capture the step's CUDA graph before the first timed loop
            warm_up_step(self.runtime, self.next)
            self._warm = True
        sync(self.device)

    def decode(self) -> None:
        token, runtime = self.next, self.runtime
        for _ in range(self.steps):
            token = greedy_next(runtime.step(token))
        self.next = token


@torch.no_grad()
def run_latency(cfg: LatencyBench, ctx: BenchContext) -> list[dict]:
    """One row per (prompt_len, gen_len):

    ``prompt_len, gen_len, batch_size, policy, warmup, repeats,
    prefill_median_s, prefill_p10_s, prefill_p90_s, prefill_tokens_per_s`` (batch * prompt_len /
    median), ``decode_ms_per_token, decode_p10_ms_per_token, decode_p90_ms_per_token,
    decode_tokens_per_s`` (batch / median step), ``kv_bytes_per_token`` (analytic, one sequence,
    all layers), ``kv_bytes_allocated`` (the runtime's cache, preallocated for the batch of
    ``prompt_len`` + the longest gen_len tokens: bytes_per_token x batch x that + tail ring).
    With ``gen_len == 0`` the decode columns are None."""
    policy = resolve_policy(cfg.policy, ctx)
    batch = cfg.batch_size
    for i, prompt_len in enumerate(cfg.prompt_lengths):
        if prompt_len < 1:
            raise ConfigError(f"prompt_lengths[{i}]", "must be >= 1", prompt_len)
    for j, gen_len in enumerate(cfg.gen_lengths):
        if gen_len < 0:
            raise ConfigError(f"gen_lengths[{j}]", "must be >= 0", gen_len)
    timing = {"warmup": cfg.warmup, "repeats": cfg.repeats, "device": ctx.device}
    rows: list[dict] = []
    for i, prompt_len in enumerate(cfg.prompt_lengths):
        run = _Runner(ctx.model, policy, bench_tokens(ctx, prompt_len, batch, seed=i), ctx.device,
                      max(cfg.gen_lengths, default=0))
        pre = time_fn(run.prefill, setup=run.reset, **timing)
        for gen_len in cfg.gen_lengths:
            row = {"prompt_len": prompt_len, "gen_len": gen_len, "batch_size": batch, "policy": policy.label,
                   "warmup": cfg.warmup, "repeats": cfg.repeats,
                   "prefill_median_s": pre.median_s, "prefill_p10_s": pre.p10_s, "prefill_p90_s": pre.p90_s,
                   "prefill_tokens_per_s": batch * prompt_len / pre.median_s if pre.median_s > 0 else None,
                   "decode_ms_per_token": None, "decode_p10_ms_per_token": None,
                   "decode_p90_ms_per_token": None, "decode_tokens_per_s": None}
            if gen_len > 0:
                run.steps = gen_len
                dec = time_fn(run.decode, setup=run.prefilled, **timing)
                ms = 1000.0 * dec.median_s / gen_len
                row.update(decode_ms_per_token=ms, decode_p10_ms_per_token=1000.0 * dec.p10_s / gen_len,
                           decode_p90_ms_per_token=1000.0 * dec.p90_s / gen_len,
                           decode_tokens_per_s=1000.0 * batch / ms if ms > 0 else None)
            report = run.runtime.report()
            row.update(kv_bytes_per_token=report.bytes_per_token, kv_bytes_allocated=report.bytes_allocated)
            rows.append(row)
    return rows
