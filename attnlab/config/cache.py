"""Typed cache policy section of a manifest (what `--cache-policy` says on the command line)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from attnlab.config.base import StrictModel

Format = Literal["fp64", "fp32", "fp16", "bf16", "q8_0", "q4_0", "nf4"]


class CacheConfig(StrictModel):
    """Storage format per cache field (``k`` for standard/bottleneck layers; ``k_sem``, ``k_geo``
    for DBA layers; ``v`` for all), ``default`` for fields not named (null: the model's dtype),
    ``tail`` newest tokens also kept at full precision, ``rollback`` tokens that ``truncate`` may
    undo while that tail stays exact. Geometric keys are stored after RoPE."""

    default: Format | None = None
    k: Format | None = None
    k_sem: Format | None = None
    k_geo: Format | None = None
    v: Format | None = None
    tail: int = Field(0, ge=0)
    rollback: int = Field(64, ge=0)

    def policy_text(self) -> str:
        """The equivalent ``--cache-policy`` string."""
        parts = [self.default] if self.default else []
        parts += [f"{name}={getattr(self, name)}" for name in ("k", "k_sem", "k_geo", "v") if getattr(self, name)]
        parts += [f"tail={self.tail}"] if self.tail else []
        parts += [f"rollback={self.rollback}"] if self.rollback != 64 else []
        return ",".join(parts)
