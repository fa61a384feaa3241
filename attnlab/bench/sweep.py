"""Context sweep: for each length, chunked prefill of held-out tokens into a fresh decode runtime
(its cache allocated once for the length plus the decode steps), the teacher-forced loss of the
last chunk, the time of the prefill and of its last chunk, and decode step latency at that
context (``runtime.step``: CUDA-graph replays on CUDA, the graph captured by an untimed warm-up
step). Any failure at a point (out of memory, ...) is recorded as a row with ``ok=False`` and
the sweep goes on with the next length."""

from __future__ import annotations

import gc
import math
import statistics
import time

import torch
import torch.nn.functional as F

from attnlab.bench.context import BenchContext
from attnlab.bench.latency import (
    bench_tokens,
    chunk_size,
    greedy_next,
    resolve_policy,
    sync,
    warm_up_step,
)
from attnlab.cache import CachePolicy
from attnlab.config.bench import ContextSweepBench
from attnlab.errors import ConfigError
from attnlab.infer.runtime import DecodeRuntime

_MEASURES = ("prefill_s", "prefill_tokens_per_s", "last_chunk_tokens", "last_chunk_ms", "last_chunk_loss",
             "last_chunk_ppl", "decode_ms", "kv_bytes_per_token", "kv_bytes_allocated", "peak_device_bytes")


def sweep_point(model, policy: CachePolicy, ids: torch.Tensor, chunk: int, decode_tokens: int,
                device: torch.device) -> dict:
    """Measure one length. ``ids`` is (1, length + 1): the first ``length`` tokens are prefilled,
    the last one is the target of the final prediction."""
    length = ids.shape[1] - 1
    cuda = device.type == "cuda"
    if cuda:
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    runtime = DecodeRuntime(model, policy, batch=1, max_length=length + decode_tokens)
    last_start = ((length - 1) // chunk) * chunk
    sync(device)
    t0 = time.perf_counter()
    for start in range(0, last_start, chunk):
        runtime.forward(ids[:, start: start + chunk])
    sync(device)
    t1 = time.perf_counter()
    logits = runtime.forward(ids[:, last_start: length])  # (1, t_last, V)
    sync(device)
    t2 = time.perf_counter()
    loss = F.cross_entropy(logits[0].float(), ids[0, last_start + 1: length + 1]).item()
    report = runtime.report()

    steps = []
    token = greedy_next(logits)
    if decode_tokens:
        warm_up_step(runtime, token)  # graph capture and kernel compiles, untimed
    for _ in range(decode_tokens):
        sync(device)
        t = time.perf_counter()
        token = greedy_next(runtime.step(token))
        sync(device)
        steps.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    return {"prefill_s": t2 - t0, "prefill_tokens_per_s": length / (t2 - t0) if t2 > t0 else None,
            "last_chunk_tokens": length - last_start, "last_chunk_ms": 1000.0 * (t2 - t1),
            "last_chunk_loss": loss, "last_chunk_ppl": math.exp(min(loss, 700.0)),
            "decode_ms": 1000.0 * statistics.median(steps) if steps else None,
            "kv_bytes_per_token": report.bytes_per_token, "kv_bytes_allocated": report.bytes_allocated,
            "peak_device_bytes": peak}


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")[:300]


@torch.no_grad()
def run_context_sweep(cfg: ContextSweepBench, ctx: BenchContext) -> list[dict]:
    """One row per length: ``length, chunk, policy, ok, error`` (one line, None when ok) and
    ``prefill_s`` (total chunked prefill), ``prefill_tokens_per_s``, ``last_chunk_tokens``,
    ``last_chunk_ms`` (forward of the last chunk), ``last_chunk_loss`` (mean next-token NLL over
    the last chunk's predictions, nats) and ``last_chunk_ppl``, ``decode_ms`` (median of
    ``decode_tokens`` greedy single-token steps after the prefill), ``kv_bytes_per_token``
    (analytic), ``kv_bytes_allocated`` (the runtime's preallocated cache: bytes_per_token x
    (length + decode_tokens) + tail ring), ``peak_device_bytes`` (CUDA peak
    increase over the point; None on CPU). Failed points have None measurements."""
    model = ctx.model
    chunk = chunk_size(model, cfg.chunk)
    policy = resolve_policy(cfg.policy, ctx)
    for i, length in enumerate(cfg.lengths):
        if length < 1:
            raise ConfigError(f"lengths[{i}]", "must be >= 1", length)
    rows = []
    for length in cfg.lengths:
        row = {"length": length, "chunk": chunk, "policy": policy.label, "ok": True, "error": None}
        row.update(dict.fromkeys(_MEASURES))
        try:
            ids = bench_tokens(ctx, length + 1, 1)
            row.update(sweep_point(model, policy, ids, chunk, cfg.decode_tokens, ctx.device))
        except Exception as err:  # noqa: BLE001 -- OOM, RuntimeError, MemoryError, ...: record, go on
            row.update(ok=False, error=_one_line(err))
        ids = None
        if not row["ok"]:
            gc.collect()  # the exception and its frames (holding the cache) are gone: free memory
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    return rows
