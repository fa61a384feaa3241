"""``train.jsonl``: one JSON object per line (``{"event": ..., "time": ..., ...}``), appended
and flushed per event; rank 0 writes, other ranks hold a disabled log.

Each event is one ``write`` of a complete line; when that write fails (a full disk) the file is
cut back to where it was, so no partial line is left. A torn last line that a hard crash left
anyway (no trailing newline, or a final line that is not JSON) is cut off by ``repair()``, which
runs before the first event of a session is appended, so it is never glued to the next event.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from attnlab.errors import AttnlabError

_TAIL = 1 << 16


class EventLogError(AttnlabError, OSError):
    """``train.jsonl`` could not be written (e.g. a full disk); the file is as it was."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no inf/nan
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _parses(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line.decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def repair_events(path: Path) -> str | None:
    """Cut a torn tail off ``path``: bytes after the last newline, then a last line that is not a
    JSON object (at most one: anything earlier is the report's business). Returns a one-line
    description of what was cut, or None when the file was intact (or absent)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    with open(path, "rb+") as f:
        # find the last newline, scanning backwards
        end, pos, last_nl = size, size, -1
        while pos > 0 and last_nl < 0:
            start = max(0, pos - _TAIL)
            f.seek(start)
            chunk = f.read(pos - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                last_nl = start + idx
            pos = start
        keep = last_nl + 1  # 0 when there is no newline at all
        cut_partial = end - keep
        # the last complete line must parse
        cut_line = 0
        if keep > 0:
            prev = keep - 1
            start = prev
            while start > 0:
                lo = max(0, start - _TAIL)
                f.seek(lo)
                chunk = f.read(start - lo)
                idx = chunk.rfind(b"\n")
                if idx >= 0:
                    start = lo + idx + 1
                    break
                start = lo
            f.seek(start)
            line = f.read(prev - start)
            if line.strip() and not _parses(line):
                cut_line = keep - start
                keep = start
        if keep == end:
            return None
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    parts = []
    if cut_partial:
        parts.append(f"a torn last line ({cut_partial} bytes without a newline)")
    if cut_line:
        parts.append(f"a last line that is not JSON ({cut_line} bytes)")
    return f"{path}: cut {' and '.join(parts)}, left by an interrupted write"


class EventLog:
    """Appends events to ``path`` (None: a disabled log, as on ranks other than 0); ``sink``, when
    set, is called with ``(event, fields)`` after each event is written (experiment tracking)."""

    def __init__(self, path: Path | None, sink=None):
        self.path = path
        self.sink = sink
        self._repaired = False

    def repair(self) -> str | None:
        """``repair_events`` once per log (the first ``write`` does it too)."""
        self._repaired = True
        if self.path is None:
            return None
        try:
            return repair_events(self.path)
        except OSError as err:
            raise EventLogError(f"{self.path}: cannot repair the event log ({err.strerror or err})") from None

    def write(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        if not self._repaired:
            self.repair()
        record = {"event": event, "time": round(time.time(), 3), **_jsonable(fields)}
        data = (json.dumps(record) + "\n").encode("utf-8")
        try:
            f = open(self.path, "ab", buffering=0)
        except OSError as err:
            raise EventLogError(f"{self.path}: cannot write event {event!r} ({err.strerror or err})") from None
        with f:
            pos = f.seek(0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    n = f.write(view)
                    if not n:
                        raise OSError(28, "short write")
                    view = view[n:]
            except OSError as err:
                try:
                    f.truncate(pos)
                except OSError:
                    pass
                raise EventLogError(f"{self.path}: cannot write event {event!r} ({err.strerror or err}); "
                                    "the log is as it was") from None
        if self.sink is not None:
            self.sink(event, fields)


def read_events(path: Path, event: str | None = None) -> list[dict[str, Any]]:
    """Events from ``path`` (optionally one kind), in file order. A torn last line (no trailing
    newline and not JSON) is ignored."""
    out = []
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1 and not text.endswith("\n"):
                    break
                raise
            if event is None or record.get("event") == event:
                out.append(record)
    return out
