"""One optimizer step: forward under autocast, cross-entropy, accumulate, clip, check that the
loss and gradient norm are finite, step (or, when they are not, leave the weights alone)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from attnlab.errors import AttnlabError
from attnlab.train.distributed import ParallelModel, all_reduce_sum
from attnlab.train.objectives import LanguageModeling, lm_loss  # noqa: F401 - lm_loss re-exported

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids (B, T), targets (B, T)), int64


def autocast_factory(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CUDA for ``auto``/``bf16``; bf16 on CPU only when asked; fp32 otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class NonFiniteError(AttnlabError):
    """Training produced a NaN/inf loss or gradient norm (the run stopped; checkpoints kept)."""


@dataclass
class StepStats:
    loss: torch.Tensor       # () mean loss over this rank's micro-batches, detached
    grad_norm: torch.Tensor  # () global grad norm before clipping
    finite: bool = True      # False: loss or grad norm was NaN/inf on some rank; no update was made


def train_step(model: ParallelModel, optimizer: torch.optim.Optimizer, micro_batches: Sequence[Batch], *,
               lr: float, grad_clip: float | None,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
               objective: Callable = LanguageModeling()) -> StepStats:
    """Accumulate gradients of ``objective`` over ``micro_batches`` (each loss scaled by 1/len;
    DDP syncs on the last one only), clip to ``grad_clip`` (None: measure only), step at ``lr``,
    zero grads. When the loss or the gradient norm is NaN/inf on any rank (ranks agree: the flag
    is summed over them) the optimizer does not step and ``finite`` is False; the caller decides
    whether to stop or skip. The check costs one host sync per step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    num_micro = len(micro_batches)
    total = None
    for i, (x, y) in enumerate(micro_batches):
        with model.sync_context(sync=i == num_micro - 1):
            with autocast():
                loss = objective(model.module, x, y) / num_micro
            loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    max_norm = grad_clip if grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.raw.parameters() if p.requires_grad], max_norm)
    bad = (~torch.isfinite(total) | ~torch.isfinite(grad_norm)).float().reshape(1)
    finite = not bool(all_reduce_sum(bad).item())
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss=total, grad_norm=grad_norm.detach(), finite=finite)
