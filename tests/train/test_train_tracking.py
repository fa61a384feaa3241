"""``train.tracking: tensorboard``: rank 0 writes TensorBoard event files whose scalars, read back
with TensorBoard's own reader, equal the events of ``train.jsonl``; a resumed run continues the
curves without forking them (equal to an uninterrupted run's); without the tensorboard package the
run stops with a one-line error before training."""

from __future__ import annotations

import sys

import pytest

from attnlab.errors import ConfigError
from attnlab.run import execute_run
from attnlab.train.events import read_events
from train_helpers import make_run, synthetic_splits, train_config

SPLITS = synthetic_splits()


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _run(out, run_id="r0", **train):
    return make_run(out, run_id, train=train_config(tracking="tensorboard", **train))


def test_tensorboard_scalars_equal_the_event_log(tmp_path):
    pytest.importorskip("tensorboard")
    run = _run(tmp_path)
    execute_run(run, "test", splits=SPLITS)
    scalars = _scalars(run.run_dir)
    assert set(scalars) == {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                            "eval/val_loss", "eval/val_ppl"}
    train = read_events(run.run_dir / "train.jsonl", "train")
    evals = read_events(run.run_dir / "train.jsonl", "eval")
    for tag, events, field in (("train/loss", train, "loss"), ("train/lr", train, "lr"),
                               ("eval/val_loss", evals, "val_loss"), ("eval/val_ppl", evals, "val_ppl")):
        assert [s for s, _ in scalars[tag]] == [e["step"] for e in events]
        assert [v for _, v in scalars[tag]] == pytest.approx([e[field] for e in events], rel=1e-6)


def test_resumed_run_continues_the_curves(tmp_path):
    pytest.importorskip("tensorboard")
    whole = _run(tmp_path / "a")
    execute_run(whole, "test", splits=SPLITS)
    part = _run(tmp_path / "b")
    execute_run(part, "test", stop_after=4, splits=SPLITS)
    execute_run(part, "test", splits=SPLITS)
    got, want = _scalars(part.run_dir), _scalars(whole.run_dir)
    for tag in ("train/loss", "eval/val_loss"):
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]]  # each step once
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], rel=1e-5)


def test_missing_tensorboard_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    run = _run(tmp_path)
    with pytest.raises(ConfigError, match="train.tracking.*tensorboard package"):
        execute_run(run, "test", splits=SPLITS)
    assert not (run.run_dir / "last.pt").exists()
