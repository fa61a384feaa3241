"""End-to-end: a run folder from execute_run / execute_plan on the embedded corpus."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))

from attnlab.config import DataConfig  # noqa: E402
from attnlab.data import TokenSplits  # noqa: E402
from attnlab.errors import ConfigError, DataError  # noqa: E402
from attnlab.manifest import Plan  # noqa: E402
from attnlab.model import build_model  # noqa: E402
from attnlab.provenance import write_provenance  # noqa: E402
from attnlab.run import RunResult, execute_plan, execute_run  # noqa: E402
from attnlab.train.events import read_events  # noqa: E402
from train_helpers import make_run, model_config, train_config  # noqa: E402

DATA = DataConfig.model_validate({"source": "embedded", "max_tokens": 20000})


def _byte_run(out, run_id="r0", **train):
    return make_run(out, run_id, model=model_config(vocab_size=256), data=DATA,
                    train=train_config(**{"steps": 4, "eval_every": 2, "log_every": 2, **train}))


def test_run_folder_holds_everything(tmp_path):
    run = _byte_run(tmp_path / "out")
    result = execute_run(run, "attnlab run quick.yml")
    assert isinstance(result, RunResult)
    assert result.steps == 4 and result.run_id == "r0" and result.group == "g"
    assert result.params == build_model(run.model).num_parameters()
    assert result.val_ppl == pytest.approx(np.exp(result.val_loss))
    assert result.best_val_loss <= result.val_loss and result.train_tokens_per_s > 0
    assert result.kv_bytes_per_token is None
    json.dumps(result.to_dict())

    d = run.run_dir
    for name in ("command.txt", "resolved_config.json", "env.json", "last.pt", "best.pt", "train.jsonl"):
        assert (d / name).is_file(), name
    assert (tmp_path / "out" / "test" / ".data").is_dir()  # default cache: run_dir.parent.parent/.data
    assert (d / "command.txt").read_text() == "attnlab run quick.yml\n"
    assert json.loads((d / "resolved_config.json").read_text()) == run.resolved
    env = json.loads((d / "env.json").read_text())
    for key in ("python", "torch", "numpy", "attnlab", "git", "hostname", "platform", "devices",
                "cuda_version", "world_size", "timestamp"):
        assert key in env, key
    assert set(env["git"]) == {"commit", "dirty"} and env["world_size"] == 1

    for name in ("last.pt", "best.pt"):
        payload = torch.load(d / name, weights_only=True)
        assert payload["format"] == "attnlab.checkpoint" and payload["model_config"]["vocab_size"] == 256
    assert torch.load(d / "last.pt", weights_only=True)["step"] == 4

    events = read_events(d / "train.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds == ["meta", "train", "eval", "train", "eval", "done"]
    meta, train, ev, done = events[0], events[1], events[2], events[-1]
    assert meta["config"] == run.resolved and meta["world_size"] == 1 and meta["resumed_from"] is None
    assert meta["params"] == result.params and "embedded" in meta["data"]
    assert set(train) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "eta_s"}
    assert set(ev) >= {"step", "val_loss", "val_ppl"}
    assert done["step"] == 4 and done["val_loss"] == result.val_loss
    assert done["best_val_loss"] == result.best_val_loss
    assert set(done) >= {"train_tokens_per_s", "wall_time_s"}


def test_not_enough_data_is_a_one_line_data_error(tmp_path):
    splits = TokenSplits(train=np.arange(100, dtype=np.uint16) % 64, val=np.arange(10, dtype=np.uint16),
                         vocab_size=64, tokenizer=None, description="tiny")
    with pytest.raises(DataError) as info:
        execute_run(make_run(tmp_path), splits=splits)
    assert "val split has 10 tokens" in str(info.value) and "\n" not in str(info.value)


def test_seq_len_longer_than_block_size(tmp_path):
    splits = TokenSplits(train=np.zeros(1000, np.uint16), val=np.zeros(100, np.uint16), vocab_size=64,
                         tokenizer=None, description="zeros")
    with pytest.raises(ConfigError, match="train.seq_len"):
        execute_run(make_run(tmp_path, train=train_config(seq_len=32)), splits=splits)


def test_provenance_appends_commands_and_keeps_env_history(tmp_path):
    write_provenance(tmp_path, "first --x", {"a": 1})
    write_provenance(tmp_path, "second", {"a": 2}, world_size=4)
    assert (tmp_path / "command.txt").read_text().splitlines() == ["first --x", "second"]
    assert json.loads((tmp_path / "resolved_config.json").read_text()) == {"a": 2}
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["world_size"] == 4 and len(env["previous"]) == 1 and env["previous"][0]["world_size"] == 1


def test_execute_plan_loads_shared_data_once(tmp_path, monkeypatch):
    import attnlab.run as run_mod

    real = run_mod._data_api
    calls = []

    def counting():
        load_splits, batches, evals = real()

        def load(*a, **k):
            calls.append(1)
            return load_splits(*a, **k)
        return load, batches, evals

    monkeypatch.setattr(run_mod, "_data_api", counting)
    runs = [_byte_run(tmp_path, "a"), _byte_run(tmp_path, "b", seed=3)]
    plan = Plan(name="test", source=None, runs=runs, overrides=[])
    results = execute_plan(plan, "attnlab run plan.yml")
    assert [r.run_id for r in results] == ["a", "b"] and len(calls) == 1
    assert results[0].val_loss != results[1].val_loss
    assert all((r.run_dir / "best.pt").is_file() for r in results)


def test_retrieval_mix_run_trains_on_whole_documents(tmp_path, monkeypatch):
    """``source: retrieval_mix``: the trainer's windows start at document starts (the splits'
    ``align``) and the run folder's held-out tokens come back with the same alignment."""
    import attnlab.data as data_mod
    from attnlab.runfolder import RunFolder

    text = tmp_path / "story.txt"
    text.write_text("Once upon a time a fox met an owl who sang songs by the hill. " * 60)
    data = DataConfig.model_validate({"source": "retrieval_mix", "path": str(text), "val_fraction": 0.2,
                                      "retrieval_mix": {"length": 160, "documents": 12, "heldout_documents": 4,
                                                        "kinds": ["passkey"]}})
    seen = []

    class Recording(data_mod.TrainBatches):
        def offsets(self, step, micro):
            out = super().offsets(step, micro)
            seen.append(out)
            return out

    monkeypatch.setattr(data_mod, "TrainBatches", Recording)
    run = make_run(tmp_path / "out", "mix", model=model_config(vocab_size=256, block_size=160), data=data,
                   train=train_config(steps=2, eval_every=2, log_every=1, batch_size=2))
    result = execute_run(run, "attnlab run mix.yml")
    assert result.steps == 2 and seen and all((o % 161 == 0).all() for o in seen)
    tokens, align = RunFolder(run.run_dir).heldout_tokens(with_align=True)
    assert align == 161 and len(tokens) == 4 * 161
