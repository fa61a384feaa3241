"""Safe file and folder names built from user strings (run ids, group and manifest names,
benchmark ids, report table names).

A name is one path component from ``[A-Za-z0-9._-]``, not starting with ``.`` (no hidden files, no
``..``), at most :data:`MAX_NAME_LENGTH` characters. :func:`safe_child` also resolves the result
and checks that it stays inside its parent folder (a symlinked parent is followed first, so a link
planted *inside* the folder cannot lead out of it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from attnlab.errors import ConfigError

MAX_NAME_LENGTH = 100
NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
RULE = f"must be a file name of letters, digits, '.', '_' or '-', not starting with '.', at most {MAX_NAME_LENGTH} characters"


def shorten(value: str, limit: int = 60) -> str:
    """``value`` cut to fit an error message (the length stays visible)."""
    return value if len(value) <= limit else value[:40] + f"...<{len(value)} characters>"


def check_name(value: object, key: str) -> str:
    """``value`` if it is a safe single path component, else ``ConfigError(key, ...)``."""
    if not isinstance(value, str) or not value:
        raise ConfigError(key, RULE, value)
    shown = shorten(value)
    if len(value) > MAX_NAME_LENGTH or NAME_RE.fullmatch(value) is None:
        raise ConfigError(key, RULE, shown)
    return value


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` resolves to ``folder`` or something inside it."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
    except ValueError:
        return False
    return True


def safe_child(folder: str | os.PathLike, name: str, key: str, suffix: str = "") -> Path:
    """``folder / (name + suffix)`` after checking ``name`` (:func:`check_name`) and that the
    result stays directly inside the resolved ``folder`` (the child itself is not followed: the
    atomic writers replace a link there rather than write through it)."""
    check_name(name, key)
    folder = Path(folder)
    child = folder / f"{name}{suffix}"
    if (folder.resolve() / child.name).parent != folder.resolve() or child.name != f"{name}{suffix}":
        raise ConfigError(key, f"leads outside {folder}", name)
    return child


def check_run_dir(run_dir: str | os.PathLike, names: dict[str, str], levels: int | None = None) -> Path:
    """Check the user-named components of a run folder ``<root>/<name>/<group>/<id>``: each of
    ``names`` (key -> value) is a safe name and the folder resolves inside ``<root>``
    (``levels`` components up, default ``len(names)``)."""
    for key, value in names.items():
        check_name(value, key)
    run_dir = Path(run_dir)
    root = run_dir
    for _ in range(levels if levels is not None else len(names)):
        root = root.parent
    if not is_within(run_dir, root) or run_dir.resolve() == root.resolve():
        raise ConfigError(next(iter(names), "run"), f"run folder {run_dir} leads outside {root}", str(run_dir))
    return run_dir
