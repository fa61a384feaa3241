"""One process per run folder: an exclusive flock on ``<run_dir>/.lock`` holding the pid; a second
process gets a one-line error naming it; only temp files of dead processes are cleaned up; a
refused resume leaves the run's records as they were."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from attnlab.cli import main
from attnlab.errors import AttnlabError
from attnlab.fsutil import (LOCK_NAME, RunLockedError, folder_lock, lock_holder, pid_alive, remove_stale_temps,
                            temp_name, temp_owner)

HOLD = textwrap.dedent("""
    import sys, time
    from attnlab.fsutil import folder_lock
    with folder_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()  # until the test closes our stdin
""")


class Holder:
    """A second process holding the lock on ``folder`` until closed."""

    def __init__(self, folder: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture()
def holder(tmp_path):
    made = []

    def start(folder):
        made.append(Holder(folder))
        return made[-1]

    yield start
    for h in made:
        if h.proc.poll() is None:
            h.close()


def test_second_process_gets_one_line_error_naming_the_holder_pid(tmp_path, holder):
    h = holder(tmp_path / "run")
    assert lock_holder(tmp_path / "run") == h.proc.pid
    with pytest.raises(RunLockedError) as info:
        with folder_lock(tmp_path / "run", "run g/r"):
            pass
    text = str(info.value)
    assert f"pid {h.proc.pid}" in text and "run g/r" in text and "\n" not in text
    h.close()
    assert lock_holder(tmp_path / "run") is None
    with folder_lock(tmp_path / "run"):  # free once the holder is gone
        assert lock_holder(tmp_path / "run") is None or lock_holder(tmp_path / "run") == os.getpid()


def test_a_killed_holder_leaves_the_folder_unlocked(tmp_path, holder):
    h = holder(tmp_path / "run")
    h.proc.kill()
    h.proc.wait(timeout=30)
    with folder_lock(tmp_path / "run"):
        pass


def test_lock_is_reentrant_in_one_process(tmp_path):
    with folder_lock(tmp_path):
        with folder_lock(tmp_path):
            assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert (tmp_path / LOCK_NAME).read_text() == ""


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


def test_only_temp_files_of_dead_processes_are_removed(tmp_path, holder):
    target = tmp_path / "last.pt"
    live = holder(tmp_path / "other")
    dead = tmp_path / f".last.pt.{_dead_pid()}.deadbeef.tmp"
    dead_dash = tmp_path / f".last.pt.{_dead_pid()}-0badcafe.tmp"
    alive = tmp_path / f".last.pt.{live.proc.pid}.deadbeef.tmp"
    mine = temp_name(target)
    unrelated = tmp_path / ".other.pt.1.ab.tmp"
    for p in (dead, dead_dash, alive, mine, unrelated):
        p.write_bytes(b"x")
    assert temp_owner(mine) == os.getpid() and temp_owner(dead_dash) is not None
    removed = remove_stale_temps(target)
    assert sorted(removed) == sorted([dead, dead_dash])
    assert alive.exists() and mine.exists() and unrelated.exists()


def _manifest(tmp_path: Path, steps: int = 2) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    manifest = {
        "version": 1, "name": "tiny", "defaults": {"out_dir": str(tmp_path / "runs")},
        "model": {"vocab_size": 256, "d_model": 16, "num_layers": 1, "block_size": 16,
                  "attention": {"type": "standard", "num_heads": 2}},
        "data": {"source": "text", "path": str(corpus), "tokenizer": {"type": "byte"}},
        "train": {"steps": steps, "batch_size": 2, "eval_every": 2, "eval_batches": 1, "log_every": 1,
                  "device": "cpu"},
        "groups": [{"name": "g", "runs": [{"id": "base"}]}],
    }
    path = tmp_path / "tiny.yml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def test_concurrent_run_into_a_locked_folder_is_refused_and_writes_nothing(tmp_path, holder, capsys):
    manifest = _manifest(tmp_path)
    run_dir = tmp_path / "runs" / "tiny" / "g" / "base"
    h = holder(run_dir)
    for argv in (["run", str(manifest)], ["train", str(manifest), "--run", "g/base"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pid {h.proc.pid}" in err and "Traceback" not in err
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]
    h.close()
    assert main(["run", str(manifest)]) == 0
    assert (run_dir / "last.pt").is_file()


@pytest.mark.slow
def test_two_real_processes_one_wins(tmp_path):
    """Two ``attnlab train`` of one manifest at once: one trains, the other exits 2 naming a pid."""
    manifest = _manifest(tmp_path, steps=150)
    argv = [sys.executable, "-m", "attnlab.cli", "train", str(manifest), "--run", "g/base"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)][1].strip()
    assert len(loser.splitlines()) == 1 and "in use by another attnlab process (pid" in loser
    events = (tmp_path / "runs" / "tiny" / "g" / "base" / "train.jsonl").read_text().splitlines()
    assert sum('"event": "meta"' in e for e in events) == 1  # no interleaved second run


def test_a_refused_resume_leaves_the_records_as_they_were(tmp_path, capsys, monkeypatch):
    """The restore fails after the compatibility check (here: a patched restore refusing the
    optimizer state): command.txt, resolved_config.json and env.json stay as they were."""
    import attnlab.run as run_mod
    from attnlab.errors import CheckpointError

    manifest = _manifest(tmp_path)
    assert main(["train", str(manifest), "--run", "g/base", "train.steps=1"]) == 0
    run_dir = tmp_path / "runs" / "tiny" / "g" / "base"
    records = {n: (run_dir / n).read_bytes() for n in ("resolved_config.json", "command.txt", "env.json",
                                                        "train.jsonl", "last.pt")}

    def refuse(*args, checkpoint=None, **kwargs):
        assert checkpoint is not None  # a resume
        raise CheckpointError(f"{run_dir / 'last.pt'}: optimizer state does not match the model")

    monkeypatch.setattr(run_mod, "build_trainer", refuse)
    capsys.readouterr()
    assert main(["train", str(manifest), "--run", "g/base", "train.steps=4", "train.log_every=2"]) == 2
    err = capsys.readouterr().err
    assert "optimizer state" in err and len(err.strip().splitlines()) == 1
    assert {n: (run_dir / n).read_bytes() for n in records} == records


def test_bench_into_a_locked_run_folder_is_refused(tmp_path, holder, capsys):
    manifest = _manifest(tmp_path)
    assert main(["train", str(manifest), "--run", "g/base"]) == 0
    run_dir = tmp_path / "runs" / "tiny" / "g" / "base"
    h = holder(run_dir)
    capsys.readouterr()
    assert main(["bench", str(run_dir), "--suite", "perplexity", "--policies", "fp16", "--windows", "1",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"pid {h.proc.pid}" in err and len(err.splitlines()) == 1
    assert not (run_dir / "bench").exists()


def test_lock_error_is_an_attnlab_error():
    assert issubclass(RunLockedError, AttnlabError)


def test_a_run_removes_only_dead_writers_temp_files(tmp_path, holder, capsys):
    manifest = _manifest(tmp_path)
    run_dir = tmp_path / "runs" / "tiny" / "g" / "base"
    run_dir.mkdir(parents=True)
    live = holder(tmp_path / "elsewhere")
    dead = run_dir / f".last.pt.{_dead_pid()}.0123abcd.tmp"
    alive = run_dir / f".env.json.{live.proc.pid}-0123abcd.tmp"
    dead.write_bytes(b"partial")
    alive.write_bytes(b"partial")
    assert main(["train", str(manifest), "--run", "g/base"]) == 0
    assert not dead.exists() and alive.exists()
