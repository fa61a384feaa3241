"""Cached generation: chunked prefill of a right-padded batch, then one token per sequence per
decode step. ``generate_uncached`` (``infer/reference.py``) is the obviously-right reference.

Positions: the cache continues each sequence past ``block_size`` (RoPE positions keep growing);
only a single forward is limited to ``block_size`` tokens, so long prompts go in chunks. The
uncached reference instead slides a ``block_size`` window, so the two agree while
``len(prompt) + max_new_tokens <= block_size``.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attnlab.cache import CachePolicy, CacheReport, ModelCache
from attnlab.errors import InputError
from attnlab.infer.sampling import SamplingConfig, select_next

GREEDY = SamplingConfig(0.0)
PAD_ID = 0  # fed by finished sequences and as right padding; never read back (beyond each length)


# ---------------------------------------------------------------- validation
def check_prompts(model, prompts) -> list[list[int]]:
    """``prompts`` as a list of non-empty lists of in-vocab ints, else a one-line InputError."""
    if not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)) or not prompts:
        raise InputError("prompts: expected a non-empty list of token-id lists")
    if not isinstance(prompts[0], (Sequence, torch.Tensor)) or isinstance(prompts[0], (str, bytes)):
        raise InputError("prompts: expected a list of token-id lists (wrap a single prompt as [prompt])")
    vocab = model.config.vocab_size
    out = []
    for i, prompt in enumerate(prompts):
        ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        if not ids:
            raise InputError(f"prompt {i} is empty: a prompt needs at least one token")
        try:
            ids = [operator.index(t) for t in ids]  # ints, numpy ints; not floats or strings
        except TypeError:
            raise InputError(f"prompt {i}: token ids must be integers, got {ids[:8]!r}") from None
        for t in ids:
            if not 0 <= t < vocab:
                raise InputError(f"prompt {i}: token id {t} is outside the model's vocab (size {vocab})")
        out.append(ids)
    return out


def check_chunk_size(model, chunk_size: int | None) -> int:
    block = model.config.block_size
    chunk = block if chunk_size is None else chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= block:
        raise InputError(f"prefill chunk size must lie in 1..block_size ({block}), got {chunk_size!r}")
    return chunk


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- prefill
@torch.no_grad()
def prefill(model, cache: ModelCache, prompts: list[list[int]], chunk_size: int | None = None) -> torch.Tensor:
    """Feed ``prompts`` (of different lengths) into ``cache`` in chunks of ``chunk_size`` tokens
    (default ``block_size``); returns the logits after each prompt's last token, (B, V).

    Each chunk is right padded; sequence b's real count in the chunk starting at ``s`` is
    ``clamp(len_b - s, 0, chunk)``. Padding is written past each sequence's length and never
    read (later tokens overwrite it). The cache may already hold tokens: prompts continue them."""
    prompts = check_prompts(model, prompts)
    chunk = check_chunk_size(model, chunk_size)
    if cache.batch != len(prompts):
        raise InputError(f"cache holds {cache.batch} sequences, got {len(prompts)} prompts")
    device = model_device(model)
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    padded = torch.full((len(prompts), longest), PAD_ID, dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = torch.tensor(p, dtype=torch.long)
    padded = padded.to(device)
    last = [None] * len(prompts)
    for start in range(0, longest, chunk):
        width = min(chunk, longest - start)
        valid = [min(max(n - start, 0), width) for n in lengths]
        logits = model(padded[:, start: start + width], cache=cache, valid=valid)  # (B, width, V)
        for b, n in enumerate(lengths):
            if start < n <= start + width:  # this chunk holds prompt b's last token
                last[b] = logits[b, n - 1 - start]
    return torch.stack(last)  # (B, V)


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
    cache: ModelCache | None = None  # with keep_cache=True


# ---------------------------------------------------------------- generate
@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig = GREEDY,
             *, cache_policy: CachePolicy | str | dict | None = None, seed: int | None = None,
             stop_ids: Sequence[int] = (), prefill_chunk: int | None = None,
             keep_cache: bool = False) -> GenerationResult:
    """Batched cached generation: chunked prefill, then a decode loop feeding one token per
    sequence. A sequence stops after emitting one of ``stop_ids`` (kept in its output) or after
    ``max_new_tokens``; finished sequences keep feeding a pad token whose outputs are ignored,
    until every sequence is done.

    Determinism: sampling draws from one ``torch.Generator`` on the model's device, seeded with
    ``seed``. Greedy output is the same batched or one prompt at a time; sampled output is
    reproducible for the same seed *and* batch, but a batched run draws all rows from the shared
    generator at each step, so its samples differ from running the prompts one by one."""
    prompts = check_prompts(model, prompts)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    stop = {int(t) for t in stop_ids}
    device = model_device(model)
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    batch = len(prompts)
    cache = ModelCache.for_model(model, cache_policy, batch=batch)

    device_sync(device)
    t0 = time.perf_counter()
    logits = prefill(model, cache, prompts, prefill_chunk)
    device_sync(device)
    t1 = time.perf_counter()

    out: list[list[int]] = [[] for _ in range(batch)]
    done = [max_new_tokens == 0] * batch
    steps = 0
    while True:
        nxt = select_next(logits, sampling, generator).tolist()  # (B,): one host sync per step
        for b, t in enumerate(nxt):
            if not done[b]:
                out[b].append(t)
                done[b] = t in stop or len(out[b]) >= max_new_tokens
        if all(done):
            break
        feed = torch.tensor([[PAD_ID if d else t] for t, d in zip(nxt, done)], device=device)  # (B, 1)
        logits = model(feed, cache=cache)[:, -1]
        steps += 1
    device_sync(device)
    t2 = time.perf_counter()

    new_tokens = sum(len(o) for o in out)
    stats = GenerationStats(batch=batch, prompt_tokens=sum(len(p) for p in prompts), new_tokens=new_tokens,
                            prefill_seconds=t1 - t0, decode_seconds=t2 - t1, decode_steps=steps,
                            decode_tokens=new_tokens - sum(1 for o in out if o), cache=cache.report())
    return GenerationResult(out, stats, cache if keep_cache else None)
