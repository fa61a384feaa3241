"""What produced a run folder: the command, the resolved config and the environment.

``command.txt`` gains one line per invocation (a resume appends, never overwrites);
``resolved_config.json`` is the config of the latest invocation; ``env.json`` describes the
latest environment and keeps earlier ones under ``previous``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnlab.fsutil import append_text, atomic_write_text, write_error

COMMAND, RESOLVED, ENV = "command.txt", "resolved_config.json", "env.json"
_PACKAGE_DIR = Path(__file__).resolve().parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_PACKAGE_DIR), *args], capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_info() -> dict[str, Any]:
    """Commit and dirty flag of the attnlab source tree (``None`` each when unknown)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", ".") if commit else None
    return {"commit": commit or None, "dirty": None if status is None else bool(status)}


def _attnlab_version() -> str | None:
    """The installed distribution's version, else ``attnlab.__version__`` (None when neither)."""
    try:
        return metadata.version("attnlab")
    except metadata.PackageNotFoundError:
        from attnlab._version import __version__
        return __version__


def environment(world_size: int | None = None) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "attnlab": _attnlab_version(),
        "git": git_info(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "cuda_version": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda
        else [platform.processor() or platform.machine() or "cpu"],
        "world_size": world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")),
    }


def write_provenance(run_dir: str | os.PathLike, command: str, resolved: dict, *,
                     world_size: int | None = None) -> None:
    """Append ``command`` to ``command.txt``; write ``resolved_config.json`` and ``env.json``.

    Callers write these only after a resume has been checked, so a refused resume leaves them as
    they were. A failed write is a one-line ``WriteError`` naming the file."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(run_dir, err, "cannot create folder") from None
    append_text(run_dir / COMMAND, " ".join(command.splitlines()) + "\n")
    atomic_write_text(run_dir / RESOLVED, json.dumps(resolved, indent=2, sort_keys=False) + "\n")
    env = environment(world_size)
    previous: list = []
    if (run_dir / ENV).is_file():
        try:
            old = json.loads((run_dir / ENV).read_text(encoding="utf-8"))
            previous = old.pop("previous", []) + [old]
        except (ValueError, AttributeError, TypeError, OSError):
            previous = []
    if previous:
        env["previous"] = previous
    atomic_write_text(run_dir / ENV, json.dumps(env, indent=2) + "\n")
