"""What a benchmark gets to work with, and the record it produces."""

from __future__ import annotations

import datetime as _dt
import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnlab._version import __version__
from attnlab.fsutil import atomic_write_text, write_error
from attnlab.paths import safe_child


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

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, folder: Path) -> Path:
        """Write ``<folder>/<benchmark>.json`` atomically (the name checked to be a safe file name
        inside ``folder``; a failed write is a one-line error and the previous record stays)."""
        path = safe_child(folder, self.benchmark, "benchmark id", ".json")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(folder, err, "cannot create folder") from None
        return atomic_write_text(path,
                                 json.dumps(self.to_dict(), indent=2, default=_jsonable))

    @classmethod
    def load(cls, path: Path) -> "BenchRecord":
        return cls(**json.loads(Path(path).read_text()))


def _jsonable(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def bench_provenance(ctx: BenchContext, config: dict) -> dict:
    """Device, dtype, versions, command and benchmark config for a record."""
    device_name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else platform.processor() or "cpu"
    versions = {"attnlab": __version__, "torch": torch.__version__, "python": platform.python_version(),
                "numpy": np.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return {"command": ctx.command, "device": str(ctx.device), "device_name": device_name,
            "dtype": str(ctx.dtype).replace("torch.", ""), "versions": versions, "config": config,
            "params": ctx.model.num_parameters(), "threads": torch.get_num_threads(),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
