"""Read finished run folders for a report: resolved config, training events, benchmark records
(file names and readers from ``attnlab.runfolder``).

Records are keyed by their settings (``BenchRecord.settings``): a benchmark name's primary record
(``bench/<name>.json``) is ``RunData.benchmarks[name]``; a record of the same name measured with
other settings (``bench/<name>.<hash8>.json``) gets its own key ``<name>.<label>.<hash8>``, where
the label names the settings that differ (``perplexity.windows-2.1a2b3c4d``), so it lands in a
table of its own, never mixed into the primary one. ``load_runs`` does the same across runs: when
the primary records of one name differ in settings between runs, the most common settings keep
the name and the others get labelled keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from attnlab.bench.context import BenchRecord
from attnlab.errors import AttnlabError
from attnlab.paths import MAX_NAME_LENGTH, check_name
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
    benchmarks: dict[str, BenchRecord] = field(default_factory=dict)   # key (see the module doc) -> record
    settings_labels: dict[str, str] = field(default_factory=dict)      # key -> differing settings, "windows=2"


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
    by_name: dict[str, list[tuple[bool, BenchRecord]]] = {}
    for path in sorted(folder.bench_dir.glob("*.json")):
        try:
            record = BenchRecord(**read_json_object(path, "benchmark record"))
        except (TypeError, AttributeError) as err:
            raise AttnlabError(f"{path}: not a benchmark record ({err})") from None
        check_name(record.benchmark, f"{path}: benchmark")
        by_name.setdefault(record.benchmark, []).append((path.name == f"{record.benchmark}.json", record))
    for name, found in sorted(by_name.items()):
        found.sort(key=lambda item: (not item[0], item[1].meta.get("timestamp") or ""))  # the primary file first
        primary = found[0][1]
        data.benchmarks[name] = primary
        for _, record in found[1:]:
            if record.settings_hash == primary.settings_hash:
                continue  # the same settings measured again under another file name: the primary stands
            key, label = variant_key(name, record.settings, primary.settings, record.settings_hash)
            data.benchmarks[key] = record
            data.settings_labels[key] = label
    return data


# ---------------------------------------------------------------- settings
def differing_settings(settings: list[dict]) -> list[str]:
    """The settings keys whose values are not the same in all of ``settings``, in a stable order."""
    keys = list(dict.fromkeys(k for s in settings for k in s))
    return [k for k in keys if len({_text(s.get(k)) for s in settings}) > 1]


def settings_label(settings: dict, keys: list[str]) -> str:
    """``"windows=2, threads=1"``: the values of ``keys`` in ``settings``."""
    return ", ".join(f"{k}={_text(settings.get(k))}" for k in keys)


def variant_key(name: str, settings: dict, reference: dict, digest: str) -> tuple[str, str]:
    """(report key, label) of a record of benchmark ``name`` measured with ``settings`` beside a
    ``reference`` record of the same name: ``<name>.<label>.<hash8>`` (a safe file name: report
    tables are files), and the label naming the differing settings."""
    keys = differing_settings([settings, reference]) or ["settings"]
    label = settings_label(settings, keys)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(f"{k}-{_text(settings.get(k))}" for k in keys)).strip("-.")
    room = MAX_NAME_LENGTH - len(name) - 10
    key = f"{name}.{slug[:room].rstrip('-.')}.{digest[:8]}" if slug and room > 8 else f"{name}.{digest[:8]}"
    return key, label


def _text(value) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(_text(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}:{_text(v)}" for k, v in value.items())
    return str(value)


def load_runs(run_dirs: list[str | Path]) -> list[RunData]:
    """``load_run`` for each folder (a group folder expands to its run folders,
    ``expand_run_dirs``), then the same benchmark key holding records of different settings in
    different runs is split: the settings most runs share keep the key (ties: the first run's),
    the others get labelled keys (``variant_key``), so no report table mixes settings."""
    runs = [load_run(d) for d in expand_run_dirs(run_dirs)]
    keys = list(dict.fromkeys(k for r in runs for k in r.benchmarks))
    for key in keys:
        holders = [r for r in runs if key in r.benchmarks]
        counts: dict[str, int] = {}
        for r in holders:
            counts[r.benchmarks[key].settings_hash] = counts.get(r.benchmarks[key].settings_hash, 0) + 1
        if len(counts) < 2:
            continue
        keep = max(counts, key=lambda h: counts[h])  # max keeps the first of equal counts
        reference = next(r.benchmarks[key] for r in holders if r.benchmarks[key].settings_hash == keep)
        for r in holders:
            record = r.benchmarks[key]
            if record.settings_hash == keep:
                continue
            new_key, label = variant_key(key, record.settings, reference.settings, record.settings_hash)
            del r.benchmarks[key]
            r.benchmarks[new_key] = record
            r.settings_labels[new_key] = label
            r.settings_labels.pop(key, None)
    # one key per (name, settings) across runs: a plain name where some run holds it there
    canon: dict[tuple[str, str], tuple[str, str | None]] = {}
    for plain_first in (True, False):
        for r in runs:
            for key, rec in r.benchmarks.items():
                if (key == rec.benchmark) == plain_first:
                    canon.setdefault((rec.benchmark, rec.settings_hash), (key, r.settings_labels.get(key)))
    for r in runs:
        renamed, labels = {}, {}
        for key, rec in r.benchmarks.items():
            new_key, label = canon[(rec.benchmark, rec.settings_hash)]
            renamed[new_key] = rec
            if label is not None:
                labels[new_key] = label
        r.benchmarks, r.settings_labels = renamed, labels
    return runs


def expand_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run folders: each path that holds a ``resolved_config.json`` is one; a folder without one
    (a group folder ``<out_dir>/<name>/<group>``) stands for the run folders directly inside it
    that have one, in name order. A path that is neither is a one-line ``AttnlabError``."""
    out: list[Path] = []
    for path in map(Path, paths):
        if RunFolder(path).resolved_config_path.is_file():
            out.append(path)
            continue
        inside = sorted(p for p in path.iterdir() if RunFolder(p).resolved_config_path.is_file()) \
            if path.is_dir() else []
        if not inside:
            raise AttnlabError(f"{path}: not a run folder (no resolved_config.json) nor a group folder "
                               "(no run folders with one inside)")
        out.extend(inside)
    return list(dict.fromkeys(out))
