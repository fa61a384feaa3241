"""``train.jsonl``: one JSON object per line (``{"event": ..., "time": ..., ...}``), appended
and flushed per event; rank 0 writes, other ranks hold a disabled log."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no inf/nan
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class EventLog:
    def __init__(self, path: Path | None):
        self.path = path

    def write(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **_jsonable(fields)}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_events(path: Path, event: str | None = None) -> list[dict[str, Any]]:
    """Events from ``path`` (optionally one kind), in file order."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if event is None or record.get("event") == event:
                out.append(record)
    return out
