"""Checkpoints: plain dicts of tensors and primitives, saved atomically, read with
``weights_only=True``, checked for compatibility before a resume.

Payload (format ``attnlab.checkpoint``, version 1)::

    format, version, step, tokens_seen, best_val_loss, train_state (TrainState as a dict),
    model_config / train_config (JSON dicts), data_description (str), world_size,
    model (state_dict), optimizer (state_dict), rng (one {"cpu": ByteTensor, "cuda"?: ByteTensor}
    per rank, rank order)
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any

import torch

from attnlab.errors import CheckpointError
from attnlab.fsutil import fsync_path

FORMAT = "attnlab.checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "step", "model_config", "train_config", "data_description",
                 "model", "optimizer", "rng", "best_val_loss", "tokens_seen")
# Train-config keys that may change between an interrupted run and its resume.
RESUMABLE_TRAIN_KEYS = frozenset({"steps", "eval_every", "eval_batches", "log_every", "save_every"})


# ---------------------------------------------------------------- save / read
def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_stale_temps(path: Path) -> None:
    """Delete temp files a killed ``save_checkpoint(path, ...)`` left behind."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically: a temp file in the same folder, flushed and
    fsynced, then ``os.replace``d over ``path`` and the folder fsynced. A crash at any point
    leaves either the old file or the new one, never a partial file; temp files are removed on
    errors (and by the next save after a hard kill)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = _temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def _one_line(err: BaseException, limit: int = 200) -> str:
    """``Type: first sentence`` of an error (for weights-only refusals, the unpickler's reason)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(err).splitlines()]
    lines = [ln for ln in lines if ln]
    reason = next((ln for ln in lines if ln.startswith("WeightsUnpickler error:")), lines[0] if lines else "")
    reason = reason.split(". ")[0].rstrip(".")
    reason = reason if len(reason) <= limit else reason[: limit - 3] + "..."
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


def read_checkpoint(path: str | os.PathLike, *, required: tuple[str, ...] = REQUIRED_KEYS,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and check its format tag and keys.

    Raises ``CheckpointError`` (one line, naming the file) when the file is missing, unreadable,
    truncated or corrupted, is not an attnlab checkpoint, or lacks one of ``required``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path}: empty file (an interrupted copy?)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise CheckpointError(f"checkpoint {path}: unreadable or corrupted ({_one_line(err)})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, got {type(payload).__name__}")
    if payload.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path}: format tag is {payload.get('format')!r}, expected {FORMAT!r}")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path}: unsupported version {payload.get('version')!r} (this attnlab reads {VERSION})")
    missing = [k for k in required if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path}: missing key(s) {', '.join(missing)}")
    return payload


# ---------------------------------------------------------------- compatibility
def first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """First key path where two JSON-like values differ (dict keys in ``new``'s order, then keys
    only in ``old``), as ``(path, old_value, new_value)``; a missing side reads ``<absent>``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(new) + [k for k in old if k not in new]:
            sub = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                return sub, old.get(key, "<absent>"), new.get(key, "<absent>")
            found = first_difference(old[key], new[key], sub)
            if found:
                return found
        return None
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = first_difference(a, b, f"{prefix}[{i}]")
            if found:
                return found
        return None
    if type(old) is not type(new) and not (isinstance(old, (int, float)) and isinstance(new, (int, float))):
        return prefix, old, new
    return None if old == new else (prefix, old, new)


def check_compatible(ckpt: dict[str, Any], path: str | os.PathLike, *, model_config: dict,
                     train_config: dict, data_description: str, world_size: int) -> None:
    """Raise ``CheckpointError`` naming the first differing key (and both values) when the run
    described by the arguments cannot continue from ``ckpt``. Train-config keys in
    ``RESUMABLE_TRAIN_KEYS`` may differ."""
    def strip(cfg: dict) -> dict:
        return {k: v for k, v in cfg.items() if k not in RESUMABLE_TRAIN_KEYS}

    checks = [
        ("model", ckpt["model_config"], model_config),
        ("train", strip(ckpt["train_config"]), strip(train_config)),
        ("data", {"description": ckpt["data_description"]}, {"description": data_description}),
        ("distributed", {"world_size": ckpt.get("world_size", 1)}, {"world_size": world_size}),
    ]
    for section, old, new in checks:
        diff = first_difference(old, new, section)
        if diff is not None:
            key, was, now = diff
            raise CheckpointError(
                f"cannot resume from {path}: {key} differs (checkpoint: {was!r}, now: {now!r}); "
                "use a new run folder or disable resume")
