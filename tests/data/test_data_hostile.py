"""Hostile data files (issue 11): every malformed token file, sidecar, corpus input, unwritable
output or run pointer is a one-line ``AttnlabError`` (the CLI prints it and exits 2), never a
traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from attnlab.api import run_cache_policy, run_heldout_tokens, run_tokenizer
from attnlab.cli import main
from attnlab.config.data import DataConfig, TokenizerConfig
from attnlab.data import load_splits, prepare
from attnlab.errors import AttnlabError

BYTE = TokenizerConfig(type="byte")


def _one_line(fn, *args, **kwargs) -> str:
    with pytest.raises(AttnlabError) as info:
        fn(*args, **kwargs)
    text = str(info.value)
    assert text and "\n" not in text, text
    return text


def _tokens(path: Path) -> DataConfig:
    return DataConfig(source="tokens", path=str(path))


# ------------------------------------------------------------------ prepare outputs
@pytest.mark.parametrize("output, expected", [
    ("/proc/x.npy", "cannot write token file /proc/x.npy"),
    ("{tmp}/a.txt/x.npy", "cannot write token file"),  # a file where a folder should be
    ("{tmp}/folder.npy", "it is a folder"),
])
def test_prepare_unwritable_output(tmp_path, output, expected):
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "folder.npy").mkdir()
    out = output.format(tmp=tmp_path)
    assert expected in _one_line(prepare, [tmp_path / "a.txt"], out, BYTE)
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_prepare_to_proc_exits_2(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello world\n")
    assert main(["prepare", str(tmp_path / "a.txt"), "--tokenizer", "byte", "-o", "/proc/x.npy"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write token file /proc/x.npy" in err and "\n" not in err


def test_prepare_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    import sys

    prepare_module = sys.modules["attnlab.data.prepare"]  # the package re-exports the function by that name

    (tmp_path / "a.txt").write_text("hello world\n" * 100)

    def full(self, ids):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp))

    monkeypatch.setattr(prepare_module._TokenWriter, "write", full)
    text = _one_line(prepare, [tmp_path / "a.txt"], tmp_path / "x.npy", BYTE)
    assert "cannot write token file" in text and "No space left on device" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no temp file, no partial output


def test_prepare_unreadable_input_is_named(tmp_path):
    # /proc/self/mem exists and is a file but reading it from offset 0 fails with EIO
    assert "cannot read /proc/self/mem" in _one_line(prepare, [Path("/proc/self/mem")], tmp_path / "x.npy", BYTE)


# ------------------------------------------------------------------ hostile JSONL
@pytest.mark.parametrize("line, expected", [
    ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"text": ' + "9" * 5000 + "}", "invalid JSON"),
    ('{"text": "\\ud800"}', "unpaired surrogate"),
    ('{"text": NaN}', "is float, expected a string"),
    ("[1, 2]", "expected a JSON object"),
])
def test_hostile_jsonl(tmp_path, line, expected):
    (tmp_path / "c.jsonl").write_text(line + "\n")
    text = _one_line(prepare, [tmp_path / "c.jsonl"], tmp_path / "x.npy", BYTE)
    assert expected in text and "line 1" in text


# ------------------------------------------------------------------ hostile token files
def _npy_bytes(header: str, version: bytes = b"\x01\x00") -> bytes:
    head = header.encode("latin1")
    if version == b"\x01\x00":
        size = len(head).to_bytes(2, "little")
    else:
        size = len(head).to_bytes(4, "little")
    return b"\x93NUMPY" + version + size + head + b"\0" * 16


@pytest.mark.parametrize("make, expected", [
    (lambda p: np.save(p, np.array([1, "a", None], dtype=object), allow_pickle=True), "dtype object"),
    (lambda p: np.save(p, np.arange(4.0)), "dtype float64"),
    (lambda p: np.save(p, np.zeros((3, 3), np.uint16)), "1-D"),
    (lambda p: np.save(p, np.zeros(5, dtype=[("a", "<u2")])), "has dtype"),
    (lambda p: p.write_bytes(b""), "not a valid .npy file"),
    (lambda p: p.write_bytes(_npy_bytes("{'descr': '<u2', 'fortran_order': False, 'shape': (-5,), }  \n")),
     "not a valid .npy file"),
    (lambda p: p.write_bytes(_npy_bytes("{'descr': '<u2', 'fortran_order': False, 'shape': (4,), \n",
                                        b"\x03\x00")), "not a valid .npy file"),
    (lambda p: p.write_bytes(_npy_bytes("{'descr': <u2}  \n")), "not a valid .npy file"),
    (lambda p: p.write_bytes(_npy_bytes("{'descr': '<u2', 'fortran_order': False, 'shape': (1000000000000,), }\n")),
     "truncated"),
])
def test_hostile_token_file(tmp_path, make, expected):
    path = tmp_path / "t.npy"
    make(path)
    assert expected in _one_line(load_splits, _tokens(path), 300, tmp_path)


@pytest.mark.parametrize("sidecar", [
    "[]", "\xff\xfe", '{"format": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"format": "attnlab-tokens/1", "tokenizer": 5}',
    '{"format": "attnlab-tokens/1", "tokenizer": {"type": "byte"}, "vocab_size": [1]}',
])
def test_hostile_sidecar(tmp_path, sidecar):
    path = tmp_path / "t.npy"
    np.save(path, np.arange(200, dtype=np.uint16))
    (tmp_path / "t.json").write_bytes(sidecar.encode("latin1"))
    assert "sidecar" in _one_line(load_splits, _tokens(path), 300, tmp_path)


# ------------------------------------------------------------------ run folders
def _run_dir(tmp_path: Path, resolved: str | None = None, heldout: object = None) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    if resolved is not None:
        (run / "resolved_config.json").write_bytes(resolved.encode("latin1"))
    if heldout is not None:
        (run / "heldout.json").write_text(heldout if isinstance(heldout, str) else json.dumps(heldout))
    return run


@pytest.mark.parametrize("resolved", [
    "{not json", "[1, 2]", "\xff", '{"data": 5, "cache": [1], "model": "x"}',
    '{"data": {"tokenizer": {"type": "nope"}}, "cache": {"k": 5}}', "[" * 100_000,
])
def test_malformed_resolved_config(tmp_path, resolved):
    run = _run_dir(tmp_path, resolved)
    for fn in (run_tokenizer, run_cache_policy, run_heldout_tokens):
        _one_line(fn, run)


def test_heldout_pointing_at_object_array(tmp_path):
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([1, "a", None], dtype=object), allow_pickle=True)
    run = _run_dir(tmp_path, json.dumps({"data": {}, "model": {"vocab_size": 10}}),
                   {"path": str(obj), "val_start": 0, "align": 1})
    assert "dtype object" in _one_line(run_heldout_tokens, run)


@pytest.mark.parametrize("heldout, expected", [
    ("{", "unreadable heldout.json"),
    ([1], "must be a JSON object"),
    ({"val_start": 0, "align": 1}, "path must be"),
    ({"path": 5, "val_start": 0}, "path must be"),
    ({"path": "{tok}", "val_start": "0"}, "val_start must be an integer"),
    ({"path": "{tok}", "val_start": -1}, "val_start must be an integer"),
    ({"path": "{tok}", "val_start": 0, "align": 0}, "align must be an integer"),
    ({"path": "{tok}", "val_start": 10**6}, "past the end"),
    ({"path": "/nonexistent/x.npy", "val_start": 0}, "token file not found"),
    ({"path": "/etc/passwd", "val_start": 0}, ".npy token file"),
])
def test_hostile_heldout_pointer(tmp_path, heldout, expected):
    tok = tmp_path / "tok.npy"
    np.save(tok, np.arange(100, dtype=np.uint16))
    if isinstance(heldout, dict) and heldout.get("path") == "{tok}":
        heldout = {**heldout, "path": str(tok)}
    run = _run_dir(tmp_path, json.dumps({"data": {}, "model": {"vocab_size": 10}}), heldout)
    assert expected in _one_line(run_heldout_tokens, run)


def test_good_heldout_pointer_still_works(tmp_path):
    tok = tmp_path / "tok.npy"
    np.save(tok, np.arange(100, dtype=np.uint16))
    run = _run_dir(tmp_path, json.dumps({"data": {}, "model": {"vocab_size": 10}}),
                   {"path": str(tok), "val_start": 90, "align": 5})
    tokens, align = run_heldout_tokens(run, with_align=True)
    assert list(tokens) == list(range(90, 100)) and align == 5


def test_cli_sample_with_malformed_resolved_config(tmp_path, capsys):
    """``attnlab sample`` on a run folder whose resolved_config.json is broken: one line, exit 2."""
    from attnlab.api import build_model
    from attnlab.train.checkpoint import FORMAT, VERSION, save_checkpoint

    run = _run_dir(tmp_path, "{broken")
    model = build_model({"vocab_size": 16, "d_model": 16, "num_layers": 1, "block_size": 8,
                         "attention": {"type": "standard", "num_heads": 2}})
    save_checkpoint(run / "last.pt", {"format": FORMAT, "version": VERSION,
                                      "model_config": model.config.model_dump(), "model": model.state_dict()})
    from attnlab.api import load

    assert load(run).config == model.config  # the weights alone do not need the run record
    code = main(["sample", "--ckpt", str(run), "--prompt", "hi", "--max-new-tokens", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "resolved_config.json" in err and "\n" not in err, err


@pytest.mark.parametrize("command", [
    ["bench", "{run}"],
    ["report", "{run}", "--out", "{out}"],
    ["sample", "--ckpt", "{run}", "--prompt", "hi", "--max-new-tokens", "1"],
])
def test_cli_on_deeply_nested_resolved_config(tmp_path, capsys, command):
    """A 100,000-deep ``resolved_config.json``: one line and exit 2 from every command reading it."""
    from attnlab.api import build_model
    from attnlab.train.checkpoint import FORMAT, VERSION, save_checkpoint

    run = tmp_path / "g" / "r"
    run.mkdir(parents=True)
    (run / "resolved_config.json").write_text("[" * 100_000)
    model = build_model({"vocab_size": 16, "d_model": 16, "num_layers": 1, "block_size": 8,
                         "attention": {"type": "standard", "num_heads": 2}})
    save_checkpoint(run / "last.pt", {"format": FORMAT, "version": VERSION,
                                      "model_config": model.config.model_dump(), "model": model.state_dict()})
    argv = [a.format(run=run, out=tmp_path / "rep") for a in command]
    code = main(argv)  # a RecursionError propagates out of main: the traceback the CLI would print
    err = capsys.readouterr().err.strip()
    assert code == 2 and "resolved_config.json" in err and "\n" not in err, err
