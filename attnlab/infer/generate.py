"""Cached generation through the decode runtime: chunked prefill of a right-padded batch, then
one token per sequence per decode step (CUDA-graph replays on CUDA), with sampling and stop
checks on the device. ``generate_uncached`` (``infer/reference.py``) is the obviously-right
reference.

Positions: the cache continues each sequence past ``block_size`` (RoPE positions keep growing);
only a single forward is limited to ``block_size`` tokens, so long prompts go in chunks. The
uncached reference instead slides a ``block_size`` window, so the two agree while
``len(prompt) + max_new_tokens <= block_size``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attnlab.cache import CachePolicy, CacheReport
from attnlab.errors import InputError
from attnlab.infer.inputs import PAD_ID, check_chunk_size, check_prompts  # noqa: F401  (re-exported)
from attnlab.infer.runtime import DecodeRuntime
from attnlab.infer.sampling import SamplingConfig, select_next

GREEDY = SamplingConfig(0.0)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- results
@dataclass
class GenerationStats:
    """Timings and cache accounting of one ``generate`` call. ``decode_steps`` counts decode
    forwards (one token per sequence each); the first new token comes from the prefill logits."""

    batch: int
    prompt_tokens: int
    new_tokens: int              # real new tokens over the batch (stop tokens included)
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    decode_tokens: int           # real tokens produced by the decode steps (new_tokens - first tokens)
    cache: CacheReport

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        """Throughput over the batch (real tokens only)."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def decode_ms_per_token(self) -> float:
        """Latency of one decode step, i.e. per new token of each sequence."""
        return 1000 * self.decode_seconds / self.decode_steps if self.decode_steps else float("nan")

    def summary(self, policy: str | None = None) -> str:
        """One line for logs / the CLI's stderr."""
        return (f"prefill {self.prompt_tokens} tokens: {self.prefill_tokens_per_s:,.0f} tok/s | decode "
                f"{self.new_tokens} tokens: {self.decode_ms_per_token:.2f} ms/token, "
                f"{self.decode_tokens_per_s:,.0f} tok/s | {format_cache(self.cache, policy)}")


def format_cache(report: CacheReport, policy: str | None = None) -> str:
    where = f"KV cache ({policy})" if policy else "KV cache"
    return f"{where}: {report.bytes_per_token:,} B/token analytic, {report.bytes_allocated:,} B allocated"


@dataclass
class GenerationResult:
    tokens: list[list[int]]      # new ids per prompt (a final stop id included)
    stats: GenerationStats
    runtime: DecodeRuntime | None = None  # with keep_cache=True


# ---------------------------------------------------------------- generate
def check_max_new_tokens(max_new_tokens) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    return max_new_tokens


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig = GREEDY,
             *, cache_policy: CachePolicy | str | dict | None = None, seed: int | None = None,
             stop_ids: Sequence[int] = (), prefill_chunk: int | None = None,
             keep_cache: bool = False, runtime: DecodeRuntime | None = None,
             stop_check_every: int | None = None) -> GenerationResult:
    """Batched cached generation: chunked prefill, then a decode loop feeding one token per
    sequence. A sequence stops after emitting one of ``stop_ids`` (kept in its output) or after
    ``max_new_tokens``; finished sequences keep feeding a pad token whose outputs are ignored,
    until every sequence is done.

    ``runtime``: decode in this runtime (its batch must match; it is reset first); by default one
    is built for the prompts plus ``max_new_tokens``. Tokens, the finished mask and sampling stay
    on the device; the host looks at them only every ``stop_check_every`` steps (default: every
    step on the CPU, every 8 on CUDA; only when there are stop ids) and once at the end.

    Determinism: sampling draws from one ``torch.Generator`` on the model's device, seeded with
    ``seed``. Greedy output is the same batched or one prompt at a time; sampled output is
    reproducible for the same seed *and* batch, but a batched run draws all rows from the shared
    generator at each step, so its samples differ from running the prompts one by one."""
    prompts = check_prompts(model, prompts)
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    device = model_device(model)
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    batch = len(prompts)
    if runtime is None:
        runtime = DecodeRuntime(model, cache_policy, batch=batch,
                                max_length=max(len(p) for p in prompts) + max(max_new_tokens, 1))
    elif runtime.batch != batch:
        raise InputError(f"the runtime was built for {runtime.batch} sequences, got {batch} prompts")
    else:
        runtime.reset()
    every = stop_check_every or (8 if device.type == "cuda" else 1)
    stops = torch.tensor(sorted({int(t) for t in stop_ids}), dtype=torch.long, device=device)

    device_sync(device)
    t0 = time.perf_counter()
    logits = runtime.prefill(prompts, prefill_chunk)
    device_sync(device)
    t1 = time.perf_counter()

    emitted = []                                               # (B,) device tensors, one per token index
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = 0
    for i in range(max_new_tokens):
        token = select_next(logits, sampling, generator)      # (B,) on the device
        emitted.append(token)
        if stops.numel():
            finished = finished | torch.isin(token, stops)
        if i + 1 >= max_new_tokens or (stops.numel() and (i + 1) % every == 0 and bool(finished.all())):
            break
        logits = runtime.step(torch.where(finished, torch.full_like(token, PAD_ID), token))
        steps += 1
    device_sync(device)
    t2 = time.perf_counter()

    out = _cut_at_stops(torch.stack(emitted, 1).tolist() if emitted else [[] for _ in range(batch)],
                        {int(t) for t in stop_ids})
    new_tokens = sum(len(o) for o in out)
    stats = GenerationStats(batch=batch, prompt_tokens=sum(len(p) for p in prompts), new_tokens=new_tokens,
                            prefill_seconds=t1 - t0, decode_seconds=t2 - t1, decode_steps=steps,
                            decode_tokens=new_tokens - sum(1 for o in out if o), cache=runtime.report())
    return GenerationResult(out, stats, runtime if keep_cache else None)


def _cut_at_stops(rows: list[list[int]], stop: set[int]) -> list[list[int]]:
    """Each row up to and including its first stop id (later entries were fed as padding)."""
    out = []
    for row in rows:
        cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        out.append(row[:cut])
    return out
