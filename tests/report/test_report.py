"""Report folders: a manifest run writes one per group; `attnlab report` regenerates identical
tables from the saved run folders without re-measuring anything."""

import json
from pathlib import Path

import pytest
import yaml

from attnlab.cli import main
from attnlab.report import write_report
from attnlab.report.tables import Table, fmt, latex_escape


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    corpus = tmp / "corpus.txt"
    corpus.write_text("a stitch in time saves nine; " * 300)
    manifest = {
        "version": 1, "name": "rep", "defaults": {"out_dir": str(tmp / "runs")},
        "model": {"vocab_size": 256, "d_model": 32, "num_layers": 2, "block_size": 32,
                  "attention": {"type": "standard", "num_heads": 4}},
        "data": {"source": "text", "path": str(corpus), "tokenizer": {"type": "byte"}},
        "train": {"steps": 4, "batch_size": 4, "eval_every": 2, "eval_batches": 2, "log_every": 2},
        "groups": [{"name": "g", "runs": [
            {"id": "base"},
            {"id": "dba", "model": {"attention": {"type": "decoupled", "num_heads": 4, "sem_dim": 8, "geo_dim": 32}}},
        ], "benchmarks": [{"type": "perplexity", "windows": 2, "policies": ["fp16", "q4_0"]}]}],
    }
    path = tmp / "rep.yml"
    path.write_text(yaml.safe_dump(manifest))
    assert main(["run", str(path)]) == 0
    return tmp


def test_run_writes_a_group_report_with_tables_plots_and_records(trained):
    folder = trained / "runs" / "rep" / "g" / "report"
    for name in ("report.md", "report.json", "csv/summary.csv", "csv/perplexity.csv", "csv/curves.csv",
                 "tables/summary.tex", "tables/perplexity.tex", "loss_curves.png", "pareto_ppl_vs_kv_bytes.png"):
        assert (folder / name).is_file(), name
    record = json.loads((trained / "runs/rep/g/dba/bench/perplexity.json").read_text())
    assert record["type"] == "perplexity" and {r["policy"] for r in record["rows"]} == {"fp16", "q4_0"}
    for key in ("device", "dtype", "versions", "command", "config"):
        assert key in record["meta"], key
    md = (folder / "report.md").read_text()
    assert "![loss_curves](loss_curves.png)" in md and "| g/dba |" in md
    tex = (folder / "tables/perplexity.tex").read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex


def test_report_command_regenerates_identical_tables(trained, tmp_path, capsys):
    runs = [str(trained / "runs/rep/g/base"), str(trained / "runs/rep/g/dba")]
    before = {p: p.stat().st_mtime_ns for p in (trained / "runs/rep/g/dba/bench").glob("*.json")}
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert main(["report", *runs, "--out", str(out_a), "--title", "t"]) == 0
    assert main(["report", *runs, "--out", str(out_b), "--title", "t"]) == 0
    assert "LaTeX tables" in capsys.readouterr().out
    for rel in ("csv/summary.csv", "csv/perplexity.csv", "csv/curves.csv", "tables/summary.tex",
                "tables/perplexity.tex"):
        assert (out_a / rel).read_bytes() == (out_b / rel).read_bytes(), rel
    # the group report written during the run has the same tables
    group = trained / "runs/rep/g/report"
    assert (out_a / "tables/perplexity.tex").read_bytes() == (group / "tables/perplexity.tex").read_bytes()
    # nothing was re-measured
    assert before == {p: p.stat().st_mtime_ns for p in (trained / "runs/rep/g/dba/bench").glob("*.json")}


def test_every_table_number_traces_to_a_record(trained, tmp_path):
    files = write_report([trained / "runs/rep/g/dba"], tmp_path / "r")
    report = json.loads(files.json.read_text())
    rows = report["tables"]["perplexity"]
    record_rows = report["runs"][0]["benchmarks"]["perplexity"]["rows"]
    assert [r["ppl"] for r in rows] == [r["ppl"] for r in record_rows]
    tex = (tmp_path / "r/tables/perplexity.tex").read_text()
    assert all(fmt(r["ppl"]) in tex for r in rows)


def test_bench_command_on_a_manifest_rewrites_records_and_report(trained, capsys):
    manifest = trained / "rep.yml"
    assert main(["bench", str(manifest), "--suite", "perplexity"]) == 0
    assert "report:" in capsys.readouterr().out


def test_latex_escaping_and_number_formatting():
    assert latex_escape("k_sem=q4_0 & 50%") == r"k\_sem=q4\_0 \& 50\%"
    assert fmt(1234567) == "1,234,567" and fmt(0.000012) == "1.200e-05" and fmt(None) == "-" and fmt(True) == "yes"
    t = Table("x", "X", ["a", "b"], [{"a": "p", "b": 1.5}])
    assert t.to_csv() == "a,b\np,1.5\n"
    assert "| p | 1.5 |" in t.to_markdown(["a", "b"])


def test_report_on_a_non_run_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_arms_table_aggregates_seeds_with_t_intervals(tmp_path):
    from attnlab.report.tables import T_975, arms_table, seed_interval

    mean, lo, hi = seed_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and abs((hi - mean) - T_975[2] * 1.0 / 3 ** 0.5) < 1e-12 and lo < mean < hi
    assert seed_interval([4.0]) == (4.0, None, None) and seed_interval([None]) is None
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    manifest = {
        "version": 1, "name": "arms", "defaults": {"out_dir": str(tmp_path / "runs")},
        "model": {"vocab_size": 256, "d_model": 32, "num_layers": 1, "block_size": 32,
                  "attention": {"type": "attamba", "num_heads": 2, "chunk_size": 4, "window": 4}},
        "data": {"source": "text", "path": str(corpus), "tokenizer": {"type": "byte"}},
        "train": {"steps": 2, "batch_size": 2, "eval_every": 2, "eval_batches": 1, "log_every": 1},
        "groups": [{"name": "g", "runs": [{"id": "a", "seeds": [0, 1, 2]}, {"id": "plain"}]}],
    }
    path = tmp_path / "arms.yml"
    path.write_text(yaml.safe_dump(manifest))
    assert main(["run", str(path)]) == 0
    md = (tmp_path / "runs/arms/g/report/report.md").read_text()
    assert "## Arms over seeds" in md and "| g/a |" in md and "| g/plain |" not in md.split("## Arms")[1].split("##")[0]
    from attnlab.report.collect import load_runs

    runs = load_runs(sorted((tmp_path / "runs/arms/g").glob("a-s*")))
    (row,) = arms_table(runs).rows
    losses = [r.done["val_loss"] for r in runs]
    assert row["seeds"] == 3 and abs(row["val_loss"] - sum(losses) / 3) < 1e-12
    assert row["val_loss_low"] < row["val_loss"] < row["val_loss_high"]
    # attamba at P = 4: fp16 boundary rows (k + v, 2 heads x 16) per 4 tokens, plus window and states
    per_token = 2 * 32 * 2 / 4
    assert per_token < row["kv_bytes_per_token_128k"] < row["kv_bytes_per_token_2k"]
