"""Cache policies: which storage format each cache field uses, plus an optional full-precision
tail of the newest tokens.

Text form (CLI ``--cache-policy``): ``k_sem=q4_0,k_geo=q8_0,v=q4_0,tail=128``. A bare format sets
every field not named explicitly (``q8_0`` or ``q4_0,k_geo=q8_0``). Mapping form (manifests):
``{k_sem: q4_0, k_geo: q8_0, v: q4_0, tail: 128}`` or ``{default: q8_0}``.

Per-layer overrides follow the base after ``;``: ``k_sem=q4_0,v=q4_0;layers=0,21:k_sem=q8_0,v=q8_0``
keeps layers 0 and 21 more precise (``layers=0-3:fp16`` takes a range; a later override wins where
two name the same layer). Mapping form: ``{k_sem: q4_0, layers: [{layers: [0, 21], k_sem: q8_0}]}``.
Layer indices count attention layers and are checked against the model (``check_fields``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attnlab.config.attention import AttentionDims
from attnlab.config.variants import known_field_names, stored_fields
from attnlab.errors import ConfigError
from attnlab.quant.formats import FORMATS


@dataclass(frozen=True)
class LayerOverride:
    """Formats for the attention layers ``layers`` (indices), over the base policy's."""

    layers: tuple[int, ...]
    formats: dict[str, str] = field(default_factory=dict)
    default: str | None = None

    @property
    def label(self) -> str:
        parts = ([self.default] if self.default else []) + [f"{k}={v}" for k, v in self.formats.items()]
        return f"layers={','.join(map(str, self.layers))}:{','.join(parts)}"


@dataclass(frozen=True)
class CachePolicy:
    """``formats``: field -> format for named fields; ``default``: the rest (None = the model's
    own dtype, i.e. exact); ``tail``: newest tokens additionally kept at full precision and read
    from there; ``rollback``: how many tokens ``truncate`` may undo while keeping that tail exact."""

    formats: dict[str, str] = field(default_factory=dict)
    default: str | None = None
    tail: int = 0
    rollback: int = 64
    layers: tuple[LayerOverride, ...] = ()

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
        for override in self.layers:
            if not override.layers or any(not isinstance(i, int) or i < 0 for i in override.layers):
                raise ConfigError("cache_policy.layers", "each override needs layer indices >= 0", override.layers)
            if not override.formats and override.default is None:
                raise ConfigError("cache_policy.layers", "an override must set a format", override.label)
            for name, fmt in override.formats.items():
                if name not in known:
                    raise ConfigError("cache_policy.layers", f"unknown cache field {name!r} (fields: "
                                      f"{', '.join(sorted(known))})", show_value=False)
                _check_format(fmt, f"layers.{name}")
            if override.default is not None:
                _check_format(override.default, "layers.default")

    @classmethod
    def parse(cls, text: str | dict | None) -> "CachePolicy":
        if text is None:
            return cls()
        if isinstance(text, CachePolicy):
            return text
        overrides: tuple[LayerOverride, ...] = ()
        if isinstance(text, dict):
            text = dict(text)
            overrides = tuple(_override_from_mapping(item) for item in _override_list(text.pop("layers", None)))
            items = text.items()
        else:
            base, *rest = text.split(";")
            overrides = tuple(_override_from_text(seg.strip()) for seg in rest if seg.strip())
            items = _split(base)
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
        return cls(formats, default, **extra, layers=overrides)

    def format_for(self, name: str, native: str) -> str:
        return self.formats.get(name, self.default or native)

    def for_layer(self, index: int) -> "CachePolicy":
        """The policy attention layer ``index`` uses: the base with every override naming it applied."""
        formats, default = dict(self.formats), self.default
        for override in self.layers:
            if index in override.layers:
                if override.default is not None:  # a bare format sets every field of that layer
                    formats, default = {}, override.default
                formats.update(override.formats)
        if formats == self.formats and default == self.default and not self.layers:
            return self
        return CachePolicy(formats, default, self.tail, self.rollback)

    def check_fields(self, dims: list[AttentionDims]) -> None:
        """A policy may only name fields some attention layer stores (hybrid stacks mix
        ``k`` layers with ``k_sem``/``k_geo`` layers)."""
        _check_named(self.formats, dims, "cache_policy")
        for override in self.layers:
            missing = [i for i in override.layers if i >= len(dims)]
            if missing:
                raise ConfigError("cache_policy.layers", f"layer {missing[0]} does not exist (the model has "
                                  f"{len(dims)} attention layers, 0..{len(dims) - 1})", override.label)
            _check_named(override.formats, [dims[i] for i in override.layers], "cache_policy.layers")

    @property
    def label(self) -> str:
        parts = ([self.default] if self.default else []) + [f"{k}={v}" for k, v in self.formats.items()]
        if self.tail:
            parts.append(f"tail={self.tail}")
        base = ",".join(parts)
        if not self.layers:
            return base or "native"
        return ";".join([base, *(o.label for o in self.layers)])  # parses back (an empty base: native)


def _check_named(formats: dict[str, str], dims: list[AttentionDims], where: str) -> None:
    have = stored_fields(dims)
    for name in formats:
        if name not in have:
            aliased = sorted({d.value_alias for d in dims if name == "v" and d.value_alias})
            why = f"; values are read from {', '.join(aliased)}" if aliased else ""
            raise ConfigError(where, f"field {name!r} does not exist for this attention "
                              f"(its cache fields are {', '.join(sorted(have))}{why})", show_value=False)


def _layer_indices(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ConfigError("cache_policy.layers", "expected layer indices like 0,21 or 0-3", text) from None
        if last < first:
            raise ConfigError("cache_policy.layers", "a layer range must be ascending (a-b with a <= b)", part)
        if last - first > 100_000:
            raise ConfigError("cache_policy.layers", "a layer range may span at most 100,000 layers", part)
        out.extend(range(first, last + 1))
    return tuple(dict.fromkeys(out))


def _override_from_text(segment: str) -> LayerOverride:
    head, sep, rest = segment.partition(":")
    if not head.startswith("layers=") or not sep:
        raise ConfigError("cache_policy", "a per-layer override reads layers=<indices>:<formats>, e.g. "
                          "layers=0,21:k_sem=q8_0", segment)
    formats, default = {}, None
    for key, value in _split(rest):
        if key in ("tail", "rollback"):
            raise ConfigError("cache_policy.layers", f"{key} applies to the whole cache, not to some layers", segment)
        if key in (None, "default", "*"):
            default = value
        else:
            formats[key] = value
    return LayerOverride(_layer_indices(head[len("layers="):]), formats, default)


def _override_list(value) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError("cache_policy.layers", "expected a list of {layers: [...], <field>: <format>}", value)
    return value


def _override_from_mapping(item) -> LayerOverride:
    if not isinstance(item, dict) or "layers" not in item:
        raise ConfigError("cache_policy.layers", "each override is a mapping with a 'layers' list", item)
    layers = item["layers"]
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ConfigError("cache_policy.layers", "'layers' must be a list of layer indices", layers)
    formats = {str(k): str(v) for k, v in item.items() if k not in ("layers", "default")}
    if any(k in ("tail", "rollback") for k in formats):
        raise ConfigError("cache_policy.layers", "tail and rollback apply to the whole cache, not to some layers", item)
    return LayerOverride(tuple(dict.fromkeys(layers)), formats, None if item.get("default") is None else str(item["default"]))


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
