"""Training objectives: what a step minimizes. ``(model, x, y) -> scalar loss``.

- ``LanguageModeling``: next-token cross-entropy (plain training).
- ``BlockwiseDistillation``: every student attention layer reproduces its teacher layer's output
  on the teacher's own layer input; the teacher runs once per batch (hooks collect every layer's
  input and output), then each student layer runs on its input — all layers train together.
- ``GlobalDistillation``: ``ce_weight`` * cross-entropy + ``kl_weight`` * KL(teacher || student)
  on temperature-scaled next-token distributions.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.nn.context import ForwardContext


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the vocab, in float32. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class LanguageModeling:
    """Next-token cross-entropy. With ``compile`` the loss is compiled too: Inductor then fuses the
    fp32 upcast, log-softmax and NLL over the vocab instead of materializing fp32 logits (on GPT-2
    shapes that unfused loss was a quarter of the step)."""

    def __init__(self, compile: bool = False):
        self.loss = torch.compile(lm_loss, dynamic=False) if compile else lm_loss

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(model(x), y)


@contextmanager
def capture_attention_io(model):
    """Record (input, output) of every attention layer of ``model`` during a forward."""
    records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module, args, output):
        records[module.layer_index] = (args[0].detach(), output.detach())

    handles = [layer.register_forward_hook(hook) for layer in model.attention_layers()]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


class BlockwiseDistillation:
    """Mean over layers of the mean squared error between student and teacher attention outputs,
    normalized by the teacher output's mean square (so layers weigh alike)."""

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher.eval().requires_grad_(False)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), capture_attention_io(self.teacher) as io:
            self.teacher(x)
        ctx = ForwardContext(positions=torch.arange(x.shape[1], device=x.device))
        losses = []
        for layer in model.attention_layers():
            inputs, target = io[layer.layer_index]
            out = layer(inputs.to(next(layer.parameters()).dtype), ctx)
            losses.append((out.float() - target.float()).pow(2).mean() / target.float().pow(2).mean().clamp_min(1e-12))
        return torch.stack(losses).mean()


class GlobalDistillation:
    def __init__(self, teacher: nn.Module, *, ce_weight: float = 1.0, kl_weight: float = 1.0, temperature: float = 1.0):
        self.teacher = teacher.eval().requires_grad_(False)
        self.ce_weight, self.kl_weight, self.temperature = ce_weight, kl_weight, temperature

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        loss = self.ce_weight * lm_loss(logits, y) if self.ce_weight else logits.new_zeros((), dtype=torch.float32)
        if self.kl_weight:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            t = self.temperature
            student_logp = F.log_softmax(logits.float() / t, dim=-1).flatten(0, 1)
            teacher_logp = F.log_softmax(teacher_logits.float() / t, dim=-1).flatten(0, 1)
            kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean")
            loss = loss + self.kl_weight * (t * t) * kl
        return loss
