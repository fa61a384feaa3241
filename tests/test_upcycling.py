"""Upcycling runs end to end on a tiny teacher: import, surgery (RoPE-aware and independent SVD),
blockwise and global distillation (exact resume), verification."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import attnlab
from attnlab.cli import main
from attnlab.errors import ConfigError
from attnlab.manifest import load_plan, load_plan_from_dict
from attnlab.run import execute_plan

TEACHER = {"vocab_size": 256, "d_model": 64, "num_layers": 2, "block_size": 32,
           "attention": {"type": "standard", "num_heads": 2, "num_kv_heads": 1}}  # head dim 32, GQA


def manifest(tmp: Path, distill_steps: int = 6, verify=None) -> dict:
    corpus = tmp / "corpus.txt"
    corpus.write_text("the cat sat on the mat and the dog sat on the log. " * 200)
    runs = [
        {"id": "teacher", "model": TEACHER, "train": {"steps": 12}},
        {"id": "svd", "mode": "upcycle", "teacher": "run:teacher",
         "surgery": {"sem_head_dim": 8, "geo_pairs": 8, "method": "independent_svd", "calibration_batches": 1}},
        {"id": "init", "mode": "upcycle", "teacher": "run:teacher",
         "surgery": {"sem_head_dim": 8, "geo_pairs": 8, "calibration_batches": 1}},
        {"id": "blockwise", "mode": "blockwise", "teacher": "run:teacher", "init_from": "run:init",
         "train": {"steps": distill_steps}},
        {"id": "final", "mode": "finetune", "teacher": "run:teacher", "init_from": "run:blockwise",
         "train": {"steps": distill_steps}, "distill": {"ce_weight": 1.0, "kl_weight": 1.0}, **({"verify": verify} if verify else {})},
    ]
    return {"version": 1, "name": "up", "defaults": {"out_dir": str(tmp / "runs")},
            "data": {"source": "text", "path": str(corpus), "tokenizer": {"type": "byte"}},
            "train": {"steps": 6, "batch_size": 4, "eval_every": 3, "eval_batches": 2, "log_every": 3, "lr": 3e-3},
            "groups": [{"name": "g", "runs": runs}]}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("up")
    path = tmp / "up.yml"
    path.write_text(yaml.safe_dump(manifest(tmp)))
    assert main(["run", str(path)]) == 0
    return tmp / "runs" / "up" / "g"


def test_surgery_runs_write_reports_and_shrink_the_cache(finished):
    init = json.loads((finished / "init" / "surgery.json").read_text())
    svd = json.loads((finished / "svd" / "surgery.json").read_text())
    assert init["student_kv_bytes"]["fp16"] < init["teacher_kv_bytes"]["fp16"]
    rope_energy = [layer["energy_captured"] for layer in init["layers"]]
    svd_energy = [layer["energy_captured"] for layer in svd["layers"]]
    assert all(0 <= e <= 1 for e in rope_energy) and sum(rope_energy) > sum(svd_energy)
    student = attnlab.load(finished / "init")
    assert type(student.attention_layers()[0]).__name__ == "DecoupledAttention"
    freqs = student.config.attention_specs()[0].rope.inv_freq
    assert isinstance(freqs[0], list) and len(freqs) == 1 and len(freqs[0]) == 8  # per kv head, kept pairs


def test_distillation_improves_on_the_init_and_reports_per_stage(finished):
    def val(run):
        done = [json.loads(l) for l in (finished / run / "train.jsonl").read_text().splitlines() if '"done"' in l]
        return done[-1]["val_loss"]

    assert val("blockwise") < val("init") or val("final") < val("init")
    report = (finished / "report" / "report.md").read_text()
    for run in ("teacher", "svd", "init", "blockwise", "final"):
        assert f"g/{run}" in report


def test_blockwise_trains_only_attention(finished):
    init, blockwise = attnlab.load(finished / "init"), attnlab.load(finished / "blockwise")
    a, b = init.state_dict(), blockwise.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(".attention." in k for k in changed)


def test_distillation_resumes_exactly(tmp_path):
    data = manifest(tmp_path)
    plan = load_plan_from_dict(data, tmp_path)
    execute_plan(plan, "test")  # uninterrupted reference
    reference = attnlab.load(tmp_path / "runs/up/g/final").state_dict()
    data["defaults"]["out_dir"] = str(tmp_path / "again")
    plan = load_plan_from_dict(data, tmp_path)
    execute_plan(plan, "test", stop_after=3)  # every distillation run stops at step 3 ...
    execute_plan(plan, "test")                # ... and resumes
    resumed = attnlab.load(tmp_path / "again/up/g/final").state_dict()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_failed_verification_fails_the_run_and_keeps_its_files(tmp_path, capsys):
    path = tmp_path / "up.yml"
    path.write_text(yaml.safe_dump(manifest(tmp_path, distill_steps=2, verify={"logits": {"max_kl": 1e-9}})))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "verification failed" in err and "logits kl" in err and len(err.strip().splitlines()) == 1
    final = tmp_path / "runs/up/g/final"
    assert (final / "verify.json").is_file() and (final / "last.pt").is_file()


def test_plans_that_would_grow_the_cache_or_miss_references_are_rejected(tmp_path):
    data = manifest(tmp_path)
    data["groups"][0]["runs"][2]["surgery"] = {"sem_head_dim": 16, "geo_pairs": 16}
    with pytest.raises(ConfigError, match="would not be smaller than the teacher"):
        load_plan_from_dict(data, tmp_path)
    data = manifest(tmp_path)
    data["groups"][0]["runs"][3]["init_from"] = "run:later"
    with pytest.raises(ConfigError, match="not an earlier run of this group"):
        load_plan_from_dict(data, tmp_path)


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs" / "upcycle").glob("*.yml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_upcycle_manifests_compile(path, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    if not (root.parent / "shared" / "data").is_dir():
        pytest.skip("../shared/data is absent (the upcycle manifests read their teacher/corpus from it)")
    monkeypatch.chdir(root)
    plan = load_plan(path)
    assert [r.mode for r in plan.runs][-1] in ("finetune", "blockwise")
