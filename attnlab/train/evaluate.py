"""Held-out evaluation: mean next-token loss over fixed validation windows, and perplexity."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from attnlab.train.distributed import DistInfo, all_reduce_sum
from attnlab.train.step import Batch, lm_loss


@dataclass(frozen=True)
class EvalResult:
    loss: float
    ppl: float


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


class Evaluator:
    """Mean loss of ``model`` over ``batches`` (the same windows every call). Ranks split the
    batches and sum their losses, so every rank gets the same result."""

    def __init__(self, batches: Sequence[Batch], device: torch.device, info: DistInfo = DistInfo(),
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        if not batches:
            raise ValueError("evaluation needs at least one batch")
        self.batches = list(batches)
        self.device, self.info, self.autocast = device, info, autocast

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> EvalResult:
        was_training = model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, count)
        for x, y in self.batches[self.info.rank::self.info.world_size]:
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast():
                logits = model(x)  # (B, T, V)
            total[0] += lm_loss(logits, y).double()
            total[1] += 1
        model.train(was_training)
        loss_sum, count = all_reduce_sum(total).tolist()
        loss = loss_sum / count
        return EvalResult(loss=loss, ppl=perplexity(loss))
