"""Read finished run folders: resolved config, training events, benchmark records."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from attnlab.bench.context import BenchRecord
from attnlab.errors import AttnlabError
from attnlab.paths import check_name


@dataclass
class RunData:
    key: str                      # "group/run_id"
    run_dir: Path
    config: dict                  # resolved_config.json
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    done: dict | None = None
    meta: dict | None = None
    env: dict | None = None
    benchmarks: dict[str, BenchRecord] = field(default_factory=dict)


def run_key(run_dir: Path) -> str:
    return f"{run_dir.parent.name}/{run_dir.name}"


def _read_json_object(path: Path) -> dict:
    """A JSON object from ``path``; anything else is a one-line error naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise AttnlabError(f"{path}: unreadable run record ({type(err).__name__}: {first})") from None
    if not isinstance(value, dict):
        raise AttnlabError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    resolved = run_dir / "resolved_config.json"
    if not resolved.is_file():
        raise AttnlabError(f"{run_dir}: not a run folder (no resolved_config.json)")
    data = RunData(run_key(run_dir), run_dir, _read_json_object(resolved))
    events = run_dir / "train.jsonl"
    if events.is_file():
        last_step: dict[tuple[str, int], dict] = {}
        try:
            text = events.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise AttnlabError(f"{events}: unreadable ({type(err).__name__})") from None
        lines = text.splitlines()
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                if line_no == len(lines) and not text.endswith("\n"):
                    break  # a torn last line (a write cut short): the events before it stand
                raise AttnlabError(f"{events}:{line_no}: not a JSON event") from None
            if not isinstance(event, dict):
                raise AttnlabError(f"{events}:{line_no}: not a JSON event object")
            kind = event.get("event")
            if kind in ("train", "eval"):
                if not isinstance(event.get("step"), int):
                    raise AttnlabError(f"{events}:{line_no}: {kind} event without an integer step")
                last_step[(kind, event["step"])] = event  # a resumed run repeats steps; the later one counts
            elif kind == "done":
                data.done = event
            elif kind == "meta" and data.meta is None:
                data.meta = event
        data.train = sorted((e for (k, _), e in last_step.items() if k == "train"), key=lambda e: e["step"])
        data.evals = sorted((e for (k, _), e in last_step.items() if k == "eval"), key=lambda e: e["step"])
    env = run_dir / "env.json"
    if env.is_file():
        data.env = _read_json_object(env)
    for path in sorted((run_dir / "bench").glob("*.json")):
        try:
            record = BenchRecord(**_read_json_object(path))
        except TypeError as err:
            raise AttnlabError(f"{path}: not a benchmark record ({err})") from None
        check_name(record.benchmark, f"{path}: benchmark")
        data.benchmarks[record.benchmark] = record
    return data
