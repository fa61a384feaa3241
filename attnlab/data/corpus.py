"""The embedded default corpus: the running interpreter's standard-library ``.py`` sources.

It exists on every machine that can run attnlab and needs no download, which makes it the default
``data.source``. The file list is deterministic for a given Python installation:

- every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, in sorted order of its relative
  POSIX path;
- skipping folders named in :data:`SKIP_DIRS` — installed third-party packages (``site-packages``,
  ``dist-packages``), bytecode caches, and test suites (``test``, ``tests``, ``idle_test``: large,
  repetitive, and partly deliberately malformed, e.g. ``lib2to3/tests/data``) — and hidden folders.

Files that are not valid UTF-8 are skipped later, during tokenization, like any other undecodable
text file. The corpus changes with the Python version; its description names the version.
"""

from __future__ import annotations

import functools
import os
import platform
import sysconfig
from pathlib import Path

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


def stdlib_root() -> Path:
    """Folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=4)
def _all_files(root: str) -> tuple[tuple[str, int], ...]:
    """(relative POSIX path, size in bytes) of every corpus file under ``root``, sorted by path."""
    found: list[tuple[str, int]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
        rel_folder = Path(folder).relative_to(root)
        for name in files:
            if not name.endswith(".py") or name.startswith("."):
                continue
            full = os.path.join(folder, name)
            try:
                size = os.stat(full).st_size
            except OSError:
                continue  # a dangling link or unreadable entry is not part of the corpus
            found.append(((rel_folder / name).as_posix(), size))
    found.sort()
    return tuple(found)


def embedded_corpus_files(max_bytes: int | None = None) -> list[Path]:
    """Absolute paths of the embedded corpus files, in corpus order.

    With ``max_bytes``, files are taken in order until their total size reaches ``max_bytes``
    (the file that crosses the limit is included, so the list is non-empty whenever the corpus is).
    Empty files (``__init__.py`` stubs) are kept in the list; tokenization skips them.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    root = stdlib_root()
    out: list[Path] = []
    total = 0
    for rel, size in _all_files(str(root)):
        if max_bytes is not None and total >= max_bytes:
            break
        out.append(root / rel)
        total += size
    return out


def embedded_description(num_files: int | None = None) -> str:
    """Human-readable provenance, e.g. ``"embedded: Python 3.11.7 stdlib, 412 files"``."""
    text = f"embedded: Python {platform.python_version()} stdlib"
    if num_files is not None:
        text += f", {num_files} files"
    return text
