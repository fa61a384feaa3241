"""Verified checkpoints: the sha256 trailer catches every bit flip and truncation; malformed
payloads (missing keys, flattened tensors, bad optimizer/RNG state, non-integer step) are one-line
CheckpointErrors naming the file; a damaged last.pt falls back to best.pt on resume; a torn
train.jsonl line is repaired, never glued to the next event; writes that fail leave files as
they were."""

import errno
import json
import random

import pytest
import torch

from attnlab.errors import AttnlabError, CheckpointError
from attnlab.model import build_model
from attnlab.report.collect import load_run
from attnlab.run import execute_run
from attnlab.train import checkpoint as ckpt_mod
from attnlab.train.checkpoint import (TRAILER_SIZE, CheckpointWriteError, check_compatible, load_resume_checkpoint,
                                      read_checkpoint, save_checkpoint)
from attnlab.train.events import EventLog, read_events, repair_events
from attnlab.train.loop import build_trainer
from attnlab.train.optim import build_optimizer
from train_helpers import make_run, model_config, synthetic_splits, train_config

SPLITS = synthetic_splits()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real trained checkpoint (model, Adam state, RNG) from a 3-step run."""
    out = tmp_path_factory.mktemp("integrity")
    run = make_run(out, train=train_config(steps=3))
    execute_run(run, splits=SPLITS)
    return run.run_dir / "last.pt"


def _one_line_naming(err, path):
    text = str(err.value)
    assert "\n" not in text and str(path) in text, text


def test_forty_single_bit_flips_are_all_detected(saved, tmp_path):
    data = saved.read_bytes()
    rng = random.Random(11)
    positions = rng.sample(range(len(data)), 36) + [0, len(data) - 1, len(data) - TRAILER_SIZE,
                                                     len(data) - TRAILER_SIZE - 1]  # zip start/end, trailer
    detected = 0
    for i, pos in enumerate(positions):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        path = tmp_path / f"flip{i}.pt"
        path.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(path)
        _one_line_naming(err, path)
        detected += 1
    assert detected == 40


@pytest.mark.parametrize("keep", [0, 1, 10, 0.5, -1, -10, -TRAILER_SIZE, -TRAILER_SIZE - 1])
def test_truncation_is_detected(saved, tmp_path, keep):
    data = saved.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)
    path = tmp_path / "last.pt"
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    _one_line_naming(err, path)


def test_appended_garbage_is_detected(saved, tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(saved.read_bytes() + b"\0" * 7)
    with pytest.raises(CheckpointError, match="last.pt"):
        read_checkpoint(path)


def test_plain_torch_load_still_reads_a_verified_checkpoint(saved):
    assert torch.load(saved, weights_only=True)["step"] == 3


def _mutated(saved, tmp_path, change):
    payload = dict(read_checkpoint(saved))
    change(payload)
    return save_checkpoint(tmp_path / "last.pt", payload, check_finite=False)  # a valid checksum


@pytest.mark.parametrize("change, needle", [
    (lambda p: p.pop("model"), "missing key(s) model"),
    (lambda p: p.pop("optimizer"), "missing key(s) optimizer"),
    (lambda p: p.pop("rng"), "missing key(s) rng"),
    (lambda p: p.update(model={k: v.tolist() for k, v in p["model"].items()}), "not a tensor"),
    (lambda p: p.update(model=torch.cat([v.flatten() for v in p["model"].values()])), "model"),
    (lambda p: p.update(model={}), "model"),
    (lambda p: p.update(optimizer="adam"), "optimizer"),
    (lambda p: p.update(optimizer={"state": {}, "param_groups": 3}), "optimizer"),
    (lambda p: p.update(rng=[{"cpu": torch.zeros(3)}]), "rng"),
    (lambda p: p.update(rng="seed"), "rng"),
    (lambda p: p.update(step=2.5), "step"),
    (lambda p: p.update(step="3"), "step"),
    (lambda p: p.update(step=True), "step"),
    (lambda p: p.update(step=-1), "step"),
    (lambda p: p.update(tokens_seen=None), "tokens_seen"),
    (lambda p: p.update(best_val_loss="low"), "best_val_loss"),
    (lambda p: p.update(train_config=[1]), "train_config"),
])
def test_malformed_payloads_are_one_line_errors(saved, tmp_path, change, needle):
    path = _mutated(saved, tmp_path, change)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    _one_line_naming(err, path)
    assert needle in str(err.value)


def _restore_into_fresh_trainer(ckpt, tmp_path):
    from attnlab.data import TrainBatches, eval_batches
    cfg = train_config()
    return build_trainer(lambda: build_model(model_config()), cfg,
                         batches=TrainBatches(SPLITS.train, cfg.batch_size, cfg.seq_len, cfg.seed),
                         eval_set=eval_batches(SPLITS.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches),
                         run_dir=tmp_path, data_description=SPLITS.description, device=torch.device("cpu"),
                         checkpoint=ckpt)


@pytest.mark.parametrize("change, needle", [
    (lambda p: p["model"].pop(next(iter(p["model"]))), "model weights do not fit"),
    (lambda p: p["model"].update({k: v.reshape(-1) for k, v in p["model"].items() if v.dim() > 1}),
     "model weights do not fit"),
    (lambda p: p["optimizer"]["param_groups"].pop(), "optimizer state does not fit"),
    (lambda p: p["rng"][0].update(cpu=torch.zeros(5, dtype=torch.uint8)), "bad RNG state"),
])
def test_payloads_that_do_not_fit_the_model_are_one_line_errors(saved, tmp_path, change, needle):
    path = _mutated(saved, tmp_path, change)
    ckpt = read_checkpoint(path)
    with pytest.raises(CheckpointError) as err:
        _restore_into_fresh_trainer(ckpt, tmp_path / "run")
    _one_line_naming(err, path)
    assert needle in str(err.value)


def test_legacy_checkpoint_without_checksum_loads_with_one_warning(saved, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ckpt_mod, "_warned_legacy", False)
    payload = dict(read_checkpoint(saved))
    payload.pop("checksum")  # older files have neither the tag nor the trailer
    for i in range(2):
        torch.save(payload, tmp_path / f"old{i}.pt")  # what attnlab wrote before the trailer
    capsys.readouterr()
    assert read_checkpoint(tmp_path / "old0.pt")["step"] == 3
    assert read_checkpoint(tmp_path / "old1.pt")["step"] == 3
    err = capsys.readouterr().err
    assert err.count("no checksum") == 1 and "old0.pt" in err


def test_legacy_checkpoint_damage_still_a_checkpoint_error(saved, tmp_path):
    payload = dict(read_checkpoint(saved))
    payload.pop("checksum")
    torch.save(payload, tmp_path / "old.pt")
    data = (tmp_path / "old.pt").read_bytes()
    (tmp_path / "old.pt").write_bytes(data[:-5])
    with pytest.raises(CheckpointError, match="old.pt"):
        read_checkpoint(tmp_path / "old.pt")


def test_full_disk_during_save_is_one_line_and_keeps_old_file(saved, tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    path.write_bytes(saved.read_bytes())

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.os, "fsync", full)
    with pytest.raises(CheckpointWriteError) as err:
        save_checkpoint(path, dict(read_checkpoint(saved)))
    monkeypatch.undo()
    assert isinstance(err.value, AttnlabError) and isinstance(err.value, OSError)
    _one_line_naming(err, path)
    assert "No space left" in str(err.value)
    assert path.read_bytes() == saved.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_stale_temp_of_a_live_writer_is_left_alone(saved, tmp_path):
    import os
    live = tmp_path / f".last.pt.{os.getppid()}.cafe0001.tmp"  # the parent process is alive
    live.write_bytes(b"being written")
    save_checkpoint(tmp_path / "last.pt", dict(read_checkpoint(saved)))
    assert live.exists()


def _corrupt(path, pos=None):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if pos is None else pos] ^= 0x10
    path.write_bytes(bytes(data))


def test_resume_after_corrupted_last_pt_falls_back_to_best(tmp_path, capsys):
    full = make_run(tmp_path / "full")
    execute_run(full, splits=SPLITS)
    run = make_run(tmp_path / "part")
    execute_run(run, stop_after=4, splits=SPLITS)  # best.pt at step 3, last.pt at step 4
    run_dir = run.run_dir
    best_before = (run_dir / "best.pt").read_bytes()
    _corrupt(run_dir / "last.pt")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        read_checkpoint(run_dir / "last.pt")
    capsys.readouterr()

    def compatible(ckpt, path):
        check_compatible(ckpt, path, model_config=run.model.model_dump(mode="json"),
                         train_config=run.train.model_dump(mode="json"),
                         data_description=SPLITS.description, world_size=1)

    ckpt = load_resume_checkpoint(run_dir, check=compatible)
    assert ckpt["step"] == 3 and ckpt.path == run_dir / "best.pt"
    err = capsys.readouterr().err
    assert "last.pt is damaged" in err and "resuming from" in err and "best.pt" in err
    assert (run_dir / "best.pt").read_bytes() == best_before  # reading never writes
    trainer = _restore_into_fresh_trainer(ckpt, run_dir)
    trainer.train()
    warnings = read_events(run_dir / "train.jsonl", "warning")
    assert warnings and "damaged" in warnings[-1]["message"]
    final = read_checkpoint(run_dir / "last.pt")
    assert final["step"] == 6
    # resuming from step 3 replays the same batches and RNG: the same weights as a run never interrupted
    reference = read_checkpoint(full.run_dir / "last.pt")["model"]
    for k, v in final["model"].items():
        assert torch.equal(v, reference[k]), k


def test_resume_without_usable_fallback_is_one_line_error(tmp_path):
    run = make_run(tmp_path)
    execute_run(run, stop_after=4, splits=SPLITS)
    _corrupt(run.run_dir / "last.pt")
    _corrupt(run.run_dir / "best.pt")
    with pytest.raises(CheckpointError) as err:
        load_resume_checkpoint(run.run_dir)
    text = str(err.value)
    assert "\n" not in text and "last.pt" in text and "best.pt" in text
    (run.run_dir / "best.pt").unlink()
    with pytest.raises(CheckpointError, match="last.pt: checksum mismatch"):
        load_resume_checkpoint(run.run_dir)
    assert load_resume_checkpoint(tmp_path / "nowhere") is None


# ---------------------------------------------------------------- train.jsonl
def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("tail, cut", [
    (b'{"event": "train", "step": 9, "lo', 33),          # torn mid-line (disk full / kill)
    (b'{"event": "train", "step": 9}', 29),              # complete JSON but no newline: not certain
    (b'\0\0\0\0\0\0', 6),                                # zeros after a crash
    (b'{"event": "tra\n', 15),                           # a newline but not JSON
])
def test_torn_event_tail_is_repaired_not_glued(tmp_path, tail, cut):
    path = tmp_path / "train.jsonl"
    log = EventLog(path)
    log.write("meta", step=0)
    log.write("train", step=1)
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(tail)
    log = EventLog(path)  # a new session
    log.write("meta", resumed_from=1)
    data = path.read_bytes()
    assert data.startswith(good) and len(data) > len(good)
    events = _lines(path)
    assert [e["event"] for e in events] == ["meta", "train", "meta"]
    assert repair_events(path) is None  # intact now


def test_repair_reports_what_it_cut(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"event": "meta"}\n{"event": "tr')
    msg = repair_events(path)
    assert "train.jsonl" in msg and "torn" in msg and "\n" not in msg
    assert path.read_bytes() == b'{"event": "meta"}\n'
    path.write_bytes(b'{"event": "tr')  # no complete line at all
    assert repair_events(path) and path.read_bytes() == b""


def test_read_events_ignores_a_torn_last_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"event": "meta"}\n{"event": "tr')
    assert [e["event"] for e in read_events(path)] == ["meta"]


def test_event_write_failure_cuts_partial_line(tmp_path, monkeypatch):
    path = tmp_path / "train.jsonl"
    log = EventLog(path)
    log.write("meta", step=0)
    before = path.read_bytes()
    import io
    real_write = io.FileIO.write

    class Full(io.FileIO):
        def write(self, data):
            real_write(self, bytes(data)[:7])
            raise OSError(errno.ENOSPC, "No space left on device")

    import builtins
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, mode="r", buffering=-1, **k:
                        Full(p, mode.replace("b", "")) if p == path and "a" in mode else real_open(p, mode, buffering, **k))
    with pytest.raises(AttnlabError) as err:
        log.write("train", step=1)
    monkeypatch.undo()
    assert "No space left" in str(err.value) and "train.jsonl" in str(err.value)
    assert path.read_bytes() == before


def test_resumed_run_after_torn_log_is_accepted_by_report(tmp_path):
    run = make_run(tmp_path)
    execute_run(run, stop_after=4, splits=SPLITS)
    events = run.run_dir / "train.jsonl"
    with open(events, "ab") as f:
        f.write(b'{"event": "train", "step": 5, "loss": 3.')  # the disk filled up here
    from attnlab.provenance import write_provenance
    write_provenance(run.run_dir, "test", run.resolved, world_size=1)
    execute_run(run, splits=SPLITS)
    lines = _lines(events)  # every line parses
    assert any(e["event"] == "repair" for e in lines) and lines[-1]["event"] == "done"
    data = load_run(run.run_dir)
    assert data.done is not None and [e["step"] for e in data.train][-1] == 6


def test_old_run_folder_without_checksums_still_resumes(tmp_path, monkeypatch, capsys):
    """A last.pt written before checksums (no trailer, no tag, no on_nonfinite fields) resumes
    and ends like an uninterrupted run; the next save adds the trailer."""
    full = make_run(tmp_path / "full")
    execute_run(full, splits=SPLITS)
    run = make_run(tmp_path / "part")
    execute_run(run, stop_after=4, splits=SPLITS)
    for name in ("last.pt", "best.pt"):
        payload = dict(read_checkpoint(run.run_dir / name))
        payload.pop("checksum")
        for key in ("on_nonfinite", "max_nonfinite_skips"):
            payload["train_config"] = {k: v for k, v in payload["train_config"].items() if k != key}
        torch.save(payload, run.run_dir / name)
    monkeypatch.setattr(ckpt_mod, "_warned_legacy", False)
    capsys.readouterr()
    execute_run(run, splits=SPLITS)
    assert "no checksum" in capsys.readouterr().err
    final = run.run_dir / "last.pt"
    assert final.read_bytes()[-TRAILER_SIZE:].startswith(ckpt_mod.TRAILER_MAGIC)
    reference = read_checkpoint(full.run_dir / "last.pt")["model"]
    for k, v in read_checkpoint(final)["model"].items():
        assert torch.equal(v, reference[k]), k
