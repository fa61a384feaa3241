"""Typed sections of upcycling runs: the surgery plan and the distillation objective."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from attnlab.config.base import StrictModel

from attnlab.config.attention import PartnerRule

RunMode = Literal["train", "import", "upcycle", "blockwise", "finetune", "retrofit"]


class RetrofitConfig(StrictModel):
    """A zero-training retrofit of the teacher's attention (``mode: retrofit``); Butterfly: the
    chosen standard layers become window + block-summary attention with the same weights
    (``attnlab.convert.butterfly``)."""

    kind: Literal["butterfly"] = "butterfly"
    layers: str | list[int] = Field("all", description="all, every:K, or a list of layer indices")
    window: int = Field(64, gt=0)
    block_size: int = Field(128, gt=0)
    partner: PartnerRule = "causal_shift"
    stage_by: Literal["layer", "swapped"] = "layer"
    num_stages: int | None = Field(None, gt=0)

    def options(self) -> dict:
        """Keyword arguments of ``convert.butterfly.retrofit_butterfly``."""
        return self.model_dump(exclude={"kind"})


class SurgeryConfig(StrictModel):
    """Standard -> DBA attention surgery (``mode: upcycle``); see ``attnlab.convert.surgery``."""

    sem_head_dim: int = Field(gt=0, description="per-head semantic (no RoPE) dim")
    geo_pairs: int = Field(gt=0, description="teacher rotary pairs kept exactly per kv head")
    v_rank: int | None = Field(None, gt=0, description="per-head value rank; null copies V/O")
    method: Literal["rope_aware", "independent_svd"] = "rope_aware"
    pair_score: Literal["positional", "energy"] = "positional"
    sem_target: Literal["mean_rotation", "zero_rotation"] = "mean_rotation"
    context: int | None = Field(None, gt=0, description="window the rotation averages use; default: calibration length")
    calibration_batches: int = Field(4, ge=0, description="training-split batches whose activations weight the factorization")

    def plan(self):
        from attnlab.convert.surgery import SurgeryPlan

        return SurgeryPlan(self.sem_head_dim, self.geo_pairs, self.v_rank, self.method, self.pair_score,
                           self.sem_target, self.context)


class DistillConfig(StrictModel):
    """``mode: finetune``: ce_weight * cross-entropy + kl_weight * T^2 * KL(teacher || student).
    (``mode: blockwise`` matches attention outputs layer by layer and ignores these weights.)"""

    ce_weight: float = Field(1.0, ge=0)
    kl_weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)


class TeacherSamples(StrictModel):
    """``data.source: teacher``: sequences sampled from the run's teacher (no tokenizer needed)."""

    sequences: int = Field(256, gt=0)
    length: int | None = Field(None, gt=0, description="tokens per sequence; default the teacher's block_size")
    temperature: float = Field(1.0, gt=0)
    seed: int = 0
    bos_id: int = Field(1, ge=0, description="first token of every sequence (llama2.c BOS = 1)")
