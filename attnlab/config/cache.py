"""Typed cache policy section of a manifest (what `--cache-policy` says on the command line)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from attnlab.config.base import StrictModel
from attnlab.config.variants import known_field_names

Format = Literal["fp64", "fp32", "fp16", "bf16", "q8_0", "q4_0", "nf4", "fp8_e4m3", "fp8_e5m2"]
_SETTINGS = ("default", "tail", "rollback", "layers")


def _gather(data: Any, settings: tuple[str, ...]) -> Any:
    """Field names written at the top level of a section -> its ``fields`` mapping."""
    if not isinstance(data, dict):
        return data
    named = {k: v for k, v in data.items() if k not in (*settings, "fields")}
    if not named:
        return data
    nested = data.get("fields") or {}
    if not isinstance(nested, dict):
        return data  # the field's own validation reports it
    out = {k: v for k, v in data.items() if k in settings}
    out["fields"] = {**nested, **{k: v for k, v in named.items() if v is not None}}
    return out


def _check_known(value: dict[str, str]) -> dict[str, str]:
    known = known_field_names()
    for name in value:
        if name not in known:
            raise ValueError(f"unknown cache field {name!r} (fields of the registered attention variants: "
                             f"{', '.join(sorted(known))})")
    return value


class CacheLayerOverride(StrictModel):
    """Formats for some attention layers (indices ``layers``), over the section's: fields named at
    the top level (or in ``fields``), ``default`` for every field of those layers."""

    layers: list[int] = Field(min_length=1)
    default: Format | None = None
    fields: dict[str, Format] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _gather_fields(cls, data: Any) -> Any:
        return _gather(data, ("layers", "default"))

    @field_validator("fields", mode="after")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_known(value)

    @field_validator("layers", mode="after")
    @classmethod
    def _check_layers(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value):
            raise ValueError(f"layer indices must be >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _sets_something(self) -> "CacheLayerOverride":
        if self.default is None and not self.fields:
            raise ValueError("an override must set a format (default or a field)")
        return self

    def policy_text(self) -> str:
        parts = ([self.default] if self.default else []) + [f"{k}={v}" for k, v in self.fields.items()]
        return f"layers={','.join(map(str, self.layers))}:{','.join(parts)}"


class CacheConfig(StrictModel):
    """Storage format per cache field, named at the top level of the section (each attention
    variant's fields: ``k`` for standard/bottleneck layers; ``k_sem``, ``k_geo`` for DBA;
    ``c_kv``, ``k_rope`` for MLA; ``v`` for the value field), ``default`` for fields not named
    (null: the model's dtype), ``tail`` newest tokens also kept at full precision, ``rollback``
    tokens that ``truncate`` may undo while that tail stays exact. Rotary keys are stored after
    RoPE. ``fields`` holds the per-field formats (the top-level names are gathered into it)."""

    default: Format | None = None
    fields: dict[str, Format] = Field(default_factory=dict)
    tail: int = Field(0, ge=0)
    rollback: int = Field(64, ge=0)
    layers: list[CacheLayerOverride] = Field(default_factory=list, description="per-layer overrides")

    @model_validator(mode="before")
    @classmethod
    def _gather_fields(cls, data: Any) -> Any:
        return _gather(data, _SETTINGS)

    @field_validator("fields", mode="after")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_known(value)

    @model_serializer(mode="wrap")
    def _flat(self, handler) -> dict:
        data = handler(self)
        flat = {k: v for k, v in data.items() if k != "fields"} | dict(data.get("fields", {}))
        if not flat.get("layers"):
            flat.pop("layers", None)  # no overrides: the section reads as before they existed
        return flat

    def policy_text(self) -> str:
        """The equivalent ``--cache-policy`` string."""
        parts = [self.default] if self.default else []
        parts += [f"{name}={fmt}" for name, fmt in self.fields.items()]
        parts += [f"tail={self.tail}"] if self.tail else []
        parts += [f"rollback={self.rollback}"] if self.rollback != 64 else []
        return ";".join([",".join(parts), *(o.policy_text() for o in self.layers)])
