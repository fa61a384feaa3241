"""Benchmark records keyed by their settings: another measurement with other settings is stored
beside, never over, a record; the same settings overwrite it. A finished manifest re-benchmarks
only what is missing or stale; ``rebench`` / ``attnlab run --rebench`` measure everything again."""

import json
import os
from pathlib import Path

import pytest
import yaml

import attnlab.bench.suite as suite
from attnlab.bench.context import BenchRecord, bench_settings
from attnlab.cli import main
from attnlab.manifest import load_plan
from attnlab.run import execute_plan


def _record(windows: int, ppl: float, threads: int = 4) -> BenchRecord:
    config = {"type": "perplexity", "id": None, "device": "auto", "dtype": "auto", "windows": windows}
    return BenchRecord("perplexity", "perplexity", "g/r", [{"ppl": ppl}], {"config": config},
                       settings=bench_settings(config, "cpu", "cpu", "float32", threads, "q8_0"))


def _ppl(path: Path) -> float:
    return json.loads(path.read_text())["rows"][0]["ppl"]


def test_settings_hash_is_stable_and_ignores_the_id():
    a = bench_settings({"type": "perplexity", "id": "x", "windows": 2, "device": "auto"}, "cpu", "cpu",
                       "torch.float32", 4, None)
    b = bench_settings({"windows": 2, "type": "perplexity", "id": "y", "device": "cpu"}, "cpu", "cpu",
                       "float32", 4, None)
    ra, rb = BenchRecord("p", "perplexity", "g/r", [], settings=a), BenchRecord("p", "perplexity", "g/r", [], settings=b)
    assert ra.settings_hash == rb.settings_hash and len(ra.settings_hash) == 16
    assert _record(2, 1.0).settings_hash != _record(2, 1.0, threads=1).settings_hash


def test_other_settings_are_stored_beside_and_the_same_settings_overwrite(tmp_path):
    bench = tmp_path / "bench"
    first = _record(8, 10.0).save(bench)
    assert first.name == "perplexity.json"
    beside = _record(2, 11.0).save(bench)
    assert beside.name == f"perplexity.{_record(2, 0).settings_hash[:8]}.json"
    assert _ppl(first) == 10.0 and _ppl(beside) == 11.0
    assert _record(2, 12.0).save(bench) == beside and _ppl(beside) == 12.0   # a re-measurement
    assert _record(8, 9.0).save(bench) == first and _ppl(first) == 9.0
    assert len(list(bench.glob("*.json"))) == 2


def test_a_primary_record_moves_the_old_one_aside(tmp_path):
    bench = tmp_path / "bench"
    _record(8, 10.0).save(bench)
    assert _record(4, 7.0).save(bench, primary=True).name == "perplexity.json"
    assert _ppl(bench / "perplexity.json") == 7.0
    assert _ppl(bench / f"perplexity.{_record(8, 0).settings_hash[:8]}.json") == 10.0


def test_an_old_record_without_settings_is_replaced_by_the_same_measurement(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    config = {"type": "perplexity", "id": None, "device": "auto", "dtype": "auto", "windows": 8}
    (bench / "perplexity.json").write_text(json.dumps({
        "benchmark": "perplexity", "type": "perplexity", "run": "g/r", "rows": [{"ppl": 1.0}],
        "meta": {"device": "cpu", "device_name": "cpu", "dtype": "float32", "threads": 4, "config": config}}))
    old = BenchRecord.load(bench / "perplexity.json")
    assert old.legacy and old.same_settings(_record(8, 0).settings)   # its policy went unrecorded
    assert _record(8, 2.0).save(bench).name == "perplexity.json"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("records")
    corpus = tmp / "corpus.txt"
    corpus.write_text("a stitch in time saves nine; " * 300)
    manifest = {
        "version": 1, "name": "rec", "defaults": {"out_dir": str(tmp / "runs")},
        "model": {"vocab_size": 256, "d_model": 32, "num_layers": 2, "block_size": 32,
                  "attention": {"type": "standard", "num_heads": 4}},
        "data": {"source": "text", "path": str(corpus), "tokenizer": {"type": "byte"}},
        "train": {"steps": 2, "batch_size": 4, "eval_every": 2, "eval_batches": 1, "log_every": 2},
        "groups": [{"name": "g", "runs": [{"id": "a"}, {"id": "b"}],
                    "benchmarks": [{"type": "perplexity", "windows": 2, "policies": ["fp16"]}]}],
    }
    path = tmp / "rec.yml"
    path.write_text(yaml.safe_dump(manifest))
    assert main(["run", str(path)]) == 0
    return path


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = suite.run_benchmark

    def counting(cfg, target, command=""):
        calls.append((target.key, cfg.name, cfg.windows))
        return real(cfg, target, command)

    monkeypatch.setattr(suite, "run_benchmark", counting)
    return calls


def test_ad_hoc_bench_with_other_settings_does_not_overwrite(finished, counted):
    bench = finished.parent / "runs/rec/g/a/bench"
    declared = (bench / "perplexity.json").read_bytes()
    assert main(["bench", str(bench.parent), "--suite", "perplexity", "--windows", "1", "--policies", "fp16"]) == 0
    assert (bench / "perplexity.json").read_bytes() == declared
    (ad_hoc,) = [p for p in bench.glob("perplexity.*.json")]
    assert json.loads(ad_hoc.read_text())["settings"]["windows"] == 1
    assert main(["bench", str(bench.parent), "--suite", "perplexity", "--windows", "1", "--policies", "fp16"]) == 0
    assert list(bench.glob("perplexity.*.json")) == [ad_hoc]   # same settings: overwritten
    ad_hoc.unlink()


def test_rerunning_a_finished_plan_benchmarks_only_what_is_stale(finished, counted, capsys):
    plan = load_plan(finished, [])
    execute_plan(plan)
    assert counted == []                                        # every record fresh
    assert "up to date" in capsys.readouterr().out
    execute_plan(plan, rebench=True)
    assert [c[0] for c in counted] == ["g/a", "g/b"]
    counted.clear()

    record = finished.parent / "runs/rec/g/b/bench/perplexity.json"
    earlier = (finished.parent / "runs/rec/g/b/best.pt").stat().st_mtime - 10
    os.utime(record, (earlier, earlier))                        # b's checkpoint newer than its record
    execute_plan(plan)
    assert counted == [("g/b", "perplexity", 2)]
    counted.clear()

    (finished.parent / "runs/rec/g/a/bench/perplexity.json").unlink()   # a's record missing
    execute_plan(plan)
    assert counted == [("g/a", "perplexity", 2)]
    counted.clear()

    changed = load_plan(finished, [], group=None)
    changed.benchmarks["g"][0] = changed.benchmarks["g"][0].model_copy(update={"windows": 1})
    execute_plan(changed)                                       # settings changed: both again
    assert counted == [("g/a", "perplexity", 1), ("g/b", "perplexity", 1)]
    bench = finished.parent / "runs/rec/g/a/bench"
    assert json.loads((bench / "perplexity.json").read_text())["settings"]["windows"] == 1
    assert [json.loads(p.read_text())["settings"]["windows"] for p in bench.glob("perplexity.*.json")] == [2]
    counted.clear()

    assert main(["run", str(finished), "--rebench"]) == 0
    assert [c[0] for c in counted] == ["g/a", "g/b"]


def test_a_long_name_still_fits_its_hashed_file_name(tmp_path):
    name = "p" * 100
    config = {"type": "perplexity", "id": name, "windows": 2}
    records = [BenchRecord(name, "perplexity", "g/r", [{"ppl": w}], {"config": {**config, "windows": w}},
                           settings=bench_settings({**config, "windows": w}, "cpu", "cpu", "float32", 1, None))
               for w in (1, 2)]
    paths = [r.save(tmp_path) for r in records]
    assert paths[0].name == f"{name}.json" and len(paths[1].name) == 100 + len(".json")
    assert [p for p, _ in suite.saved_records(tmp_path, name)] == paths
