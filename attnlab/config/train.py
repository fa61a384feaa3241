"""Typed spec of a training run (optimizer, schedule, evaluation, checkpointing, precision)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from attnlab.config.base import StrictModel


class TrainConfig(StrictModel):
    steps: int = Field(gt=0, description="optimizer steps")
    batch_size: int = Field(8, gt=0, description="sequences per micro-batch per rank")
    seq_len: int | None = Field(None, gt=0, description="training sequence length; default model.block_size")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine floor as a fraction of lr")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    decay_norms_and_embeddings: bool = False
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.95], min_length=2, max_length=2)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; null disables")
    seed: int = 1337
    eval_every: int = Field(100, gt=0)
    eval_batches: int = Field(8, gt=0)
    log_every: int = Field(10, gt=0)
    save_every: int | None = Field(None, gt=0, description="checkpoint period; default eval_every")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = False
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss or grad norm: stop the run (keeping the last good checkpoints) "
                            "or skip that step (no optimizer update) and log it")
    tracking: Literal["none", "tensorboard"] = Field(
        "none", description="tensorboard: rank 0 also writes train/eval scalars to <run_dir>/tensorboard/ "
                            "(needs the tensorboard package)")
    max_nonfinite_skips: int = Field(
        10, ge=0, description="with on_nonfinite: skip, stop after more than this many consecutive skipped steps")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        return self

    @property
    def checkpoint_every(self) -> int:
        return self.save_every if self.save_every is not None else self.eval_every
