"""Checkpoints: plain dicts of tensors and primitives, saved atomically, read with
``weights_only=True``, checked for compatibility before a resume.

Payload (format ``attnlab.checkpoint``, version 1)::

    format, version, step, tokens_seen, best_val_loss, train_state (TrainState as a dict),
    checksum ("sha256-trailer", added by save_checkpoint),
    model_config / train_config (JSON dicts), data_description (str), world_size,
    model (state_dict), optimizer (state_dict), rng (one {"cpu": ByteTensor, "cuda"?: ByteTensor}
    per rank, rank order)

Integrity. The file is the ``torch.save`` zip followed by a 48-byte trailer: ``ATTNSHA2``, the
sha256 of every byte before the trailer, and that byte count (little-endian uint64). ``torch.load``
ignores the trailer, so plain ``torch.load(path, weights_only=True)`` still reads the file;
``read_checkpoint`` verifies it first, so any bit flip or truncation anywhere in the file is
reported as a one-line ``CheckpointError`` naming the file. The payload is then checked for
structure (tensors where tensors belong, an integer step, an RNG state per rank, ...) and every
floating tensor of the model and optimizer for finiteness. ``save_checkpoint`` refuses to write a
payload holding a NaN/inf tensor.

Older checkpoints (no trailer: the file ends with the zip's end-of-central-directory record) still
load, unverified apart from the structure and finiteness checks, with a one-time warning on
stderr; the next save of that run writes the trailer. A file that ends with neither is refused
(a truncated or damaged new checkpoint).

Resume. ``load_resume_checkpoint(run_dir)`` reads ``last.pt``; when that file is damaged it falls
back to ``best.pt`` (also a full training checkpoint, at an earlier or equal step), says so on
stderr and in the payload's ``notes``, and the run continues from there (the steps after it are
trained again: batches are a function of the step, so the result is the same).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from attnlab.errors import CheckpointError
from attnlab.fsutil import fsync_path, remove_stale_temps, temp_name

FORMAT = "attnlab.checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "step", "model_config", "train_config", "data_description",
                 "model", "optimizer", "rng", "best_val_loss", "tokens_seen")
# Train-config keys that may change between an interrupted run and its resume.
RESUMABLE_TRAIN_KEYS = frozenset({"steps", "eval_every", "eval_batches", "log_every", "save_every",
                                  "on_nonfinite", "max_nonfinite_skips", "tracking"})
TRAILER_MAGIC = b"ATTNSHA2"
CHECKSUM_TAG = "sha256-trailer"  # payload["checksum"] of files written with the trailer
TRAILER_SIZE = len(TRAILER_MAGIC) + 32 + 8
_ZIP_EOCD = b"PK\x05\x06"
_CHUNK = 1 << 20
_warned_legacy = False


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (e.g. a full disk); the previous file is untouched."""


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint payload holds a NaN/inf tensor or loss."""


class CheckpointPayload(dict):
    """A checkpoint as read from disk: a plain dict plus where it came from (``path``) and what
    the reader had to say about it (``notes``, e.g. a fallback from a damaged ``last.pt``)."""

    path: Path | None = None
    notes: list[str]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.notes = []


def source_of(payload: Mapping[str, Any]) -> str:
    """``"checkpoint <path>"`` for a payload read from disk, else ``"checkpoint"``."""
    path = getattr(payload, "path", None)
    return f"checkpoint {path}" if path is not None else "checkpoint"


# ---------------------------------------------------------------- finiteness
def _named_tensors(value: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _named_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _named_tensors(v, f"{prefix}[{i}]")


def first_nonfinite(payload: Mapping[str, Any]) -> str | None:
    """Name of the first model/optimizer tensor (or loss field) of ``payload`` holding a NaN or
    inf, else None. One pass over the floating tensors."""
    best = payload.get("best_val_loss")
    if isinstance(best, float) and not math.isfinite(best):
        return "best_val_loss"
    for section in ("model", "optimizer"):
        for name, t in _named_tensors(payload.get(section), section):
            if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
                return name
    return None


# ---------------------------------------------------------------- save / read
class _HashingWriter:
    """Write-only file wrapper that hashes and counts what passes through (``torch.save`` only
    writes sequentially to file-like objects)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.size += view.nbytes
        return self.f.write(view)

    def flush(self) -> None:
        self.f.flush()


def _trailer(sha: "hashlib._Hash", size: int) -> bytes:
    return TRAILER_MAGIC + sha.digest() + size.to_bytes(8, "little")


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any], *, check_finite: bool = True) -> Path:
    """Write ``payload`` to ``path`` atomically: a temp file in the same folder (the torch zip
    and its sha256 trailer), flushed and fsynced, then ``os.replace``d over ``path`` and the
    folder fsynced. A crash at any point leaves either the old file or the new one, never a
    partial file; temp files are removed on errors (and by the next save after a hard kill).

    Refuses (``NonFiniteCheckpointError``, nothing written) a payload with a NaN/inf model or
    optimizer tensor unless ``check_finite=False`` (the caller checked). An ``OSError`` while
    writing (a full disk, ...) becomes ``CheckpointWriteError`` (one line, naming the file)."""
    path = Path(path)
    if check_finite:
        bad = first_nonfinite(payload)
        if bad is not None:
            raise NonFiniteCheckpointError(f"refusing to write checkpoint {path}: {bad} holds NaN/inf values")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)  # temp files of killed writers (a live writer's are kept)
    except OSError as err:
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {_one_line(err)}") from None
    tmp = temp_name(path)
    payload = {**payload, "checksum": CHECKSUM_TAG}  # so a file cut exactly at its trailer is caught
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(payload, writer)
            f.write(_trailer(writer.sha, writer.size))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, CheckpointError):
            raise CheckpointWriteError(
                f"cannot write checkpoint {path}: {_one_line(err)}; the previous file is unchanged") from None
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


def verify_file(path: str | os.PathLike, f=None) -> bool:
    """Check the sha256 trailer of a checkpoint file; True when verified, False for an older
    file without one (it ends with the zip's end record). Raises ``CheckpointError`` when the
    trailer or the bytes it covers are damaged or the file is truncated."""
    path = Path(path)
    own = f is None
    f = open(path, "rb") if own else f
    try:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size < TRAILER_SIZE:
            raise CheckpointError(f"checkpoint {path}: truncated ({size} bytes)")
        f.seek(size - TRAILER_SIZE)
        trailer = f.read(TRAILER_SIZE)
        if not trailer.startswith(TRAILER_MAGIC):
            if trailer[-22:].startswith(_ZIP_EOCD):
                return False
            raise CheckpointError(f"checkpoint {path}: truncated or corrupted (no checksum trailer, "
                                  "no zip end record)")
        digest, length = trailer[8:40], int.from_bytes(trailer[40:], "little")
        if length != size - TRAILER_SIZE:
            raise CheckpointError(f"checkpoint {path}: truncated or corrupted (checksum covers {length} "
                                  f"bytes, file has {size - TRAILER_SIZE})")
        sha, left = hashlib.sha256(), length
        f.seek(0)
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise CheckpointError(f"checkpoint {path}: truncated while reading")
            sha.update(chunk)
            left -= len(chunk)
        if sha.digest() != digest:
            raise CheckpointError(f"checkpoint {path}: checksum mismatch (the file is corrupted)")
        return True
    except OSError as err:
        raise CheckpointError(f"checkpoint {path}: unreadable ({_one_line(err)})") from None
    finally:
        if own:
            f.close()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_payload(payload: Mapping[str, Any], path: Path | str) -> None:
    """Structure and finiteness of the keys ``payload`` holds (``CheckpointError`` naming
    ``path`` and the key)."""
    def bad(key: str, what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {key} {what}")

    for key in ("step", "tokens_seen"):
        if key in payload and not (_is_int(payload[key]) and payload[key] >= 0):
            raise bad(key, f"must be a non-negative integer, got {payload[key]!r}"[:200])
    if "world_size" in payload and not (_is_int(payload["world_size"]) and payload["world_size"] >= 1):
        raise bad("world_size", f"must be a positive integer, got {payload['world_size']!r}"[:200])
    if "best_val_loss" in payload:
        best = payload["best_val_loss"]
        if best is not None and not (isinstance(best, (int, float)) and not isinstance(best, bool)):
            raise bad("best_val_loss", f"must be a number or null, got {type(best).__name__}")
    for key in ("model_config", "train_config", "train_state"):
        if key in payload and not isinstance(payload[key], dict):
            raise bad(key, f"must be a dict, got {type(payload[key]).__name__}")
    if "data_description" in payload and not isinstance(payload["data_description"], str):
        raise bad("data_description", f"must be a string, got {type(payload['data_description']).__name__}")
    if "model" in payload:
        model = payload["model"]
        if not isinstance(model, Mapping) or not model:
            raise bad("model", "must be a non-empty dict of tensors")
        for name, t in model.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise bad("model", f"entry {name!r} is a {type(t).__name__}, not a tensor"[:200])
    if "optimizer" in payload:
        opt = payload["optimizer"]
        if (not isinstance(opt, Mapping) or not isinstance(opt.get("state"), Mapping)
                or not isinstance(opt.get("param_groups"), list)
                or not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in opt["param_groups"])):
            raise bad("optimizer", "is not an optimizer state (dict with 'state' and 'param_groups')")
    if "rng" in payload:
        rng = payload["rng"]
        if (not isinstance(rng, list) or not rng or not all(
                isinstance(r, Mapping) and all(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 1
                                               for v in r.values()) and "cpu" in r for r in rng)):
            raise bad("rng", "is not a list of per-rank RNG states ({'cpu': ByteTensor, ...})")
    name = first_nonfinite(payload)
    if name is not None:
        raise NonFiniteCheckpointError(f"checkpoint {path}: {name} holds NaN/inf values (a diverged run?)")


def read_checkpoint(path: str | os.PathLike, *, required: tuple[str, ...] = REQUIRED_KEYS,
                    map_location: str | torch.device = "cpu") -> CheckpointPayload:
    """Verify ``path``'s checksum, load it with ``weights_only=True``, and check its format tag,
    keys, structure and the finiteness of its tensors.

    Raises ``CheckpointError`` (one line, naming the file) when the file is missing, unreadable,
    truncated or corrupted, is not an attnlab checkpoint, lacks one of ``required``, or holds
    malformed or non-finite entries. Returns a ``CheckpointPayload`` (a dict) whose ``path`` is
    ``path``.
    """
    global _warned_legacy
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        f = open(path, "rb")
    except OSError as err:
        raise CheckpointError(f"checkpoint {path}: unreadable ({_one_line(err)})") from None
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            raise CheckpointError(f"checkpoint {path}: empty file (an interrupted copy?)")
        verified = verify_file(path, f)
        f.seek(0)
        try:
            payload = torch.load(f, map_location=map_location, weights_only=True)
        except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
            raise CheckpointError(f"checkpoint {path}: unreadable or corrupted ({_one_line(err)})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, got {type(payload).__name__}")
    if payload.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path}: format tag is {payload.get('format')!r}, expected {FORMAT!r}"[:300])
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path}: unsupported version {payload.get('version')!r} (this attnlab reads {VERSION})"[:300])
    missing = [k for k in required if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path}: missing key(s) {', '.join(missing)}")
    if not verified and payload.get("checksum") == CHECKSUM_TAG:
        raise CheckpointError(f"checkpoint {path}: truncated (its checksum trailer is missing)")
    validate_payload(payload, path)
    if not verified and not _warned_legacy:
        _warned_legacy = True
        print(f"warning: checkpoint {path} has no checksum (written by an older attnlab); loaded "
              "unverified, the next save adds one", file=sys.stderr, flush=True)
    out = CheckpointPayload(payload)
    out.path = path
    return out


def load_resume_checkpoint(run_dir: str | os.PathLike, *, last: str = "last.pt", fallback: str = "best.pt",
                           check: Callable[[dict, Path], None] | None = None,
                           log: Callable[[str], None] | None = None) -> CheckpointPayload | None:
    """The checkpoint a run in ``run_dir`` resumes from: ``last`` when it is intact; when it is
    damaged (``CheckpointError`` on read), ``fallback`` if that one is intact, with a note in
    ``payload.notes`` and on ``log`` (stderr by default); None when there is no ``last``.
    ``check(payload, path)`` (e.g. ``check_compatible``) runs on the chosen checkpoint; its errors
    are not a reason to fall back. Raises the ``last`` error when no fallback is usable."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    run_dir = Path(run_dir)
    path = run_dir / last
    if not path.is_file():
        return None
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as err:
        alt = run_dir / fallback
        if not alt.is_file():
            raise
        try:
            ckpt = read_checkpoint(alt)
        except CheckpointError as alt_err:
            raise CheckpointError(f"{err}; the fallback {alt.name} is unusable too ({alt_err})") from None
        note = (f"{path} is damaged ({err}); resuming from {alt} (step {ckpt['step']}) instead; "
                f"{path.name} is overwritten at the next save")
        ckpt.notes.append(note)
        log(f"warning: {note}")
        path = alt
    if check is not None:
        check(ckpt, path)
    return ckpt


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
