"""Cache policies: which storage format each cache field uses, plus an optional full-precision
tail of the newest tokens.

Text form (CLI ``--cache-policy``): ``k_sem=q4_0,k_geo=q8_0,v=q4_0,tail=128``. A bare format sets
every field not named explicitly (``q8_0`` or ``q4_0,k_geo=q8_0``). Mapping form (manifests):
``{k_sem: q4_0, k_geo: q8_0, v: q4_0, tail: 128}`` or ``{default: q8_0}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attnlab.config.attention import AttentionDims
from attnlab.config.variants import known_field_names, stored_fields
from attnlab.errors import ConfigError
from attnlab.quant.formats import FORMATS


@dataclass(frozen=True)
class CachePolicy:
    """``formats``: field -> format for named fields; ``default``: the rest (None = the model's
    own dtype, i.e. exact); ``tail``: newest tokens additionally kept at full precision and read
    from there; ``rollback``: how many tokens ``truncate`` may undo while keeping that tail exact."""

    formats: dict[str, str] = field(default_factory=dict)
    default: str | None = None
    tail: int = 0
    rollback: int = 64

    def __post_init__(self):
        known = known_field_names()  # of every registered attention variant
        for name, fmt in self.formats.items():
            if name not in known:
                raise ConfigError("cache_policy", f"unknown cache field {name!r} (fields: {', '.join(sorted(known))})",
                                  show_value=False)
            _check_format(fmt, name)
        if self.default is not None:
            _check_format(self.default, "default")
        if self.tail < 0 or self.rollback < 0:
            raise ConfigError("cache_policy", "tail and rollback must be >= 0", (self.tail, self.rollback))

    @classmethod
    def parse(cls, text: str | dict | None) -> "CachePolicy":
        if text is None:
            return cls()
        if isinstance(text, CachePolicy):
            return text
        items = text.items() if isinstance(text, dict) else _split(text)
        formats, default, extra = {}, None, {}
        for key, value in items:
            if key in ("tail", "rollback"):
                try:
                    extra[key] = int(value)
                except (TypeError, ValueError):
                    raise ConfigError(f"cache_policy.{key}", "expected an integer", value) from None
            elif key in (None, "default", "*"):
                default = str(value)
            else:
                formats[key] = str(value)
        return cls(formats, default, **extra)

    def format_for(self, name: str, native: str) -> str:
        return self.formats.get(name, self.default or native)

    def check_fields(self, dims: list[AttentionDims]) -> None:
        """A policy may only name fields some attention layer stores (hybrid stacks mix
        ``k`` layers with ``k_sem``/``k_geo`` layers)."""
        have = stored_fields(dims)
        for name in self.formats:
            if name not in have:
                aliased = sorted({d.value_alias for d in dims if name == "v" and d.value_alias})
                why = f"; values are read from {', '.join(aliased)}" if aliased else ""
                raise ConfigError("cache_policy", f"field {name!r} does not exist for this attention "
                                  f"(its cache fields are {', '.join(sorted(have))}{why})", show_value=False)

    @property
    def label(self) -> str:
        parts = ([self.default] if self.default else []) + [f"{k}={v}" for k, v in self.formats.items()]
        if self.tail:
            parts.append(f"tail={self.tail}")
        return ",".join(parts) or "native"


def _check_format(fmt: str, where: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"cache_policy.{where}", f"unknown format (formats: {', '.join(FORMATS)})", fmt)


def _split(text: str):
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" in part:
            key, value = (s.strip() for s in part.split("=", 1))
            yield key, value
        else:
            yield None, part


def native_format(dtype) -> str:
    import torch

    return {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16",
            torch.bfloat16: "bf16"}.get(dtype, "fp32")
