from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from attnlab.config.data import DataConfig
from attnlab.data import TrainBatches, eval_batches, load_splits, open_tokens
from attnlab.data import tokens as tokens_mod
from attnlab.data.prepare import SIDECAR_FORMAT, sidecar_path
from attnlab.data.tokens import scan_tokens, split_tokens
from attnlab.errors import DataError


def tokens_cfg(path, **kw) -> DataConfig:
    return DataConfig.model_validate({"source": "tokens", "path": str(path), **kw})


def write_sidecar(npy, n, tok="gpt2", vocab=50257, **extra):
    data = {"format": SIDECAR_FORMAT, "num_tokens": n, "tokenizer": {"type": tok, "path": None},
            "vocab_size": vocab, "description": "hand-written", **extra}
    sidecar_path(npy).write_text(json.dumps(data))


# --- token files -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["uint16", "uint32", "int32", "int64"])
def test_npy_roundtrip(tmp_path, dtype):
    data = (np.arange(1000) * 7 % 251).astype(dtype)
    path = tmp_path / "t.npy"
    np.save(path, data)
    splits = load_splits(tokens_cfg(path, val_fraction=0.1), 256, tmp_path / "cache")
    assert isinstance(splits.train, np.memmap)
    np.testing.assert_array_equal(np.concatenate([splits.train, splits.val]), data)
    assert splits.tokenizer is None and splits.vocab_size == int(data.max()) + 1
    assert splits.description.startswith(f"tokens:{path} (1000 tokens, sha256 ")


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_roundtrip(tmp_path, dtype):
    data = np.arange(500, dtype=dtype)
    path = tmp_path / "t.bin"
    data.tofile(path)
    splits = load_splits(tokens_cfg(path, bin_dtype=dtype), 1000, tmp_path)
    np.testing.assert_array_equal(np.concatenate([splits.train, splits.val]), data)
    assert splits.train.dtype == np.dtype(dtype)


def test_bin_size_not_multiple_of_dtype(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02\x00\x03")
    with pytest.raises(DataError, match="not a multiple of uint16"):
        open_tokens(path, "uint16")
    path.write_bytes(b"\x01\x00" * 3)
    with pytest.raises(DataError, match="not a multiple of uint32"):
        open_tokens(path, "uint32")


def test_missing_and_bad_token_files(tmp_path):
    with pytest.raises(DataError, match="token file not found: .*missing.npy"):
        load_splits(tokens_cfg(tmp_path / "missing.npy"), 256, tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="must end in .npy or .bin"):
        open_tokens(tmp_path / "x.txt")
    np.save(tmp_path / "f.npy", np.zeros(10, np.float32))
    with pytest.raises(DataError, match="dtype float32"):
        open_tokens(tmp_path / "f.npy")
    np.save(tmp_path / "m.npy", np.zeros((2, 5), np.uint16))
    with pytest.raises(DataError, match="1-D"):
        open_tokens(tmp_path / "m.npy")
    np.save(tmp_path / "e.npy", np.zeros(0, np.uint16))
    with pytest.raises(DataError, match="empty"):
        open_tokens(tmp_path / "e.npy")
    np.save(tmp_path / "cut.npy", np.zeros(100, np.uint16))
    raw = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[:-10])
    with pytest.raises(DataError, match="truncated"):
        open_tokens(tmp_path / "cut.npy")


def test_scan_is_chunked_and_exact():
    data = np.random.default_rng(0).integers(0, 5000, size=10_001).astype(np.uint16)
    lo, hi, sha = scan_tokens(data, chunk=97)
    assert (lo, hi) == (int(data.min()), int(data.max()))
    assert sha == scan_tokens(data)[2]


# --- splits and validation ---------------------------------------------------------------------

def test_val_is_the_tail_and_disjoint(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.arange(1000, dtype=np.int32))
    splits = load_splits(tokens_cfg(path, val_fraction=0.1), 1000, tmp_path)
    assert len(splits.train) == 900 and len(splits.val) == 100
    np.testing.assert_array_equal(splits.val, np.arange(900, 1000))
    assert not set(splits.train.tolist()) & set(splits.val.tolist())


def test_split_sizes_never_empty():
    train, val = split_tokens(np.arange(5), 0.05)
    assert (len(train), len(val)) == (4, 1)
    with pytest.raises(DataError, match="too few to split"):
        split_tokens(np.arange(1), 0.1)


def test_vocab_overflow_message_names_tokenizer(tmp_path):
    path = tmp_path / "y.npy"
    np.save(path, np.array([15496, 995, 50256, 11], dtype=np.uint16))
    write_sidecar(path, 4)
    with pytest.raises(DataError) as err:
        load_splits(tokens_cfg(path), 256, tmp_path)
    assert str(err.value) == (
        f"token id 50256 in {path} reaches the model's vocab_size 256 (tokenizer gpt2 has 50257)")
    splits = load_splits(tokens_cfg(path), 50257, tmp_path)
    assert splits.tokenizer.type == "gpt2" and splits.vocab_size == 50257


def test_vocab_overflow_without_sidecar(tmp_path):
    path = tmp_path / "z.npy"
    np.save(path, np.array([1, 2, 300, 4], dtype=np.uint16))
    with pytest.raises(DataError, match=r"token id 300 in .* vocab_size 256 \(no tokenizer sidecar\)"):
        load_splits(tokens_cfg(path), 256, tmp_path)


def test_negative_token_id(tmp_path):
    path = tmp_path / "n.npy"
    np.save(path, np.array([1, -1, 3], dtype=np.int32))
    with pytest.raises(DataError, match="negative token id -1"):
        load_splits(tokens_cfg(path), 256, tmp_path)


def test_sidecar_checks(tmp_path):
    path = tmp_path / "s.npy"
    np.save(path, np.arange(100, dtype=np.uint16))
    write_sidecar(path, 100, tok="byte", vocab=300)
    with pytest.raises(DataError, match="vocab_size 300 does not match tokenizer byte"):
        load_splits(tokens_cfg(path), 512, tmp_path)
    write_sidecar(path, 100, tok="gpt2")
    with pytest.raises(DataError, match="tokenized with gpt2 .* data.tokenizer.type is byte"):
        load_splits(tokens_cfg(path, tokenizer={"type": "byte"}), 512, tmp_path)
    write_sidecar(path, 99, tok="gpt2")
    with pytest.raises(DataError, match="records 99"):
        load_splits(tokens_cfg(path), 512, tmp_path)
    write_sidecar(path, 100, tok="gpt2", tokens_sha256="0" * 64)
    with pytest.raises(DataError, match="does not match the checksum"):
        load_splits(tokens_cfg(path), 512, tmp_path)
    sidecar_path(path).write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_splits(tokens_cfg(path), 512, tmp_path)


def test_max_tokens_caps_token_file(tmp_path):
    path = tmp_path / "c.npy"
    np.save(path, np.arange(1000, dtype=np.uint16))
    splits = load_splits(tokens_cfg(path, max_tokens=200, val_fraction=0.1), 1000, tmp_path)
    assert (len(splits.train), len(splits.val)) == (180, 20)
    assert splits.val[-1] == 199


# --- text sources and the cache ----------------------------------------------------------------

def test_text_source_file_folder_jsonl(tmp_path):
    (tmp_path / "one.txt").write_text("hello")
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.md").write_text("BB")
    (folder / "sub" / "a.py").write_text("AA")
    (tmp_path / "d.jsonl").write_text('{"body": "x1"}\n{"body": "y2"}\n')
    cache = tmp_path / "cache"

    def load(path, **kw):
        s = load_splits(DataConfig.model_validate({"source": "text", "path": str(path), "val_fraction": 0.2, **kw}),
                        256, cache)
        return bytes(np.concatenate([s.train, s.val]).astype(np.uint8)).decode(), s

    text, s = load(tmp_path / "one.txt")
    assert text == "hello" and s.tokenizer.type == "byte" and s.vocab_size == 256
    assert s.description.startswith(f"text:{tmp_path / 'one.txt'} (5 tokens, byte, sha256 ")
    assert load(folder)[0] == "BB\n\nAA"  # sorted relative paths: b.md < sub/a.py
    assert load(tmp_path / "d.jsonl", text_field="body")[0] == "x1\n\ny2"
    with pytest.raises(DataError, match="data path not found"):
        load(tmp_path / "absent")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty corpus"):
        load(tmp_path / "empty.txt")


def test_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    src = tmp_path / "corpus.txt"
    src.write_text("some text " * 100)
    cfg = DataConfig.model_validate({"source": "text", "path": str(src)})
    calls = []
    real = tokens_mod.prepare_files
    monkeypatch.setattr(tokens_mod, "prepare_files", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = load_splits(cfg, 256, tmp_path / "cache")
    mtime = os.stat(first.path).st_mtime_ns
    second = load_splits(cfg, 256, tmp_path / "cache")
    assert len(calls) == 1 and second.path == first.path and os.stat(second.path).st_mtime_ns == mtime
    np.testing.assert_array_equal(first.val, second.val)
    capped = load_splits(cfg.model_copy(update={"max_tokens": 50}), 256, tmp_path / "cache")
    assert len(calls) == 2 and capped.path != first.path
    src.write_text("other text " * 100)
    load_splits(cfg, 256, tmp_path / "cache")
    assert len(calls) == 3


def test_cfg_cache_dir_overrides_argument(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("abcdef")
    cfg = DataConfig.model_validate({"source": "text", "path": str(src), "cache_dir": str(tmp_path / "mine")})
    splits = load_splits(cfg, 256, tmp_path / "default")
    assert splits.path.parent == tmp_path / "mine"


# --- batches -----------------------------------------------------------------------------------

def test_train_batches_shapes_and_shift():
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = TrainBatches(tokens, batch_size=4, seq_len=16, seed=0).get(step=3, micro=0)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(4, 16))  # contiguous windows


def test_train_batches_deterministic_and_resumable():
    tokens = np.random.default_rng(1).integers(0, 256, size=50_000).astype(np.uint16)
    a = TrainBatches(tokens, 8, 32, seed=7)
    b = TrainBatches(tokens, 8, 32, seed=7)  # a "resumed" run: fresh object, same arguments
    run = [a.get(s, m) for s in range(5) for m in range(2)]
    for i, (s, m) in enumerate((s, m) for s in range(5) for m in range(2)):
        x, y = b.get(s, m)
        assert torch.equal(x, run[i][0]) and torch.equal(y, run[i][1])
    assert not torch.equal(a.get(1, 0)[0], a.get(2, 0)[0])
    assert not torch.equal(a.get(1, 0)[0], a.get(1, 1)[0])
    assert not torch.equal(a.get(1, 0)[0], TrainBatches(tokens, 8, 32, seed=8).get(1, 0)[0])
    r1 = TrainBatches(tokens, 8, 32, seed=7, rank=1, world_size=2)
    r0 = TrainBatches(tokens, 8, 32, seed=7, rank=0, world_size=2)
    assert not torch.equal(r0.get(1, 0)[0], r1.get(1, 0)[0])


def test_rank_shards_disjoint():
    n, world = 4_000, 4
    tokens = np.arange(n, dtype=np.uint32)
    seen = []
    for rank in range(world):
        tb = TrainBatches(tokens, 16, 8, seed=0, rank=rank, world_size=world)
        vals = torch.cat([torch.cat(tb.get(s, 0)).flatten() for s in range(20)])
        lo, hi = rank * n // world, (rank + 1) * n // world
        assert int(vals.min()) >= lo and int(vals.max()) < hi
        seen.append(set(vals.tolist()))
    for i in range(world):
        for j in range(i + 1, world):
            assert not seen[i] & seen[j]


def test_train_batches_works_on_memmap_and_short_shard_errors(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, np.arange(100, dtype=np.uint16))
    mm = open_tokens(path)
    x, _ = TrainBatches(mm, 2, 10, seed=0).get(0, 0)
    assert x.shape == (2, 10)
    with pytest.raises(DataError, match="shard 1 of 4 has 25 tokens"):
        TrainBatches(mm, 2, 30, seed=0, rank=1, world_size=4)


def test_eval_batches_fixed_evenly_spaced_non_overlapping():
    val = np.arange(1000, dtype=np.uint16)
    batches = eval_batches(val, batch_size=4, seq_len=10, num_batches=3)
    again = eval_batches(val, batch_size=4, seq_len=10, num_batches=3)
    assert len(batches) == 3
    for (x, y), (x2, y2) in zip(batches, again, strict=True):
        assert x.shape == (4, 10) and torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(x[:, 1:], y[:, :-1])
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert int(starts[0]) == 0 and int(batches[-1][1][-1, -1]) == 999  # spans the whole split
    assert bool((starts.diff() >= 10).all())  # targets never overlap


def test_eval_batches_capped():
    val = np.arange(101, dtype=np.uint16)  # 10 windows of seq_len 10 fit
    assert len(eval_batches(val, batch_size=4, seq_len=10, num_batches=50)) == 2
    small = eval_batches(np.arange(40), batch_size=8, seq_len=10, num_batches=5)
    assert len(small) == 1 and small[0][0].shape == (3, 10)
    with pytest.raises(DataError, match="validation split has 10 tokens"):
        eval_batches(np.arange(10), batch_size=2, seq_len=10, num_batches=1)


def test_aligned_windows_start_at_document_starts():
    from attnlab.data import TrainBatches, eval_batches
    import numpy as np

    docs = np.repeat(np.arange(20, dtype=np.int64), 10)  # 20 documents of 10 tokens, doc i = i's
    sampler = TrainBatches(docs, 8, 9, seed=3, align=10)
    for step in range(5):
        x, y = sampler.get(step, 0)
        assert (x == x[:, :1]).all() and (y == x[:, :1]).all()  # one document per window
    for x, y in eval_batches(docs, 4, 9, 3, align=10):
        assert (x == x[:, :1]).all() and (y == x[:, :1]).all()
