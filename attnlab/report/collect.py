"""Read finished run folders: resolved config, training events, benchmark records."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from attnlab.bench.context import BenchRecord
from attnlab.errors import AttnlabError


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


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    resolved = run_dir / "resolved_config.json"
    if not resolved.is_file():
        raise AttnlabError(f"{run_dir}: not a run folder (no resolved_config.json)")
    data = RunData(run_key(run_dir), run_dir, json.loads(resolved.read_text()))
    events = run_dir / "train.jsonl"
    if events.is_file():
        last_step: dict[tuple[str, int], dict] = {}
        for line_no, line in enumerate(events.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                raise AttnlabError(f"{events}:{line_no}: not a JSON event") from None
            kind = event.get("event")
            if kind in ("train", "eval"):
                last_step[(kind, event["step"])] = event  # a resumed run repeats steps; the later one counts
            elif kind == "done":
                data.done = event
            elif kind == "meta" and data.meta is None:
                data.meta = event
        data.train = sorted((e for (k, _), e in last_step.items() if k == "train"), key=lambda e: e["step"])
        data.evals = sorted((e for (k, _), e in last_step.items() if k == "eval"), key=lambda e: e["step"])
    env = run_dir / "env.json"
    if env.is_file():
        data.env = json.loads(env.read_text())
    for path in sorted((run_dir / "bench").glob("*.json")):
        record = BenchRecord.load(path)
        data.benchmarks[record.benchmark] = record
    return data
