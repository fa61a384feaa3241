"""Shared base for typed configs: strict pydantic models whose errors name the key path."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from attnlab.errors import ConfigError

T = TypeVar("T", bound=BaseModel)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _int64_problem(value: Any, where: str = "") -> str | None:
    """Why ``value`` (or an integer inside it) cannot be stored as an int64, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            return f"{where + ': ' if where else ''}integer does not fit in 64 bits (|value| >= 2**63)"
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            problem = _int64_problem(item, f"{where}[{i}]")
            if problem:
                return problem
    return None


class StrictModel(BaseModel):
    """Unknown keys and wrong types are errors; configs are immutable once validated.

    Every float (also inside lists) must be finite: NaN and +-inf are errors. Every integer
    must fit in an int64 (torch would overflow later)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True,
                              allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _check_int64(cls, data: Any) -> Any:
        # (a model-level check: a field-level "*" validator would also wrap union tags)
        if isinstance(data, dict):
            for key, value in data.items():
                problem = _int64_problem(value, str(key))
                if problem:
                    raise ValueError(_KEYED + problem)
        return data


_KEYED = "\x00key:"  # marks a message "<key>: ..." (or "[i]: ...") whose key or index belongs to the path


def _format_loc(prefix: str, loc: tuple, root: Any = None) -> str:
    """``prefix.key[i].key`` from a pydantic error location. Discriminated unions add the tag
    value (``standard``, ``latency``, ...) to the location; it is skipped exactly when it is the
    ``type`` of the mapping at that level of the input."""
    parts = [prefix] if prefix else []
    node = root
    for item in loc:
        if isinstance(node, dict) and item not in node and node.get("type", "standard") == item:
            continue  # a union tag, not a key the user wrote (attention's omitted type means standard)
        if isinstance(item, str) and item.startswith("function-"):
            continue  # validator wrappers
        if isinstance(item, str) and isinstance(node, list):
            continue  # a union member label (``list[float]``): a list has no string keys
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
    errors = err.errors(include_url=False)
    # A non-finite float inside a union of list shapes also fails the other shapes; report it.
    first = next((e for e in errors if e["type"] == "finite_number"), errors[0])
    path = _format_loc(prefix, tuple(first["loc"]), root)
    kind = first["type"]
    msg = first["msg"]
    if kind == "extra_forbidden":
        return ConfigError(path, "unknown key", first.get("input"))
    if kind == "missing":
        return ConfigError(path, "required key is missing", show_value=False, value=None)
    if kind == "finite_number":
        return ConfigError(path, "must be a finite number (NaN and infinity are not allowed)", first.get("input"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    value = first.get("input")
    if msg.startswith(_KEYED):  # "<key>[i]: message" from a model-level check: the key joins the path
        where, _, msg = msg[len(_KEYED):].partition(": ")
        path = f"{path}{where}" if where.startswith("[") else (f"{path}.{where}" if path else where)
        return ConfigError(path, msg, show_value=False)
    # Cross-field checks name their keys and values in the message ("sem_dim=18 is not ...");
    # echoing the whole enclosing mapping would only bury that.
    show = kind != "union_tag_invalid" and not isinstance(value, (dict, list))
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
        digits = len(str(abs(value)))
        return ConfigError(path, f"{msg} (got a {digits}-digit integer)", show_value=False)
    return ConfigError(path, msg, value, show_value=show)


def validate_section(cls: type[T], data: Any, prefix: str, context: dict | None = None) -> T:
    """Validate ``data`` as ``cls``; raise ``ConfigError`` naming ``prefix.<key>`` on failure.
    ``context`` reaches the validators (``{"limits": Limits}``: the manifest's size limits)."""
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a mapping for {cls.__name__}", data)
    try:
        return cls.model_validate(data, context=context)
    except ValidationError as err:
        raise validation_error_to_config_error(err, prefix, data) from None
