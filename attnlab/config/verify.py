"""Typed ``verify`` section of a run: agreement with a teacher that must hold, or the run fails."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from attnlab.config.base import StrictModel


class Thresholds(StrictModel):
    max_mean_abs: float | None = Field(None, ge=0)
    max_max_abs: float | None = Field(None, ge=0)
    max_kl: float | None = Field(None, ge=0, description="logits only: mean KL(teacher || student), nats/token")


class VerifyCase(StrictModel):
    """``int_greedy``: greedy continuation's first integer must equal ``answer`` (needs a
    tokenizer). ``choice_logprob``: the choice with the highest log-probability must be
    ``answer``. Prompts and choices as text (run tokenizer) or token ids."""

    id: str
    kind: Literal["int_greedy", "choice_logprob"]
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    answer: int | str
    choices: list[str] | None = None
    choice_ids: list[list[int]] | None = None
    max_new_tokens: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "VerifyCase":
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("give exactly one of 'prompt' or 'prompt_ids'")
        if self.kind == "choice_logprob" and (self.choices is None) == (self.choice_ids is None):
            raise ValueError("choice_logprob needs exactly one of 'choices' or 'choice_ids'")
        return self


class VerifyConfig(StrictModel):
    batches: int = Field(2, gt=0, description="held-out batches compared")
    batch_size: int = Field(4, gt=0)
    seq_len: int | None = Field(None, gt=0)
    attention: Thresholds | None = None
    logits: Thresholds | None = None
    cases: list[VerifyCase] = Field(default_factory=list)
    min_accuracy: float | None = Field(None, ge=0, le=1)
    max_accuracy_drop: float | None = Field(None, ge=0, le=1)
