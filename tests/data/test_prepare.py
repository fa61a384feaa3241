from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

from attnlab.config.data import TokenizerConfig
from attnlab.data import build_tokenizer, open_tokens, prepare, read_sidecar
from attnlab.data.prepare import output_dtype, sidecar_path
from attnlab.errors import DataError

# attnlab.data.prepare is the function (re-exported); fetch the module itself
prep_mod = importlib.import_module("attnlab.data.prepare")
sources = importlib.import_module("attnlab.data.sources")
BYTE = TokenizerConfig(type="byte")


def as_text(path) -> str:
    return bytes(np.load(path).astype(np.uint8)).decode()


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_prepare_text_file_and_sidecar(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("héllo\nworld\n")
    out = tmp_path / "out" / "tokens.npy"
    stats = prepare([src], out, BYTE, val_fraction=0.25)
    data = np.load(out)  # a regular .npy, readable without attnlab
    assert data.dtype == np.uint8 and bytes(data) == src.read_bytes()  # a byte vocabulary fits uint8
    assert (stats.num_tokens, stats.num_documents, stats.dtype) == (13, 1, "uint8")
    assert stats.output == out and stats.num_val_tokens == 3 and stats.seconds >= 0
    side = json.loads(sidecar_path(out).read_text())
    assert sidecar_path(out).name == "tokens.json"
    assert side["tokenizer"] == {"type": "byte", "path": None} and side["vocab_size"] == 256
    assert side["num_tokens"] == 13 and side["inputs"] == [str(src.resolve())]
    assert len(side["inputs_sha256"]) == 64 and side["tokens_sha256"] == stats.tokens_sha256
    assert read_sidecar(out) == side
    assert isinstance(open_tokens(out), np.memmap)


def test_output_dtype_by_vocab(tmp_path):
    assert output_dtype(256) == np.uint8 and output_dtype(257) == np.uint16 and output_dtype(65536) == np.uint16
    assert output_dtype(65537) == np.uint32 and output_dtype(100_277) == np.uint32


def test_folder_walk_sorted_and_skips_binary(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b.md").write_text("BB")
    (root / "a.txt").write_text("AA")
    (root / "sub" / "c.py").write_text("CC")
    (root / "sub" / "d.jsonl").write_text('{"text": "DD"}\n')
    (root / "notes.csv").write_text("ignored")  # not a text suffix
    (root / ".hidden" / "x.txt").write_text("hidden")
    (root / "binary.txt").write_bytes(b"\x00\x01\x02")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "empty.txt").write_text("")
    out = tmp_path / "t.npy"
    stats = prepare([root], out, BYTE)
    assert as_text(out) == "AA\n\nBB\n\nCC\n\nDD"
    assert stats.num_documents == 4 and stats.num_skipped_files == 2
    assert sorted(p.name for p in stats.skipped) == ["binary.txt", "latin1.txt"]


def test_jsonl_parse_and_text_field(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "one", "id": 1}\n\n{"text": ""}\n{"text": "two ✓"}\n')
    out = tmp_path / "j.npy"
    stats = prepare([src], out, BYTE)
    assert as_text(out) == "one\n\ntwo ✓" and stats.num_documents == 2
    src2 = tmp_path / "other.jsonl"
    src2.write_text('{"content": "abc"}\n')
    prepare([src2], out, BYTE, text_field="content")
    assert as_text(out) == "abc"


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "invalid JSON"),
    ('["text"]', "expected a JSON object"),
    ('{"body": "x"}', "no field 'text'"),
    ('{"text": 3}', "field 'text' is int"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, message):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "a"}\n{"text": "b"}\n' + line + "\n")
    out = tmp_path / "bad.npy"
    with pytest.raises(DataError, match=f"{src} line 3: {message}"):
        prepare([src], out, BYTE)
    assert not out.exists() and leftovers(tmp_path) == []


class ExplodingTokenizer:
    name, vocab_size, eot_id = "boom", 256, None

    def __init__(self):
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        if self.calls > 2:
            raise RuntimeError("tokenizer exploded")
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode()


def test_atomic_write_when_tokenizer_fails_midway(tmp_path, monkeypatch):
    for i in range(5):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n" * 50)
    out = tmp_path / "out.npy"
    out.write_bytes(b"previous contents")
    sidecar_path(out).write_text("{}")
    tok = ExplodingTokenizer()
    monkeypatch.setattr(prep_mod, "build_tokenizer", lambda cfg, **kw: tok)
    monkeypatch.setattr(prep_mod, "_BATCH_CHARS", 1)  # one document per batch: writes happen first
    with pytest.raises(RuntimeError, match="exploded"):
        prepare(sorted(tmp_path.glob("doc*.txt")), out, BYTE)
    assert tok.calls == 3  # two documents were written to the temp file before the failure
    assert out.read_bytes() == b"previous contents" and sidecar_path(out).read_text() == "{}"
    assert leftovers(tmp_path) == []


def test_atomic_write_when_input_fails_midway(tmp_path, monkeypatch):
    src = tmp_path / "broken.txt"
    src.write_bytes(b"good line\n" * 20 + b"\xff\xfe bad bytes\n")
    monkeypatch.setattr(sources, "_READ_BLOCK", 16)
    monkeypatch.setattr(prep_mod, "_BATCH_CHARS", 1)
    out = tmp_path / "x.npy"
    with pytest.raises(DataError, match=f"{src} is not UTF-8 text \\(byte 200\\)"):
        prepare([src], out, BYTE)
    assert not out.exists() and not sidecar_path(out).exists() and leftovers(tmp_path) == []


def test_max_tokens_and_progress(tmp_path):
    src = tmp_path / "big.txt"
    src.write_text("0123456789\n" * 2000)
    out = tmp_path / "capped.npy"
    calls = []
    stats = prepare([src], out, BYTE, max_tokens=1234, progress=lambda d, t: calls.append((d, t)))
    assert stats.num_tokens == 1234 and stats.truncated and len(np.load(out)) == 1234
    assert calls and all(t == src.stat().st_size for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    calls.clear()
    full = prepare([src], tmp_path / "full.npy", BYTE, progress=lambda d, t: calls.append((d, t)))
    assert not full.truncated and calls[-1] == (src.stat().st_size,) * 2


def test_input_errors(tmp_path):
    with pytest.raises(DataError, match="data path not found"):
        prepare([tmp_path / "nope.txt"], tmp_path / "o.npy", BYTE)
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(DataError, match="empty corpus"):
        prepare([tmp_path / "e.txt"], tmp_path / "o.npy", BYTE)
    assert not (tmp_path / "o.npy").exists() and leftovers(tmp_path) == []
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.bin").write_bytes(b"1")
    with pytest.raises(DataError, match="has no text files"):
        prepare([tmp_path / "folder"], tmp_path / "o.npy", BYTE)
    with pytest.raises(DataError, match="writes a .npy"):
        prepare([tmp_path / "e.txt"], tmp_path / "o.bin", BYTE)


def test_gpt2_documents_joined_with_eot(tmp_path, gpt2_cfg):
    (tmp_path / "a.txt").write_text("Hello world")
    (tmp_path / "b.txt").write_text("Hello world")
    out = tmp_path / "g.npy"
    stats = prepare([tmp_path / "a.txt", tmp_path / "b.txt"], out, gpt2_cfg)
    assert np.load(out).tolist() == [15496, 995, 50256, 15496, 995]
    assert stats.dtype == "uint16" and read_sidecar(out)["eot_id"] == 50256


def test_gpt2_chunked_reading_matches_whole_text(tmp_path, gpt2_cfg, monkeypatch):
    import inspect
    text = (inspect.getsource(prep_mod) + "\n\n  \r\nx\n\n\ny  z\n \n" + "word\n" * 300
            + "Windows line\r\n" * 100 + "end \n\n")
    src = tmp_path / "code.py"
    src.write_bytes(text.encode())
    monkeypatch.setattr(sources, "_READ_BLOCK", 61)
    monkeypatch.setattr(prep_mod, "_BATCH_CHARS", 500)
    out = tmp_path / "c.npy"
    prepare([src], out, gpt2_cfg)
    assert np.load(out).tolist() == build_tokenizer(gpt2_cfg).encode(text)


def test_safe_cut_points_preserve_gpt2_tokens(gpt2_cfg):
    import random
    tok = build_tokenizer(gpt2_cfg)
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "  ", "\n", "\r\n", "\r", "\t", "'s", "1", ".", "é", "\u00a0"]
    checked = 0
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(5, 60)))
        for end in range(2, len(text) + 1):
            cut = sources._safe_cut(text[:end])
            if cut:
                checked += 1
                assert tok.encode(text[:cut]) + tok.encode(text[cut:]) == tok.encode(text), repr((text, cut))
    assert checked > 100
