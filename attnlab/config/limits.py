"""Size limits checked before anything is built: layer and repeat counts, widths, vocabulary,
context lengths and the parameter count they imply (refused before a module or a list
proportional to them exists).

Configurable per manifest (``defaults.limits``, also as an override
``defaults.limits.max_layers=8192``) and per process through environment variables
``ATTNLAB_MAX_LAYERS``, ``ATTNLAB_MAX_PARAMS``, ... (one per field, upper-cased); the manifest
wins over the environment, the environment over the built-in defaults.
"""

from __future__ import annotations

import math
import os
from typing import Any

from pydantic import Field

from attnlab.config.base import StrictModel
from attnlab.errors import ConfigError


class Limits(StrictModel):
    """Sane maxima; raise them deliberately for a larger model."""

    max_layers: int = Field(4096, gt=0, description="num_layers, or blocks + bare attention/MLP nodes of a topology, expanded")
    max_repeat: int = Field(4096, gt=0, description="one topology repeat.count")
    max_topology_nodes: int = Field(100_000, gt=0, description="topology nodes once repeats are expanded")
    max_width: int = Field(1 << 17, gt=0, description="d_model, d_ff, head counts and (per-head or total) attention dims")
    max_vocab: int = Field(1 << 22, gt=0, description="vocab_size")
    max_context: int = Field(1 << 24, gt=0, description="block_size, seq_len, benchmark lengths and contexts")
    max_params: float = Field(1e12, gt=0, description="parameters the model config implies (estimated analytically)")


_ENV_PREFIX = "ATTNLAB_"


def default_limits() -> Limits:
    """Built-in limits with ``ATTNLAB_MAX_*`` environment overrides applied."""
    values: dict[str, Any] = {}
    for name, info in Limits.model_fields.items():
        raw = os.environ.get(_ENV_PREFIX + name.upper())
        if raw is None or not raw.strip():
            continue
        try:
            number = float(raw) if info.annotation is float else int(float(raw))
        except (ValueError, OverflowError):
            raise ConfigError(_ENV_PREFIX + name.upper(), "expected a number", raw) from None
        values[name] = number
    return Limits.model_validate(values) if values else _BUILTIN


_BUILTIN = Limits()


def limits_from(context: Any) -> Limits:
    """The ``Limits`` in a pydantic validation context (``{"limits": Limits}``), else the defaults."""
    if isinstance(context, dict) and isinstance(context.get("limits"), Limits):
        return context["limits"]
    return default_limits()


def check_count(value: int | None, maximum: int, what: str, knob: str) -> None:
    """``ValueError`` (pydantic turns it into a ConfigError naming the key) when over ``maximum``."""
    if value is not None and value > maximum:
        raise ValueError(f"{what}={value} exceeds the limit of {maximum} (raise defaults.limits.{knob} "
                         f"or {_ENV_PREFIX}{knob.upper()} to allow it)")


def human_count(n: float) -> str:
    if not math.isfinite(n):
        return str(n)
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))
