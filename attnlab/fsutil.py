"""Durable-write helpers shared by everything that writes files atomically (checkpoints, token
files, exported checkpoints)."""

from __future__ import annotations

import os
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
