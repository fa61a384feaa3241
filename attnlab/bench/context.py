"""What a benchmark gets to work with, and the record it produces."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnlab._version import __version__
from attnlab.errors import AttnlabError
from attnlab.fsutil import atomic_write_text, write_error
from attnlab.paths import MAX_NAME_LENGTH, safe_child


@dataclass
class BenchContext:
    """``model`` is in eval mode on ``device`` in the benchmark dtype. ``heldout``: the run's
    held-out tokens (None for a bare checkpoint without data). ``load_reference(run_id)`` loads
    another run of the same group (quality smoke)."""

    model: Any
    device: torch.device
    dtype: torch.dtype
    run_key: str
    command: str = ""
    heldout: np.ndarray | None = None
    tokenizer: Any = None
    cache_policy: str | None = None
    load_reference: Callable[[str], Any] | None = None
    align: int = 1   # >1: held-out tokens are documents of this length (windows start at their starts)


@dataclass
class BenchRecord:
    """One benchmark's result for one model: flat rows plus provenance."""

    benchmark: str                  # the benchmark's name (its id, else its type)
    type: str
    run: str                        # run key "group/id" or a checkpoint label
    rows: list[dict]
    meta: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)   # what the numbers depend on (see ``bench_settings``)
    settings_hash: str = ""                        # ``settings_hash(settings)``; "" in records older than it

    def __post_init__(self):
        self.legacy = not self.settings  # an older record: settings as far as its provenance knows them
        if self.legacy:
            self.settings = legacy_settings(self.type, self.meta)
        if not self.settings_hash:
            self.settings_hash = settings_hash(self.settings)

    def same_settings(self, settings: dict) -> bool:
        """Whether this record was measured with ``settings`` (an older record, whose cache
        policy went unrecorded, matches on the settings it knows)."""
        if self.legacy and self.meta.get("cache_policy") is None:
            settings = {**settings, "cache_policy": None}
        return settings_hash(settings) == self.settings_hash

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, folder: Path, *, primary: bool = False) -> Path:
        """Write the record atomically beside, never over, a record of the same name measured
        with other settings. ``<folder>/<benchmark>.json`` holds the name's primary record (the
        manifest-declared one): it is written when free or holding the same settings (a
        re-measurement); otherwise the record goes to ``<folder>/<benchmark>.<hash8>.json`` -- or,
        with ``primary``, the record there moves aside to its own hashed name first. The name is
        checked to be a safe file name inside ``folder``; a failed write is a one-line error and
        the previous record stays."""
        plain = safe_child(folder, self.benchmark, "benchmark id", ".json")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(folder, err, "cannot create folder") from None
        existing = _peek(plain)
        path = plain
        if existing is not None and not existing.same_settings(self.settings):
            if primary and existing.benchmark == self.benchmark:
                aside = existing.hashed_path(folder)
                try:
                    os.replace(plain, aside)
                except OSError as err:
                    raise write_error(aside, err, "cannot move the previous record aside") from None
            else:
                path = self.hashed_path(folder)
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=_jsonable))

    def hashed_path(self, folder: Path) -> Path:
        """``<folder>/<benchmark>.<hash8>.json``: where a non-primary record of these settings lives."""
        stem = self.benchmark[:MAX_NAME_LENGTH - 9]  # room for ".<hash8>" within a file name's limit
        return safe_child(folder, f"{stem}.{self.settings_hash[:8]}", "benchmark id", ".json")

    @classmethod
    def load(cls, path: Path) -> "BenchRecord":
        return cls(**json.loads(Path(path).read_text()))


def _peek(path: Path) -> "BenchRecord | None":
    """The record at ``path``; None when there is none or it is no readable record (such a file
    holds no measurement to keep: it is replaced)."""
    if not path.is_file():
        return None
    try:
        return BenchRecord(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def bench_settings(config: dict, device: str, device_name: str, dtype: str, threads: int,
                   cache_policy: str | None) -> dict:
    """A record's settings: the benchmark spec (its type and fields; not its ``id``, and the
    requested ``device``/``dtype`` replaced by the resolved ones), device, dtype, intra-op
    thread count and the run's cache policy. Two measurements with equal settings are
    comparable; a re-measurement with equal settings replaces the record."""
    spec = {k: v for k, v in config.items() if k not in ("id", "device", "dtype")}
    return {**spec, "device": device, "device_name": device_name, "dtype": dtype.replace("torch.", ""),
            "threads": threads, "cache_policy": cache_policy}


def legacy_settings(kind: str, meta: dict) -> dict:
    """``bench_settings`` of a record written before records kept their settings (from its
    provenance; the cache policy, not recorded then, is taken from ``meta`` when present)."""
    config = dict(meta.get("config") or {"type": kind})
    return bench_settings(config, str(meta.get("device")), str(meta.get("device_name", meta.get("device"))),
                          str(meta.get("dtype")), meta.get("threads"), meta.get("cache_policy"))


def settings_hash(settings: dict) -> str:
    """A stable short (16 hex digits) hash of ``settings`` (key order does not matter)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def describe_device(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def context_settings(ctx: BenchContext, config: dict) -> dict:
    """``bench_settings`` for a benchmark ``config`` run in ``ctx``."""
    return bench_settings(config, str(ctx.device), describe_device(ctx.device), str(ctx.dtype),
                          torch.get_num_threads(), ctx.cache_policy)


def bench_provenance(ctx: BenchContext, config: dict) -> dict:
    """Device, dtype, versions, command, cache policy and benchmark config for a record."""
    versions = {"attnlab": __version__, "torch": torch.__version__, "python": platform.python_version(),
                "numpy": np.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return {"command": ctx.command, "device": str(ctx.device), "device_name": describe_device(ctx.device),
            "dtype": str(ctx.dtype).replace("torch.", ""), "versions": versions, "config": config,
            "params": ctx.model.num_parameters(), "threads": torch.get_num_threads(),
            "cache_policy": ctx.cache_policy,
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def bench_tokenizer(cfg, ctx: "BenchContext"):
    """The run's tokenizer, else GPT-2 from ``cfg.tokenizer_path``; an ``AttnlabError`` without either
    or when it has more tokens than the model."""
    tok, path = ctx.tokenizer, getattr(cfg, "tokenizer_path", None)
    if tok is None and path is not None:
        from attnlab.config.data import TokenizerConfig
        from attnlab.data.tokenizers import build_tokenizer

        tok = build_tokenizer(TokenizerConfig(type="gpt2", path=path))
    if tok is None:
        raise AttnlabError(f"{getattr(cfg, 'type', 'this')} benchmark needs a tokenizer: the run has none (a bare checkpoint?); "
                           "set the benchmark's tokenizer_path to a local .tiktoken file for GPT-2-tokenized models")
    vocab = ctx.model.config.vocab_size
    if tok.vocab_size > vocab:
        raise AttnlabError(f"tokenizer {getattr(tok, 'name', tok)!r} has {tok.vocab_size} tokens but the model's "
                           f"vocab_size is {vocab}")
    return tok
