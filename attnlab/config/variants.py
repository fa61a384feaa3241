"""The attention-variant registry: each variant's config class (what it computes and caches, in
numbers: ``AttentionSpec.dims``) and the layer that implements it.

A variant is one module that defines an ``AttentionSpec`` subclass (with ``type: Literal[...]``,
``dims``, and optionally ``check_width``, ``approx_params``, ``label``, ``description``,
``mixed_policy``), an ``AttentionLayer`` subclass, and calls ``register_variant`` once at import.
The built-in variants are registered by ``attnlab.nn.attention`` (imported with the package);
``docs/ARCHITECTURE.md`` walks through MLA as the example. Config validation, plans, KV-byte
accounting, policy checks, cache allocation and summaries look variants up here and read their
``dims``; nothing outside a variant names its fields.

This module sits in the config layer: it stores the layer factory as an opaque callable and
never imports model code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, get_args

from pydantic import BeforeValidator, SerializeAsAny, ValidationInfo

from attnlab.config.attention import AttentionDims, AttentionSpec


@dataclass(frozen=True)
class Variant:
    type: str
    config: type[AttentionSpec]
    layer: Callable[[Any, int, int], Any]  # (config, d_model, layer_index) -> AttentionLayer

    @property
    def description(self) -> str:
        return self.config.description


_REGISTRY: dict[str, Variant] = {}


def _type_name(config: type[AttentionSpec]) -> str:
    annotation = config.model_fields["type"].annotation
    names = get_args(annotation)
    if len(names) != 1 or not isinstance(names[0], str):
        raise TypeError(f"{config.__name__}.type must be annotated Literal['<name>'], got {annotation!r}")
    return names[0]


def register_variant(config: type[AttentionSpec], layer: Callable[[Any, int, int], Any], *,
                     replace: bool = False) -> Variant:
    """Register an attention variant; its name is ``config``'s ``type`` literal. Registering a
    name twice is an error unless ``replace`` (tests re-registering a toy variant)."""
    if not (isinstance(config, type) and issubclass(config, AttentionSpec)):
        raise TypeError(f"{config!r} is not an AttentionSpec subclass")
    name = _type_name(config)
    if name in _REGISTRY and not replace and _REGISTRY[name].config is not config:
        raise ValueError(f"attention variant {name!r} is already registered ({_REGISTRY[name].config.__name__})")
    variant = _REGISTRY[name] = Variant(name, config, layer)
    return variant


def unregister_variant(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_variants() -> dict[str, Variant]:
    return dict(_REGISTRY)


def get_variant(name: str) -> Variant:
    variant = _REGISTRY.get(name)
    if variant is None:
        known = ", ".join(sorted(_REGISTRY)) or "none registered"
        raise ValueError(f"unknown attention type {name!r} (registered: {known})")
    return variant


def config_class(name: str) -> type[AttentionSpec]:
    return get_variant(name).config


def variant_of(spec: AttentionSpec) -> Variant:
    return get_variant(spec.type)


def build_layer(spec: AttentionSpec, d_model: int, layer_index: int):
    """The registered layer for ``spec``."""
    return variant_of(spec).layer(spec, d_model, layer_index)


def _parse_attention(value, info: ValidationInfo):
    """A mapping with ``type`` -> the registered variant's config."""
    if isinstance(value, AttentionSpec):
        return value
    if not isinstance(value, dict):
        raise ValueError("expected a mapping with a 'type' (an attention variant)")
    return config_class(value.get("type", "standard")).model_validate(value, context=info.context)


#: a field type: any registered attention variant's config, chosen by ``type``
AttentionConfig = Annotated[SerializeAsAny[AttentionSpec], BeforeValidator(_parse_attention)]


def mixed_policy(specs: list[AttentionSpec]) -> dict[str, str]:
    """The heterogeneous cache policy of a model whose attention layers are ``specs``: the union
    of their variants' ``mixed_policy`` (hybrid stacks share field names such as ``v``; the first
    layer naming a field decides its format)."""
    out: dict[str, str] = {}
    for spec in specs:
        for name, fmt in type(spec).mixed_policy.items():
            out.setdefault(name, fmt)
    return out


def known_field_names() -> set[str]:
    """Every cache field name a registered variant stores (each variant's ``mixed_policy`` names
    all of its stored fields; ``v`` is everyone's value field)."""
    return {"v"} | {name for v in _REGISTRY.values() for name in v.config.mixed_policy}


def stored_fields(dims: list[AttentionDims]) -> set[str]:
    """Every field some layer stores (a policy may name only these)."""
    return {name for d in dims for name in d.cache_fields}


__all__ = ["AttentionConfig", "Variant", "build_layer", "config_class", "get_variant", "known_field_names", "mixed_policy", "register_variant",
           "registered_variants", "stored_fields", "unregister_variant", "variant_of"]
