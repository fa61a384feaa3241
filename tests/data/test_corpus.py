from __future__ import annotations

import numpy as np

from attnlab.config.data import DataConfig
from attnlab.data import embedded_corpus_files, embedded_description, load_splits, stdlib_root
from attnlab.data.corpus import SKIP_DIRS


def test_embedded_files_deterministic_and_filtered():
    files = embedded_corpus_files()
    assert files and files == embedded_corpus_files()
    root = stdlib_root()
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel)
    assert all(r.endswith(".py") for r in rel)
    assert not any(set(r.split("/")[:-1]) & SKIP_DIRS for r in rel)
    assert "os.py" in rel


def test_embedded_max_bytes():
    first = embedded_corpus_files(max_bytes=1)
    assert len(first) == 1 and first == embedded_corpus_files()[:1]
    some = embedded_corpus_files(max_bytes=100_000)
    sizes = [p.stat().st_size for p in some]
    assert sum(sizes) >= 100_000 and sum(sizes[:-1]) < 100_000


def test_embedded_load_splits_deterministic(tmp_path):
    cfg = DataConfig.model_validate({"source": "embedded", "max_tokens": 20_000, "val_fraction": 0.1})
    a = load_splits(cfg, 256, tmp_path / "a")
    b = load_splits(cfg, 256, tmp_path / "b")
    assert (len(a.train), len(a.val)) == (18_000, 2_000)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)
    assert a.tokenizer.type == "byte" and a.vocab_size == 256
    assert a.description.startswith(embedded_description() + ", ")
    assert " files (20.0K tokens, byte, sha256 " in a.description


def test_embedded_description():
    assert embedded_description(3).startswith("embedded: Python 3.")
    assert embedded_description(3).endswith(" stdlib, 3 files")
