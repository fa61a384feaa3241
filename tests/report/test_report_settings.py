"""Reports keep records of different settings apart: a benchmark measured again with other
settings lands in its own table whose name/caption names the differing settings; `attnlab
report` accepts a group folder."""

import json
from pathlib import Path

from attnlab.bench.context import BenchRecord, bench_settings
from attnlab.cli import main
from attnlab.report import write_report
from attnlab.report.collect import expand_run_dirs, load_run, load_runs
from attnlab.report.tables import benchmark_tables

MODEL = {"vocab_size": 256, "d_model": 32, "num_layers": 2, "block_size": 32,
         "attention": {"type": "standard", "num_heads": 4}}


def _run_folder(group: Path, run_id: str) -> Path:
    run_dir = group / run_id
    (run_dir / "bench").mkdir(parents=True)
    (run_dir / "resolved_config.json").write_text(json.dumps({"model": MODEL}))
    return run_dir


def _record(run_dir: Path, windows: int, ppl: float, *, threads: int = 4, primary: bool = False) -> Path:
    config = {"type": "perplexity", "id": None, "device": "auto", "dtype": "auto", "windows": windows,
              "seq_len": None, "batch_size": 8, "policies": ["fp16"]}
    meta = {"command": f"attnlab bench --windows {windows}", "device": "cpu", "device_name": "cpu",
            "dtype": "float32", "threads": threads, "config": config, "versions": {"torch": "x"}}
    record = BenchRecord("perplexity", "perplexity", f"{run_dir.parent.name}/{run_dir.name}",
                         [{"policy": "fp16", "bytes_per_token": 256, "nll": 2.0, "ppl": ppl}], meta,
                         settings=bench_settings(config, "cpu", "cpu", "float32", threads, None))
    return record.save(run_dir / "bench", primary=primary)


def test_an_ad_hoc_record_with_other_settings_gets_its_own_labelled_table(tmp_path):
    group = tmp_path / "m" / "g"
    base, dba = _run_folder(group, "base"), _run_folder(group, "dba")
    _record(base, 8, 10.3, primary=True)
    _record(dba, 8, 9.8, primary=True)
    ad_hoc = _record(dba, 2, 11.43)  # the issue's `attnlab bench RUN --windows 2`
    assert ad_hoc.name.startswith("perplexity.") and ad_hoc.name != "perplexity.json"
    assert json.loads((dba / "bench/perplexity.json").read_text())["rows"][0]["ppl"] == 9.8  # not overwritten

    files = write_report([base, dba], tmp_path / "r")
    report = json.loads(files.json.read_text())
    assert sorted(r["ppl"] for r in report["tables"]["perplexity"]) == [9.8, 10.3]  # 8 windows only
    (other,) = [name for name in report["tables"] if name.startswith("perplexity.")]
    assert "windows-2" in other and [r["ppl"] for r in report["tables"][other]] == [11.43]
    md = files.markdown.read_text()
    assert other in md and "windows=2" in md   # the table is named, its caption names the settings
    assert (files.folder / "csv" / f"{other}.csv").is_file()
    assert load_run(dba).settings_labels == {other: "windows=2"}


def test_primary_records_of_different_settings_across_runs_are_split(tmp_path):
    group = tmp_path / "m" / "g"
    a, b, c = (_run_folder(group, name) for name in ("a", "b", "c"))
    _record(a, 8, 10.0)
    _record(b, 8, 10.1, threads=1)   # same spec, other thread count
    _record(c, 8, 10.2)
    runs = load_runs([a, b, c])
    assert "perplexity" in runs[0].benchmarks and "perplexity" in runs[2].benchmarks  # the common settings
    (key,) = runs[1].benchmarks
    assert key.startswith("perplexity.threads-1.") and runs[1].settings_labels[key] == "threads=1"
    tables = benchmark_tables(runs)
    assert [r["run"] for r in tables["perplexity"][1].rows] == ["g/a", "g/c"]
    assert [r["run"] for r in tables[key][1].rows] == ["g/b"]


def test_same_settings_across_runs_share_one_table_whatever_their_file_names(tmp_path):
    group = tmp_path / "m" / "g"
    a, b = _run_folder(group, "a"), _run_folder(group, "b")
    _record(a, 8, 10.0)
    _record(a, 2, 11.0)        # beside a's primary
    _record(b, 2, 12.0)        # b's only record of that name: its primary file
    runs = load_runs([a, b])
    (two,) = set(runs[0].benchmarks) - {"perplexity"}
    assert set(runs[1].benchmarks) == {two}   # the 2-window records of a and b under one key
    tables = benchmark_tables(runs)
    assert [r["ppl"] for r in tables[two][1].rows] == [11.0, 12.0]
    assert [r["ppl"] for r in tables["perplexity"][1].rows] == [10.0]


def test_old_records_without_settings_still_load(tmp_path):
    run_dir = _run_folder(tmp_path / "m" / "g", "old")
    (run_dir / "bench/perplexity.json").write_text(json.dumps({
        "benchmark": "perplexity", "type": "perplexity", "run": "g/old", "rows": [{"policy": "fp16", "bytes_per_token": 256, "ppl": 3.0}],
        "meta": {"device": "cpu", "dtype": "float32", "threads": 2, "config": {"type": "perplexity", "windows": 4}}}))
    record = load_run(run_dir).benchmarks["perplexity"]
    assert record.legacy and record.settings["windows"] == 4 and record.settings["threads"] == 2
    assert len(record.settings_hash) == 16
    files = write_report([run_dir], tmp_path / "r")
    assert json.loads(files.json.read_text())["tables"]["perplexity"][0]["ppl"] == 3.0


def test_report_accepts_a_group_folder(tmp_path, capsys):
    group = tmp_path / "m" / "g"
    for name in ("base", "dba"):
        _record(_run_folder(group, name), 8, 10.0, primary=True)
    (group / "report").mkdir()  # the group report folder is no run folder: skipped
    assert expand_run_dirs([group]) == [group / "base", group / "dba"]
    assert expand_run_dirs([group, group / "dba"]) == [group / "base", group / "dba"]
    assert main(["report", str(group), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r/report.md").read_text()
    assert "`g/base`" in md and "`g/dba`" in md
    capsys.readouterr()
    assert main(["report", str(group / "report"), "--out", str(tmp_path / "r2")]) == 2
    assert "not a run folder" in capsys.readouterr().err
