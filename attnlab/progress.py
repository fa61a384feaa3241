"""Training progress display: a rich progress bar on a terminal, plain log lines otherwise.

Plain lines look like ``step 120/400 | loss 3.21 | 18.2k tok/s | eta 1m02s``: tok/s and the ETA
come from the same window (the steps since the previous log line), so a machine that slows down
shows it in both. Only the main rank prints; other ranks construct a disabled instance.
"""

from __future__ import annotations

import math
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO


def format_rate(tokens_per_s: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if tokens_per_s >= scale:
            return f"{tokens_per_s / scale:.1f}{suffix}"
    return f"{tokens_per_s:.0f}"


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def eta_seconds(remaining_steps: int, window_steps: int, window_seconds: float) -> float | None:
    """Seconds left at the recent pace: ``remaining_steps`` at ``window_seconds / window_steps``
    per step (the window of the printed tok/s). None when the window is empty."""
    if window_steps <= 0 or window_seconds <= 0 or not math.isfinite(window_seconds):
        return None
    return max(remaining_steps, 0) * window_seconds / window_steps


class Progress:
    """``update`` after every step (the bar moves), ``log_train`` at log steps, ``note`` for
    other one-line messages (evaluation, checkpoints); ``close`` at the end. Usable as a context
    manager."""

    def __init__(self, total_steps: int, start_step: int = 0, *, enabled: bool = True,
                 stream: TextIO | None = None, rich: bool | None = None, label: str = "train"):
        self.total, self.enabled = total_steps, enabled
        self.stream = stream if stream is not None else sys.stdout
        use_rich = rich if rich is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        if enabled and use_rich:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeRemainingColumn)
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                console=Console(file=self.stream), transient=False)
            self._task = self._bar.add_task(label, total=total_steps, completed=start_step, stats="")
            self._bar.start()

    def update(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def log_train(self, step: int, loss: float, tokens_per_s: float, eta_s: float | None) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            stats = f"loss {loss:.3f} | {format_rate(tokens_per_s)} tok/s"
            self._bar.update(self._task, completed=step, stats=stats)
        else:
            self._print(f"step {step}/{self.total} | loss {loss:.3f} | "
                        f"{format_rate(tokens_per_s)} tok/s | eta {format_duration(eta_s)}")

    def note(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(message)
        else:
            self._print(message)

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def byte_progress(label: str, stream: TextIO | None = None) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done_bytes, total_bytes)`` callback for long reads (``prepare``): a rich bar
    with throughput on a terminal, a plain line every 10% otherwise."""
    stream = stream if stream is not None else sys.stdout
    start = time.perf_counter()
    if getattr(stream, "isatty", lambda: False)():
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)
        bar = RichProgress(TextColumn(f"[bold]{label}"), BarColumn(), DownloadColumn(),
                           TransferSpeedColumn(), TimeRemainingColumn(), console=Console(file=stream))
        task = bar.add_task(label, total=None)
        with bar:
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    next_tenth = [1]

    def plain(done: int, total: int) -> None:
        if total and done * 10 >= next_tenth[0] * total:
            next_tenth[0] = done * 10 // total + 1
            elapsed = time.perf_counter() - start
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = (total - done) / rate if rate > 0 else None
            print(f"{label}: {100 * done / total:.0f}% of {total / 1e6:.1f} MB | {rate / 1e6:.1f} MB/s | "
                  f"eta {format_duration(eta)}", file=stream, flush=True)

    yield plain
