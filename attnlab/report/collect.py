"""Read finished run folders for a report: resolved config, training events, benchmark records
(file names and readers from ``attnlab.runfolder``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from attnlab.bench.context import BenchRecord
from attnlab.errors import AttnlabError
from attnlab.paths import check_name
from attnlab.runfolder import RunFolder, read_events, read_json_object


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
    folder = RunFolder(run_dir)
    if not folder.resolved_config_path.is_file():
        raise AttnlabError(f"{folder.path}: not a run folder (no resolved_config.json)")
    data = RunData(run_key(folder.path), folder.path, read_json_object(folder.resolved_config_path, "run record"))
    if folder.events_path.is_file():
        last_step: dict[tuple[str, int], dict] = {}
        for line_no, event in read_events(folder.events_path):
            kind = event.get("event")
            if kind in ("train", "eval"):
                if not isinstance(event.get("step"), int):
                    raise AttnlabError(f"{folder.events_path}:{line_no}: {kind} event without an integer step")
                last_step[(kind, event["step"])] = event  # a resumed run repeats steps; the later one counts
            elif kind == "done":
                data.done = event
            elif kind == "meta" and data.meta is None:
                data.meta = event
        data.train = sorted((e for (k, _), e in last_step.items() if k == "train"), key=lambda e: e["step"])
        data.evals = sorted((e for (k, _), e in last_step.items() if k == "eval"), key=lambda e: e["step"])
    if folder.env_path.is_file():
        data.env = read_json_object(folder.env_path, "run record")
    for path in sorted(folder.bench_dir.glob("*.json")):
        try:
            record = BenchRecord(**read_json_object(path, "benchmark record"))
        except TypeError as err:
            raise AttnlabError(f"{path}: not a benchmark record ({err})") from None
        check_name(record.benchmark, f"{path}: benchmark")
        data.benchmarks[record.benchmark] = record
    return data
