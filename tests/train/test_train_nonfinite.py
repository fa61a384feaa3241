"""The non-finite guard: a NaN/inf loss or grad norm stops the run (nan event, checkpoints kept,
exit 2 through the CLI) or, with train.on_nonfinite: skip, skips the step; a NaN evaluation never
becomes best.pt; a checkpoint with NaN/inf tensors is never written or loaded."""

import json
import math

import pytest
import torch
import yaml

from attnlab.cli import main
from attnlab.errors import AttnlabError, CheckpointError
from attnlab.model import build_model
from attnlab.run import execute_run
from attnlab.train.checkpoint import read_checkpoint, save_checkpoint
from attnlab.train.distributed import DistInfo, apply_ddp
from attnlab.train.evaluate import EvalResult
from attnlab.train.events import read_events
from attnlab.train.loop import build_trainer
from attnlab.train.objectives import LanguageModeling
from attnlab.train.optim import build_optimizer
from attnlab.train.step import NonFiniteError, train_step
from train_helpers import make_run, model_config, synthetic_splits, train_config

SPLITS = synthetic_splits()


class NaNOn:
    """The LM loss, times NaN on the given 1-based calls (one call per step: grad_accum=1)."""

    def __init__(self, bad_calls, value=math.nan):
        self.calls, self.bad, self.value, self.inner = 0, set(bad_calls), value, LanguageModeling()

    def __call__(self, model, x, y):
        self.calls += 1
        loss = self.inner(model, x, y)
        return loss * self.value if self.calls in self.bad else loss


def _all_finite(payload):
    return all(torch.isfinite(t).all() for t in payload["model"].values())


def _events(run_dir, kind=None):
    return read_events(run_dir / "train.jsonl", kind)


def _trainer(tmp_path, objective=None, **train):
    cfg = train_config(**train)
    from attnlab.data import TrainBatches, eval_batches
    batches = TrainBatches(SPLITS.train, cfg.batch_size, cfg.seq_len, cfg.seed)
    eval_set = eval_batches(SPLITS.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    return build_trainer(lambda: build_model(model_config()), cfg, batches=batches, eval_set=eval_set,
                         run_dir=tmp_path, data_description=SPLITS.description, device=torch.device("cpu"),
                         objective=objective)


def test_nan_loss_stops_with_step_keeps_checkpoints(tmp_path):
    run = make_run(tmp_path)
    execute_run(run, stop_after=4, splits=SPLITS)  # best.pt at 3, last.pt at 4
    run_dir = run.run_dir
    before = {n: (run_dir / n).read_bytes() for n in ("last.pt", "best.pt")}
    with pytest.raises(NonFiniteError) as exc:
        execute_run(run, splits=SPLITS, objective=NaNOn({1}))  # the resumed session's first step
    msg = str(exc.value)
    assert "step 5" in msg and "\n" not in msg and "last.pt" in msg and isinstance(exc.value, AttnlabError)
    nan = _events(run_dir, "nan")
    assert len(nan) == 1 and nan[0]["step"] == 5 and nan[0]["phase"] == "train" and nan[0]["loss"] is None
    assert not _events(run_dir, "done")
    for name, data in before.items():
        assert (run_dir / name).read_bytes() == data, name
        payload = read_checkpoint(run_dir / name)
        assert _all_finite(payload)
    assert read_checkpoint(run_dir / "last.pt")["step"] == 4


def test_inf_loss_also_stops(tmp_path):
    trainer = _trainer(tmp_path, objective=NaNOn({2}, value=math.inf))
    with pytest.raises(NonFiniteError, match="step 2"):
        trainer.train()
    assert trainer.state.step == 1
    assert not (tmp_path / "last.pt").exists()


def test_train_step_makes_no_update_on_nan():
    torch.manual_seed(0)
    model = build_model(model_config())
    wrapped = apply_ddp(model, train_config(), DistInfo(), torch.device("cpu"))
    opt = build_optimizer(model, train_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 64, (2, 16))
    stats = train_step(wrapped, opt, [(x, x)], lr=1e-2, grad_clip=1.0, objective=NaNOn({1}))
    assert not stats.finite
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert not opt.state  # Adam never stepped
    stats = train_step(wrapped, opt, [(x, x)], lr=1e-2, grad_clip=1.0)
    assert stats.finite and opt.state


def test_skip_mode_skips_and_logs(tmp_path):
    trainer = _trainer(tmp_path, objective=NaNOn({2, 4}), on_nonfinite="skip")
    state = trainer.train()
    assert state.step == 6
    skipped = _events(tmp_path, "nan_skipped")
    assert [e["step"] for e in skipped] == [2, 4] and [e["consecutive"] for e in skipped] == [1, 1]
    assert not _events(tmp_path, "nan") and _events(tmp_path, "done")
    assert {e["step"] for e in _events(tmp_path, "train")} == {1, 3, 5, 6}
    last = read_checkpoint(tmp_path / "last.pt")
    assert last["step"] == 6 and _all_finite(last)


def test_skip_mode_stops_after_too_many_consecutive(tmp_path):
    trainer = _trainer(tmp_path, objective=NaNOn(range(2, 100)), on_nonfinite="skip", max_nonfinite_skips=2)
    with pytest.raises(NonFiniteError, match=r"step 4.*max_nonfinite_skips=2"):
        trainer.train()
    assert [e["step"] for e in _events(tmp_path, "nan_skipped")] == [2, 3]
    (nan,) = _events(tmp_path, "nan")
    assert nan["step"] == 4 and nan["consecutive"] == 3


def test_skipped_last_step_still_saves_and_finishes(tmp_path):
    trainer = _trainer(tmp_path, objective=NaNOn({6}), on_nonfinite="skip")
    trainer.train()
    assert read_checkpoint(tmp_path / "last.pt")["step"] == 6 and _events(tmp_path, "done")


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nan_evaluation_never_becomes_best(tmp_path, mode):
    trainer = _trainer(tmp_path, on_nonfinite=mode, eval_every=2)
    real, calls = trainer.evaluate, []

    def evaluate(model):
        calls.append(1)
        return real(model) if len(calls) == 1 else EvalResult(math.nan, math.nan)

    trainer.evaluate = evaluate
    if mode == "stop":
        with pytest.raises(NonFiniteError, match="held-out loss at step 4"):
            trainer.train()
        assert read_checkpoint(tmp_path / "last.pt")["step"] == 2
    else:
        trainer.train()
        assert read_checkpoint(tmp_path / "last.pt")["step"] == 6
    best = read_checkpoint(tmp_path / "best.pt")
    assert best["step"] == 2 and math.isfinite(best["best_val_loss"])
    assert trainer.state.best_val_loss == best["best_val_loss"]


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    trainer = _trainer(tmp_path, eval_every=4, save_every=3)
    param = next(trainer.model.raw.parameters())

    def poison(opt, args, kwargs):
        if trainer.state.step == 2:  # the update of step 3
            with torch.no_grad():
                param.view(-1)[0] = math.inf

    trainer.optimizer.register_step_post_hook(poison)
    with pytest.raises(NonFiniteError, match="step 3"):
        trainer.train()
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()
    (nan,) = _events(tmp_path, "nan")
    assert nan["phase"] == "checkpoint" and nan["tensor"].startswith("model.")


def _payload(model):
    from attnlab.train.checkpoint import FORMAT, VERSION
    return {"format": FORMAT, "version": VERSION, "step": 1, "tokens_seen": 1, "best_val_loss": None,
            "model_config": model_config().model_dump(mode="json"),
            "train_config": train_config().model_dump(mode="json"), "data_description": "d",
            "world_size": 1, "model": model, "optimizer": {"state": {}, "param_groups": []},
            "rng": [{"cpu": torch.get_rng_state()}]}


def test_save_refuses_and_read_rejects_nonfinite_tensors(tmp_path):
    bad = _payload({"w": torch.tensor([1.0, math.nan])})
    with pytest.raises(CheckpointError, match="refusing.*model.w"):
        save_checkpoint(tmp_path / "last.pt", bad)
    assert not (tmp_path / "last.pt").exists()
    save_checkpoint(tmp_path / "last.pt", bad, check_finite=False)  # e.g. written by an older attnlab
    with pytest.raises(CheckpointError, match=r"last.pt: model.w holds NaN/inf"):
        read_checkpoint(tmp_path / "last.pt")


def _manifest(tmp_path, **train):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    manifest = {
        "version": 1, "name": "tiny", "defaults": {"out_dir": str(tmp_path / "runs")},
        "model": {"vocab_size": 256, "d_model": 32, "num_layers": 2, "block_size": 32,
                  "attention": {"type": "standard", "num_heads": 4}},
        "data": {"source": "text", "path": str(corpus), "tokenizer": {"type": "byte"}},
        "train": {"steps": 12, "batch_size": 4, "eval_every": 3, "eval_batches": 2, "log_every": 2,
                  "device": "cpu", **train},
        "groups": [{"name": "g", "runs": [{"id": "base"}]}],
    }
    path = tmp_path / "tiny.yml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def test_cli_lr_1e6_exits_2_with_one_line_naming_the_step(tmp_path, capsys):
    manifest = _manifest(tmp_path)
    assert main(["train", str(manifest), "--run", "g/base", "train.lr=1e6"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("attnlab train: error: non-finite") and " at step " in line
    run_dir = tmp_path / "runs" / "tiny" / "g" / "base"
    events = [json.loads(x) for x in (run_dir / "train.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "nan" and not any(e["event"] == "done" for e in events)
    for name in ("last.pt", "best.pt"):
        if (run_dir / name).exists():
            assert _all_finite(read_checkpoint(run_dir / name))
