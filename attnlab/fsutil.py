"""Durable-write helpers shared by everything that writes files atomically (checkpoints, token
files, exported checkpoints)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or folder by path (best effort: some platforms cannot open folders)."""
    try:
        fd = os.open(Path(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one, never a partial
    one: a uniquely named temp file in the same folder, flushed and fsynced, then ``os.replace``d;
    the temp file is removed if anything fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
