"""Shared base for typed configs: strict pydantic models whose errors name the key path."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from attnlab.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Unknown keys and wrong types are errors; configs are immutable once validated."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True)


def _format_loc(prefix: str, loc: tuple, root: Any = None) -> str:
    """``prefix.key[i].key`` from a pydantic error location. Discriminated unions add the tag
    value (``standard``, ``latency``, ...) to the location; it is skipped exactly when it is the
    ``type`` of the mapping at that level of the input."""
    parts = [prefix] if prefix else []
    node = root
    for item in loc:
        if isinstance(node, dict) and item not in node and node.get("type") == item:
            continue  # a union tag, not a key the user wrote
        if isinstance(item, str) and item.startswith("function-"):
            continue  # validator wrappers
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
        if isinstance(node, dict):
            node = node.get(item)
        elif isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
            node = node[item]
        else:
            node = None
    return ".".join(parts)


def validation_error_to_config_error(err: ValidationError, prefix: str = "", root: Any = None) -> ConfigError:
    """Turn the first pydantic error into a one-line ``ConfigError`` (key path + value)."""
    first = err.errors(include_url=False)[0]
    path = _format_loc(prefix, tuple(first["loc"]), root)
    kind = first["type"]
    msg = first["msg"]
    if kind == "extra_forbidden":
        return ConfigError(path, "unknown key", first.get("input"))
    if kind == "missing":
        return ConfigError(path, "required key is missing", show_value=False, value=None)
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    value = first.get("input")
    # Cross-field checks name their keys and values in the message ("sem_dim=18 is not ...");
    # echoing the whole enclosing mapping would only bury that.
    show = kind != "union_tag_invalid" and not isinstance(value, (dict, list))
    return ConfigError(path, msg, value, show_value=show)


def validate_section(cls: type[T], data: Any, prefix: str) -> T:
    """Validate ``data`` as ``cls``; raise ``ConfigError`` naming ``prefix.<key>`` on failure."""
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a mapping for {cls.__name__}", data)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise validation_error_to_config_error(err, prefix, data) from None
