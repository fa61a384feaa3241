import pytest
import torch

from attnlab.data import TrainBatches
from attnlab.errors import CheckpointError
from attnlab.model import build_model
from attnlab.run import execute_run
from attnlab.train import loop as loop_mod
from attnlab.train.checkpoint import read_checkpoint
from attnlab.train.distributed import DistInfo, apply_ddp
from attnlab.train.events import read_events
from attnlab.train.loop import build_trainer
from attnlab.train.optim import build_optimizer
from attnlab.train.step import train_step
from train_helpers import make_run, model_config, synthetic_splits, train_config

SPLITS = synthetic_splits()


def _losses(run_dir):
    """step -> loss of the latest ``train`` event per step (a crashed attempt's are superseded)."""
    return {e["step"]: e["loss"] for e in read_events(run_dir / "train.jsonl", "train")}


def _val_losses(run_dir):
    return {e["step"]: e["val_loss"] for e in read_events(run_dir / "train.jsonl", "eval")}


def _weights(run_dir, name="last.pt"):
    return read_checkpoint(run_dir / name)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_same_optimizer(a, b):
    for pid, st in a["state"].items():
        for key, value in st.items():
            assert torch.equal(value, b["state"][pid][key]), (pid, key)


def test_same_seed_same_losses(tmp_path):
    a = execute_run(make_run(tmp_path / "a"), splits=SPLITS)
    b = execute_run(make_run(tmp_path / "b"), splits=SPLITS)
    assert _losses(a.run_dir) == _losses(b.run_dir) and len(_losses(a.run_dir)) == 6
    assert a.val_loss == b.val_loss
    _assert_same_weights(_weights(a.run_dir), _weights(b.run_dir))
    c = execute_run(make_run(tmp_path / "c", train=train_config(seed=8)), splits=SPLITS)
    assert _losses(c.run_dir) != _losses(a.run_dir)


def test_resume_is_bitwise_identical_to_uninterrupted(tmp_path):
    model = model_config(dropout=0.1)  # RNG state matters across the interruption
    full = execute_run(make_run(tmp_path / "full", model=model), splits=SPLITS)

    part_run = make_run(tmp_path / "part", model=model)
    stopped = execute_run(part_run, "first", stop_after=4, splits=SPLITS)
    assert stopped.steps == 4 and read_checkpoint(part_run.run_dir / "last.pt")["step"] == 4
    assert not read_events(part_run.run_dir / "train.jsonl", "done")
    resumed = execute_run(part_run, "second", splits=SPLITS)

    assert resumed.steps == 6
    assert _losses(part_run.run_dir) == _losses(full.run_dir)
    assert _val_losses(part_run.run_dir) == _val_losses(full.run_dir)
    assert resumed.val_loss == full.val_loss and resumed.best_val_loss == full.best_val_loss
    _assert_same_weights(_weights(part_run.run_dir), _weights(full.run_dir))
    _assert_same_optimizer(read_checkpoint(part_run.run_dir / "last.pt")["optimizer"],
                           read_checkpoint(full.run_dir / "last.pt")["optimizer"])
    metas = read_events(part_run.run_dir / "train.jsonl", "meta")
    assert [m["resumed_from"] for m in metas] == [None, 4]
    assert (part_run.run_dir / "command.txt").read_text().splitlines() == ["first", "second"]


def test_crash_mid_run_resumes_from_last_checkpoint(tmp_path, monkeypatch):
    full = execute_run(make_run(tmp_path / "full"), splits=SPLITS)
    run = make_run(tmp_path / "crash")
    calls = {"n": 0}
    real_step = loop_mod.train_step

    def crashing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # last.pt was written at step 3 (save_every defaults to eval_every)
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "train_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        execute_run(run, splits=SPLITS)
    monkeypatch.undo()
    assert read_checkpoint(run.run_dir / "last.pt")["step"] == 3
    execute_run(run, splits=SPLITS)
    assert _losses(run.run_dir) == _losses(full.run_dir)
    _assert_same_weights(_weights(run.run_dir), _weights(full.run_dir))


def test_incompatible_resume_is_refused(tmp_path):
    run = make_run(tmp_path)
    execute_run(run, "first", stop_after=2, splits=SPLITS)
    resolved_before = (run.run_dir / "resolved_config.json").read_text()

    with pytest.raises(CheckpointError, match=r"train\.lr differs \(checkpoint: 0\.003, now: 0\.01\)"):
        execute_run(make_run(tmp_path, train=train_config(lr=1e-2)), splits=SPLITS)
    other_model = model_config(attention={"type": "decoupled", "num_heads": 4, "sem_dim": 8, "geo_dim": 16})
    with pytest.raises(CheckpointError, match=r"model\.attention\.sem_dim differs \(checkpoint: 16, now: 8\)"):
        execute_run(make_run(tmp_path, model=other_model), splits=SPLITS)
    with pytest.raises(CheckpointError, match=r"data\.description differs"):
        execute_run(run, splits=synthetic_splits(seed=1))
    assert (run.run_dir / "resolved_config.json").read_text() == resolved_before
    assert (run.run_dir / "command.txt").read_text().splitlines() == ["first"]

    # reporting cadence and length may change
    res = execute_run(make_run(tmp_path, train=train_config(steps=8, log_every=2, eval_every=4)), splits=SPLITS)
    assert res.steps == 8


def test_finished_run_is_not_retrained(tmp_path):
    run = make_run(tmp_path)
    first = execute_run(run, "a", splits=SPLITS)
    events_before = (run.run_dir / "train.jsonl").read_text()
    mtime = (run.run_dir / "last.pt").stat().st_mtime_ns
    again = execute_run(run, "b", splits=SPLITS)
    assert (again.val_loss, again.best_val_loss, again.steps, again.params) == \
        (first.val_loss, first.best_val_loss, first.steps, first.params)
    assert (run.run_dir / "train.jsonl").read_text() == events_before
    assert (run.run_dir / "last.pt").stat().st_mtime_ns == mtime


def test_no_resume_starts_over_and_archives(tmp_path):
    run = make_run(tmp_path)
    execute_run(run, stop_after=2, splits=SPLITS)
    res = execute_run(run, resume=False, splits=SPLITS)
    assert res.steps == 6
    assert [m["resumed_from"] for m in read_events(run.run_dir / "train.jsonl", "meta")] == [None]
    archived = list((run.run_dir / "previous").glob("*/last.pt"))
    assert len(archived) == 1 and read_checkpoint(archived[0])["step"] == 2


# ---------------------------------------------------------------- gradient accumulation
def _fresh(cfg):
    torch.manual_seed(0)
    model = apply_ddp(build_model(model_config()), cfg, DistInfo(), torch.device("cpu"))
    return model, build_optimizer(model.raw, cfg)


def test_grad_accumulation_matches_big_batch_step():
    cfg = train_config(lr=1e-4, grad_clip=1.0)
    x, y = TrainBatches(SPLITS.train, 4, 16, seed=3).get(0, 0)  # (4, 16)
    big, big_opt = _fresh(cfg)
    small, small_opt = _fresh(cfg)
    init = {k: v.clone() for k, v in big.raw.state_dict().items()}
    big_stats = train_step(big, big_opt, [(x, y)], lr=1e-4, grad_clip=1.0)
    small_stats = train_step(small, small_opt, [(x[:2], y[:2]), (x[2:], y[2:])], lr=1e-4, grad_clip=1.0)
    assert torch.allclose(big_stats.loss, small_stats.loss, atol=1e-6)
    assert torch.allclose(big_stats.grad_norm, small_stats.grad_norm, rtol=1e-5)
    moved = 0.0
    for (name, a), b in zip(big.raw.state_dict().items(), small.raw.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
        moved = max(moved, (a - init[name]).abs().max().item())
    assert moved > 5e-5  # the step did something


class _HalfBatches:
    """Micro-batch ``m`` of step ``s`` = half ``m`` of the 4-sequence batch (s, 0): the windows
    of a batch-4 x accum-1 run, fed as batch-2 x accum-2."""

    def __init__(self, source):
        self.source = source

    def get(self, step, micro):
        x, y = self.source.get(step, 0)
        return x[2 * micro:2 * micro + 2], y[2 * micro:2 * micro + 2]


def test_trainer_accumulation_matches_with_identical_windows(tmp_path):
    source = TrainBatches(SPLITS.train, 4, 16, seed=7)
    eval_set = [source.get(99, 0)]
    weights = []
    for name, cfg, batches in (("big", train_config(lr=1e-4), source),
                               ("accum", train_config(lr=1e-4, batch_size=2, grad_accum=2), _HalfBatches(source))):
        trainer = build_trainer(lambda: build_model(model_config()), cfg, batches=batches, eval_set=eval_set,
                                run_dir=tmp_path / name, data_description="d", device=torch.device("cpu"))
        trainer.train(stop_after=1)
        assert trainer.state.tokens_seen == 64
        weights.append(trainer.model.raw.state_dict())
    for k in weights[0]:
        assert torch.allclose(weights[0][k], weights[1][k], atol=1e-6, rtol=0), k


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own imports under torch.compile
def test_apply_ddp_single_process_and_compile_wrapping():
    model = build_model(model_config())
    plain = apply_ddp(model, train_config(), DistInfo(), torch.device("cpu"))
    assert plain.module is model and plain.raw is model and plain.ddp is None
    compiled = apply_ddp(model, train_config(compile=True), DistInfo(), torch.device("cpu"))
    assert compiled.raw is model and compiled.module is not model  # compiled lazily, not run here
    assert set(compiled.raw.state_dict()) == set(model.state_dict())


def _interrupting_step(at_call: int, exc=KeyboardInterrupt):
    calls = {"n": 0}
    real_step = loop_mod.train_step

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise exc()
        return real_step(*args, **kwargs)
    return step


def test_ctrl_c_saves_last_checkpoint_at_current_step_and_resumes(tmp_path, monkeypatch):
    model = model_config(dropout=0.1)  # RNG state matters across the interruption
    full = execute_run(make_run(tmp_path / "full", model=model), splits=SPLITS)
    run = make_run(tmp_path / "int", model=model)
    monkeypatch.setattr(loop_mod, "train_step", _interrupting_step(5))  # Ctrl-C while taking step 5
    with pytest.raises(loop_mod.TrainingInterrupted) as info:
        execute_run(run, splits=SPLITS)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and "interrupted at step 4/6" in message and "last.pt" in message
    assert info.value.step == 4
    assert read_checkpoint(run.run_dir / "last.pt")["step"] == 4  # not 3, the last periodic save
    assert [e["step"] for e in read_events(run.run_dir / "train.jsonl", "interrupt")] == [4]
    assert not list(run.run_dir.glob(".*.tmp"))  # written atomically, no temp left
    resumed = execute_run(run, splits=SPLITS)
    assert resumed.steps == 6 and resumed.val_loss == full.val_loss
    assert _losses(run.run_dir) == _losses(full.run_dir)
    _assert_same_weights(_weights(run.run_dir), _weights(full.run_dir))
    assert [m["resumed_from"] for m in read_events(run.run_dir / "train.jsonl", "meta")] == [None, 4]


def test_ctrl_c_right_after_a_checkpoint_does_not_save_twice(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    monkeypatch.setattr(loop_mod, "train_step", _interrupting_step(4))  # last.pt written at step 3
    with pytest.raises(loop_mod.TrainingInterrupted, match="interrupted at step 3/6"):
        execute_run(run, splits=SPLITS)
    assert read_checkpoint(run.run_dir / "last.pt")["step"] == 3


def test_sigint_flag_finishes_the_step_then_saves(tmp_path, monkeypatch):
    import os
    import signal

    run = make_run(tmp_path)
    calls = {"n": 0}
    real_step = loop_mod.train_step

    def step(*args, **kwargs):
        calls["n"] += 1
        out = real_step(*args, **kwargs)
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C in the middle of step 2
        return out

    monkeypatch.setattr(loop_mod, "train_step", step)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(loop_mod.TrainingInterrupted, match="interrupted at step 2/6"):
        execute_run(run, splits=SPLITS)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
    assert read_checkpoint(run.run_dir / "last.pt")["step"] == 2


def test_cli_prints_one_line_on_interrupt(monkeypatch, capsys):
    from attnlab import cli

    def interrupted(args, command):
        raise loop_mod.TrainingInterrupted("interrupted at step 4/6: saved x/last.pt at step 4", 4)

    monkeypatch.setitem(cli.COMMANDS, "compile", interrupted)
    assert cli.main(["compile", "m.yml"]) == 130
    err = capsys.readouterr().err
    assert err == "attnlab compile: interrupted at step 4/6: saved x/last.pt at step 4\n"
