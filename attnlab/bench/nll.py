"""Held-out negative log-likelihood: by full forward, and by cached decode under a cache policy
(every token goes through a ``DecodeRuntime`` one step at a time, so attention reads the stored —
possibly quantized — keys and values exactly as generation does). The measurement only; the
``perplexity`` benchmark (``bench.perplexity``) compares policies with it (``bench.kv_policies``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from attnlab.cache import CachePolicy
from attnlab.infer.runtime import DecodeRuntime

__all__ = ["NLLResult", "eval_windows", "forward_nll", "cached_decode_nll"]


@dataclass
class NLLResult:
    nll: float           # mean nats per predicted token
    tokens: int
    windows: int
    window_nll: list[float] = field(default_factory=list)  # mean nats per token of each window (intervals)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def eval_windows(tokens: np.ndarray, seq_len: int, num_windows: int, align: int = 1) -> torch.Tensor:
    """(N, seq_len + 1) evenly spaced windows over a 1-D token array (deterministic); with
    ``align`` > 1 (fixed-length documents) each starts at a document start."""
    if align > 1:
        seq_len = min(seq_len, align - 1)
    span = seq_len + 1
    if len(tokens) < span:
        raise ValueError(f"{len(tokens)} held-out tokens are fewer than one window of {span}")
    count = min(num_windows, len(tokens) // span)
    starts = np.linspace(0, len(tokens) - span, count).astype(np.int64)
    if align > 1:
        starts = np.unique(starts // align * align)
    return torch.from_numpy(np.stack([np.asarray(tokens[s: s + span], dtype=np.int64) for s in starts]))


@torch.no_grad()
def forward_nll(model, windows: torch.Tensor, batch_size: int = 8) -> NLLResult:
    device = next(model.parameters()).device
    per_window = []
    for i in range(0, len(windows), batch_size):
        w = windows[i: i + batch_size].to(device)
        logits = model(w[:, :-1]).float()
        per_window.append(F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none").double().sum(1))
    sums = torch.cat(per_window)
    tokens_per_window = windows.shape[1] - 1
    count = tokens_per_window * len(windows)
    return NLLResult(sums.sum().item() / count, count, len(windows), (sums / tokens_per_window).tolist())


@torch.no_grad()
def cached_decode_nll(model, windows: torch.Tensor, policy: CachePolicy | str | None,
                      batch_size: int = 8, prefill: int = 1) -> tuple[NLLResult, DecodeRuntime]:
    """NLL when the first ``prefill`` tokens of each window are prefilled (``runtime.forward``)
    and every later token is fed one ``runtime.step`` at a time, through a runtime under
    ``policy`` sized to the window. Returns the last batch's runtime too (for byte accounting)."""
    device = next(model.parameters()).device
    length = windows.shape[1] - 1
    per_window, runtime = [], None
    for i in range(0, len(windows), batch_size):
        w = windows[i: i + batch_size].to(device)
        if runtime is None or runtime.batch != len(w):
            runtime = None  # free the previous cache first
            runtime = DecodeRuntime(model, policy, batch=len(w), max_length=length)
        else:
            runtime.reset()
        logits = runtime.forward(w[:, :prefill]).float()
        total = F.cross_entropy(logits.transpose(1, 2), w[:, 1: prefill + 1], reduction="none").double().sum(1)
        for t in range(prefill, length):
            # consumed before the next step (the step's logits buffer is reused)
            total = total + F.cross_entropy(runtime.step(w[:, t]).float(), w[:, t + 1], reduction="none").double()
        per_window.append(total)
    sums = torch.cat(per_window)
    count = length * len(windows)
    return NLLResult(sums.sum().item() / count, count, len(windows), (sums / length).tolist()), runtime
