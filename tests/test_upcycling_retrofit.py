"""``mode: retrofit``: a zero-training Butterfly retrofit of an earlier run of the group, planned
(the model config derived from the teacher's) and executed (same weights, held-out eval,
benchmarks, resume), and its one-line errors."""

from pathlib import Path

import pytest
import torch

import attnlab
from attnlab.errors import ConfigError
from attnlab.manifest import load_plan_from_dict
from attnlab.run import execute_plan

TEACHER = {"vocab_size": 256, "d_model": 64, "num_layers": 2, "block_size": 64,
           "attention": {"type": "standard", "num_heads": 2, "num_kv_heads": 1}}


def manifest(tmp: Path, retrofit=None, **run_extra) -> dict:
    corpus = tmp / "corpus.txt"
    corpus.write_text("the cat sat on the mat and the dog sat on the log. " * 200)
    bf = {"id": "bf", "mode": "retrofit", "teacher": "run:teacher",
          "retrofit": retrofit if retrofit is not None else {"window": 8, "block_size": 16, "partner": "xor"}, **run_extra}
    return {"version": 1, "name": "rf", "defaults": {"out_dir": str(tmp / "runs")},
            "data": {"source": "text", "path": str(corpus), "tokenizer": {"type": "byte"}},
            "train": {"steps": 4, "batch_size": 4, "eval_every": 4, "eval_batches": 2, "log_every": 4},
            "groups": [{"name": "g", "runs": [{"id": "teacher", "model": TEACHER}, bf],
                        "benchmarks": [{"type": "quality", "reference": "run:teacher", "windows": 1,
                                        "greedy_tokens": 4, "policy": "fp16"}]}]}


def test_the_plan_derives_the_butterfly_config_from_the_teacher(tmp_path):
    plan = load_plan_from_dict(manifest(tmp_path), tmp_path)
    bf = plan.runs[1]
    assert bf.train is None and bf.retrofit.partner == "xor"
    assert [s.type for s in bf.model.attention_specs()] == ["butterfly", "butterfly"]
    assert bf.resolved["run"]["retrofit"]["window"] == 8


@pytest.mark.parametrize("retrofit,needle", [
    ({"window": 0}, "retrofit.window"), ({"partner": "nearest"}, "retrofit.partner"),
    ({"block_size": 4096}, "must not exceed the model's context"), ({"layers": "every:0", "block_size": 16}, "layers"),
])
def test_bad_retrofit_options_are_one_line_errors(tmp_path, retrofit, needle):
    with pytest.raises(ConfigError) as err:
        load_plan_from_dict(manifest(tmp_path, retrofit), tmp_path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_retrofit_needs_its_section_and_takes_no_model(tmp_path):
    m = manifest(tmp_path)
    del m["groups"][0]["runs"][1]["retrofit"]
    with pytest.raises(ConfigError, match="needs 'retrofit'"):
        load_plan_from_dict(m, tmp_path)
    with pytest.raises(ConfigError, match="remove 'model'"):
        load_plan_from_dict(manifest(tmp_path, model={"d_model": 64}), tmp_path)


def test_retrofit_runs_keep_the_weights_and_benchmark(tmp_path, capsys):
    plan = load_plan_from_dict(manifest(tmp_path), tmp_path)
    execute_plan(plan, "test")
    teacher, bf = (attnlab.load(r.run_dir) for r in plan.runs)
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), bf.state_dict().values()))
    assert type(bf.attention_layers()[0]).__name__ == "ButterflyAttention"
    assert (Path(plan.runs[1].run_dir) / "bench" / "quality.json").is_file()
    assert "butterfly retrofit of run:teacher" in capsys.readouterr().out
    execute_plan(plan, "test")  # resume: nothing redone
    assert "retrofit of" not in capsys.readouterr().out
