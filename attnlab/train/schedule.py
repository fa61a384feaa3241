"""Learning-rate schedule: linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio``."""

from __future__ import annotations

import math

from attnlab.config.train import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based; ``steps`` steps are taken, 0..steps-1).

    Warmup: ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (the first step
    already moves; step ``warmup_steps - 1`` reaches ``lr``). Then cosine from ``lr`` at
    ``step == warmup_steps`` to ``lr * min_lr_ratio`` at ``step == steps``; held there beyond.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    span = cfg.steps - cfg.warmup_steps
    progress = 1.0 if span <= 0 else min(1.0, (step - cfg.warmup_steps) / span)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
