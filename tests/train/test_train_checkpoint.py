import fractions
import os

import pytest
import torch

from attnlab.errors import CheckpointError
from attnlab.train import checkpoint as ckpt_mod
from attnlab.train.checkpoint import (FORMAT, VERSION, check_compatible, first_difference, read_checkpoint,
                                      save_checkpoint)
from train_helpers import model_config, train_config


def _payload(step=3, value=1.0):
    return {"format": FORMAT, "version": VERSION, "step": step, "tokens_seen": 10 * step,
            "best_val_loss": None, "model_config": model_config().model_dump(mode="json"),
            "train_config": train_config().model_dump(mode="json"), "data_description": "d",
            "world_size": 1, "model": {"w": torch.full((64, 64), value)},
            "optimizer": {"state": {}, "param_groups": []}, "rng": [{"cpu": torch.get_rng_state()}]}


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_save_and_read_roundtrip_weights_only(tmp_path):
    path = save_checkpoint(tmp_path / "sub" / "last.pt", _payload())
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 3
    got = read_checkpoint(path)
    assert torch.equal(got["model"]["w"], torch.ones(64, 64))
    assert _leftovers(path.parent) == []


@pytest.mark.parametrize("where", ["torch.save", "os.replace", "fsync"])
def test_crash_during_save_keeps_old_file(tmp_path, monkeypatch, where):
    path = save_checkpoint(tmp_path / "last.pt", _payload(step=1, value=1.0))
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("simulated crash")

    if where == "torch.save":
        def partial_save(obj, f, *a, **k):
            f.write(b"PK\x03\x04 half a zip")
            raise KeyboardInterrupt  # a kill, not just an error
        monkeypatch.setattr(ckpt_mod.torch, "save", partial_save)
        expected = KeyboardInterrupt
    elif where == "os.replace":
        monkeypatch.setattr(ckpt_mod.os, "replace", boom)
        expected = OSError
    else:
        monkeypatch.setattr(ckpt_mod.os, "fsync", boom)
        expected = OSError
    with pytest.raises(expected):
        save_checkpoint(path, _payload(step=2, value=2.0))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert read_checkpoint(path)["step"] == 1
    assert _leftovers(tmp_path) == []


def test_stale_temp_from_hard_kill_is_cleaned_by_next_save(tmp_path):
    stale = tmp_path / ".last.pt.999.deadbeef.tmp"
    stale.write_bytes(b"partial")
    save_checkpoint(tmp_path / "last.pt", _payload())
    assert not stale.exists()


def test_truncated_checkpoint_raises_one_line_error(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", _payload())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and "corrupted" in msg and "\n" not in msg


def test_corrupted_and_foreign_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="garbage.pt"):
        read_checkpoint(garbage)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt"):
        read_checkpoint(empty)
    with pytest.raises(CheckpointError, match="file not found"):
        read_checkpoint(tmp_path / "missing.pt")
    # a pickle with a non-allowed global is refused by weights_only
    torch.save({"format": FORMAT, "obj": fractions.Fraction(1, 3)}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(tmp_path / "unsafe.pt")
    assert "\n" not in str(info.value)


def test_wrong_tag_and_missing_keys(tmp_path):
    torch.save({"format": "other", "version": 1}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="format tag is 'other'"):
        read_checkpoint(tmp_path / "a.pt")
    torch.save([1, 2], tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        read_checkpoint(tmp_path / "b.pt")
    payload = _payload()
    del payload["optimizer"], payload["rng"]
    torch.save(payload, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="missing key.*optimizer, rng"):
        read_checkpoint(tmp_path / "c.pt")
    assert read_checkpoint(tmp_path / "c.pt", required=("model",))["step"] == 3


def test_first_difference():
    assert first_difference({"a": 1, "b": [1, 2]}, {"a": 1, "b": [1, 2]}) is None
    assert first_difference({"a": {"x": 1}}, {"a": {"x": 2}}) == ("a.x", 1, 2)
    assert first_difference({"b": [1, 2]}, {"b": [1, 3]}) == ("b[1]", 2, 3)
    assert first_difference({"a": 1}, {"a": 1, "c": 5}) == ("c", "<absent>", 5)
    assert first_difference({"a": 1.0}, {"a": 1}) is None


def test_check_compatible_names_first_key(tmp_path):
    ck = _payload()
    kw = dict(model_config=model_config().model_dump(mode="json"),
              train_config=train_config(steps=50, eval_every=7, log_every=2, eval_batches=1,
                                        save_every=9).model_dump(mode="json"),
              data_description="d", world_size=1)
    check_compatible(ck, "x.pt", **kw)  # schedule-of-reporting keys may change
    with pytest.raises(CheckpointError, match=r"model\.d_model differs \(checkpoint: 32, now: 64\)"):
        check_compatible(ck, "x.pt", **{**kw, "model_config": model_config(d_model=64, attention={
            "type": "decoupled", "num_heads": 4, "sem_dim": 16, "geo_dim": 16}).model_dump(mode="json")})
    with pytest.raises(CheckpointError, match=r"train\.lr differs"):
        check_compatible(ck, "x.pt", **{**kw, "train_config": train_config(lr=1.0).model_dump(mode="json")})
    with pytest.raises(CheckpointError, match=r"data\.description differs \(checkpoint: 'd', now: 'e'\)"):
        check_compatible(ck, "x.pt", **{**kw, "data_description": "e"})
    with pytest.raises(CheckpointError, match=r"world_size differs"):
        check_compatible(ck, "x.pt", **{**kw, "world_size": 2})
