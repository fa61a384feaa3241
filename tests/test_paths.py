"""Paths built from user strings (run/group/manifest names, benchmark ids, run references, report
table names) stay safe file names inside their folder: one-line errors, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from attnlab.bench.context import BenchRecord
from attnlab.cli import main
from attnlab.errors import AttnlabError, ConfigError
from attnlab.paths import MAX_NAME_LENGTH, check_name, is_within, safe_child

BAD = ["../../../../escaped", "../resolved_config", "a/b", ".hidden", "..", ".", "", "a\\b", "x y", "a\x00b",
       "é", "x" * (MAX_NAME_LENGTH + 1), "x" * 300]


@pytest.mark.parametrize("name", ["base", "dba-1.5", "A_b.c-9", "x" * MAX_NAME_LENGTH, "7"])
def test_safe_names_pass(name, tmp_path):
    assert check_name(name, "k") == name
    assert safe_child(tmp_path, name, "k", ".json") == tmp_path / f"{name}.json"


@pytest.mark.parametrize("name", BAD)
def test_unsafe_names_are_one_line_config_errors_naming_key_and_value(name, tmp_path):
    with pytest.raises(ConfigError) as info:
        safe_child(tmp_path, name, "groups(g).benchmarks[0].id")
    text = str(info.value)
    assert text.startswith("groups(g).benchmarks[0].id: ") and "\n" not in text
    assert len(text) < 300  # a long value is shortened in the message
    assert list(tmp_path.iterdir()) == []


def test_non_strings_are_refused():
    for value in (None, 5, ["a"]):
        with pytest.raises(ConfigError):
            check_name(value, "k")


def test_is_within(tmp_path):
    assert is_within(tmp_path / "a" / "b", tmp_path)
    assert not is_within(tmp_path / ".." / "x", tmp_path)


def test_bench_record_save_refuses_traversal(tmp_path):
    run = tmp_path / "run"
    (run / "resolved_config.json").parent.mkdir()
    (run / "resolved_config.json").write_text("{}")
    for bad in ("../resolved_config", "../../escaped", "a/b"):
        with pytest.raises(ConfigError, match="benchmark id"):
            BenchRecord(bad, "perplexity", "g/r", []).save(run / "bench")
    assert (run / "resolved_config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["resolved_config.json", "run"]


def _manifest(tmp_path: Path, *, run_id: str = "base", group: str = "g", bench_id: str | None = None) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    group_spec = {"name": group, "runs": [{"id": run_id}]}
    if bench_id is not None:
        group_spec["benchmarks"] = [{"type": "perplexity", "id": bench_id, "windows": 1, "policies": ["fp16"]}]
    manifest = {
        "version": 1, "name": "tiny", "defaults": {"out_dir": str(tmp_path / "runs")},
        "model": {"vocab_size": 256, "d_model": 16, "num_layers": 1, "block_size": 16,
                  "attention": {"type": "standard", "num_heads": 2}},
        "data": {"source": "text", "path": str(corpus), "tokenizer": {"type": "byte"}},
        "train": {"steps": 2, "batch_size": 2, "eval_every": 2, "eval_batches": 1, "log_every": 1, "device": "cpu"},
        "groups": [group_spec],
    }
    path = tmp_path / "tiny.yml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def _one_line_exit_2(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def _written(tmp_path: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                  if p.name not in ("tiny.yml", "corpus.txt"))


@pytest.mark.parametrize("bench_id", ["../../../../escaped", "../resolved_config", "a/b", "x" * 300])
def test_traversal_benchmark_ids_fail_before_anything_is_written(bench_id, tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    err = _one_line_exit_2(capsys, ["run", str(_manifest(work, bench_id=bench_id))])
    assert "benchmarks[0].id" in err
    assert _written(work) == []  # no run folder, no record outside it
    assert not (tmp_path / "escaped.json").exists()


def test_a_300_character_run_name_is_a_one_line_error(tmp_path, capsys):
    err = _one_line_exit_2(capsys, ["run", str(_manifest(tmp_path, run_id="r" * 300))])
    assert "id" in err and "at most 100 characters" in err and "<300 characters>" in err and len(err) < 400
    assert _written(tmp_path) == []


@pytest.mark.parametrize("group", [".hidden", "g" * 101])
def test_unsafe_group_names_are_one_line_errors(group, tmp_path, capsys):
    _one_line_exit_2(capsys, ["run", str(_manifest(tmp_path, group=group))])
    assert _written(tmp_path) == []


def test_report_refuses_a_record_whose_name_leads_outside(tmp_path, capsys):
    run = tmp_path / "runs" / "g" / "r"
    (run / "bench").mkdir(parents=True)
    (run / "resolved_config.json").write_text("{}")
    (run / "bench" / "evil.json").write_text(
        '{"benchmark": "../../../escaped", "type": "perplexity", "run": "g/r", "rows": [], "meta": {}}')
    err = _one_line_exit_2(capsys, ["report", str(run), "--out", str(tmp_path / "report")])
    assert "escaped" in err
    assert not (tmp_path / "report").exists() and not any(tmp_path.rglob("escaped*"))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_report_on_a_malformed_resolved_config_is_one_line(text, tmp_path, capsys):
    run = tmp_path / "g" / "r"
    run.mkdir(parents=True)
    (run / "resolved_config.json").write_bytes(text.encode("latin-1"))
    err = _one_line_exit_2(capsys, ["report", str(run), "--out", str(tmp_path / "report")])
    assert "resolved_config.json" in err


def test_run_reference_cannot_leave_the_group(tmp_path):
    from attnlab.upcycling import resolve_ref

    class Run:
        run_dir, group, run_id = tmp_path / "out" / "m" / "g" / "r", "g", "r"

    assert resolve_ref("run:teacher", Run) == tmp_path / "out" / "m" / "g" / "teacher"
    with pytest.raises(AttnlabError, match="run:../../x"):
        resolve_ref("run:../../x", Run)
