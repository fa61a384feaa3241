"""A full disk (a patched writer raising ENOSPC) during saves and record writes: one line naming
the file and the cause, the temp file removed, the previous file intact, never a traceback."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import yaml

import attnlab.fsutil as fsutil
from attnlab.bench.context import BenchRecord
from attnlab.cli import main
from attnlab.errors import AttnlabError
from attnlab.fsutil import WriteError, append_text, atomic_write_text
from attnlab.provenance import write_provenance



@pytest.fixture()
def full_disk(monkeypatch):
    """fsync (which every atomic write calls after writing) fails as on a full disk."""
    def fail(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsutil.os, "fsync", fail)


def _no_temps(folder: Path) -> bool:
    return not [p for p in folder.rglob("*.tmp")]


def test_atomic_write_on_a_full_disk(tmp_path, full_disk):
    path = tmp_path / "record.json"
    path.write_text("old")
    with pytest.raises(WriteError) as info:
        atomic_write_text(path, "new")
    text = str(info.value)
    assert str(path) in text and "No space left on device (ENOSPC)" in text and "\n" not in text
    assert isinstance(info.value, AttnlabError) and isinstance(info.value, OSError)
    assert info.value.__suppress_context__  # no chained traceback
    assert path.read_text() == "old" and _no_temps(tmp_path)


def test_append_on_a_full_disk_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "command.txt"
    path.write_text("first\n")
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def tell(self):
            return self.f.tell()

        def truncate(self, n):
            return self.f.truncate(n)

        def write(self, text):
            self.f.write(text[:3])  # a partial write, then the disk is full
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            self.f.flush()

    monkeypatch.setattr("builtins.open", lambda p, *a, **k: Full(real_open(p, *a, **k)))
    with pytest.raises(WriteError, match="command.txt: cannot append: No space left"):
        append_text(path, "second\n")
    monkeypatch.undo()
    assert path.read_text() == "first\n"


def test_bench_record_on_a_full_disk_keeps_the_previous_record(tmp_path, full_disk):
    folder = tmp_path / "bench"
    folder.mkdir()
    (folder / "perplexity.json").write_text("previous")
    with pytest.raises(WriteError, match="perplexity.json"):
        BenchRecord("perplexity", "perplexity", "g/r", [{"a": 1}]).save(folder)
    assert (folder / "perplexity.json").read_text() == "previous" and _no_temps(tmp_path)


def test_provenance_on_a_full_disk(tmp_path, full_disk):
    (tmp_path / "resolved_config.json").write_text('{"a": 1}')
    with pytest.raises(WriteError, match="resolved_config.json"):
        write_provenance(tmp_path, "cmd", {"a": 2})
    assert json.loads((tmp_path / "resolved_config.json").read_text()) == {"a": 1} and _no_temps(tmp_path)


def _manifest(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    manifest = {
        "version": 1, "name": "tiny", "defaults": {"out_dir": str(tmp_path / "runs")},
        "model": {"vocab_size": 256, "d_model": 16, "num_layers": 1, "block_size": 16,
                  "attention": {"type": "standard", "num_heads": 2}},
        "data": {"source": "text", "path": str(corpus), "tokenizer": {"type": "byte"}},
        "train": {"steps": 2, "batch_size": 2, "eval_every": 2, "eval_batches": 1, "log_every": 1, "device": "cpu"},
        "groups": [{"name": "g", "runs": [{"id": "base"}]}],
    }
    path = tmp_path / "tiny.yml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_checkpoint_save_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    import attnlab.train.loop as loop

    def full(path, payload, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(loop, "save_checkpoint", full)
    assert main(["train", str(_manifest(tmp_path)), "--run", "g/base"]) == 2
    err = _one_line(capsys)
    assert "last.pt" in err and "No space left on device" in err


def test_report_on_a_full_disk_is_one_line_and_keeps_the_old_report(tmp_path, capsys, monkeypatch):
    manifest = _manifest(tmp_path)
    assert main(["train", str(manifest), "--run", "g/base"]) == 0
    run_dir = tmp_path / "runs" / "tiny" / "g" / "base"
    out = tmp_path / "report"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()

    def fail(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsutil.os, "fsync", fail)
    assert main(["report", str(run_dir), "--out", str(out), "--title", "changed"]) == 2
    assert "No space left on device" in _one_line(capsys)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_export_on_a_full_disk_leaves_nothing(tmp_path, capsys, monkeypatch):
    pytest.importorskip("safetensors")
    import safetensors.torch

    manifest = _manifest(tmp_path)
    assert main(["train", str(manifest), "--run", "g/base"]) == 0
    run_dir = tmp_path / "runs" / "tiny" / "g" / "base"

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"part")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    capsys.readouterr()
    assert main(["export", "--ckpt", str(run_dir), "--out", str(tmp_path / "hf")]) == 2
    err = _one_line(capsys)
    assert str(tmp_path / "hf") in err and "No space left on device" in err
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))


def test_export_writes_files_with_normal_permissions(tmp_path, capsys):
    pytest.importorskip("safetensors")
    manifest = _manifest(tmp_path)
    assert main(["train", str(manifest), "--run", "g/base"]) == 0
    run_dir = tmp_path / "runs" / "tiny" / "g" / "base"
    old = os.umask(0o022)
    try:
        assert main(["export", "--ckpt", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
        atomic_write_text(tmp_path / "plain.json", "{}")
    finally:
        os.umask(old)
    for name in ("config.json", "model.safetensors"):
        assert oct((tmp_path / "hf" / name).stat().st_mode & 0o777) == oct(0o644), name
    assert oct((tmp_path / "plain.json").stat().st_mode & 0o777) == oct(0o644)
