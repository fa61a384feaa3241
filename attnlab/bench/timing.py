"""Timing with warmup, repeats, device synchronization (CUDA events on GPU), medians and spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass
class Timing:
    median_s: float
    p10_s: float
    p90_s: float
    mean_s: float
    std_s: float
    repeats: int

    def to_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def time_fn(fn: Callable[[], object], *, warmup: int, repeats: int, device: torch.device,
            setup: Callable[[], object] | None = None) -> Timing:
    """Run ``setup`` (untimed) then ``fn`` (timed) ``warmup + repeats`` times; keep the last
    ``repeats``. On CUDA each run is bracketed by events and synchronized; on CPU by
    ``perf_counter``."""
    samples = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
        if i >= warmup:
            samples.append(elapsed)
    return summarize(samples)


def summarize(samples: list[float]) -> Timing:
    ordered = sorted(samples)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return Timing(statistics.median(ordered), pct(0.1), pct(0.9), statistics.fmean(ordered),
                  statistics.pstdev(ordered) if len(ordered) > 1 else 0.0, len(ordered))
