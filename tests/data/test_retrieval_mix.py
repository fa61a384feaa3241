"""``data.source: retrieval_mix``: fixed-length documents of retrieval tasks and text."""

from __future__ import annotations

import numpy as np
import pytest

from attnlab.config.data import DataConfig, RetrievalMix
from attnlab.data import TrainBatches, eval_batches, load_splits
from attnlab.data.retrieval_mix import (
    build_document,
    document_spec,
    mix_documents,
    split_text,
    task_indices,
    task_seed,
)
from attnlab.data.retrieval_tasks import make_task
from attnlab.data.tokenizers import ByteTokenizer
from attnlab.errors import ConfigError

TOK = ByteTokenizer()
TEXT = ("Once upon a time a small fox ran through the woods and met an old owl who knew many songs. "
        "They sang together until the moon rose over the hill. ") * 40


def text_tokens() -> np.ndarray:
    return np.asarray(TOK.encode(TEXT), dtype=np.int64)


def mix(**kw) -> RetrievalMix:
    return RetrievalMix.model_validate({"length": 400, "documents": 40, "heldout_documents": 8, **kw})


def data_cfg(path, **mix_kw) -> DataConfig:
    return DataConfig.model_validate({"source": "retrieval_mix", "path": str(path), "val_fraction": 0.2,
                                      "retrieval_mix": {"length": 400, "documents": 40, "heldout_documents": 8,
                                                        **mix_kw}})


@pytest.mark.parametrize("kw", [{}, {"min_task_length": 300}, {"task_fraction": 1.0, "kinds": ["multikey"]}])
def test_documents_have_the_exact_length(kw):
    m = mix(**kw)
    docs = mix_documents(TOK, m, text_tokens(), "train")
    assert docs.shape == (40, 401) and docs.dtype == np.int64
    assert 0 <= docs.min() and docs.max() < 256


@pytest.mark.parametrize("min_task_length", [None, 300])
def test_task_tokens_equal_make_task(min_task_length):
    m = mix(min_task_length=min_task_length, sentence_filler=0.5)
    text = text_tokens()
    docs = mix_documents(TOK, m, text, "train")
    tasks = task_indices(m, "train")
    kinds, fillers = set(), set()
    for i in tasks:
        spec = document_spec(TOK, m, "train", int(i), len(text))
        assert spec.task_seed == task_seed(m, "train", int(i))
        task = make_task(TOK, spec.kind, spec.task_length, spec.depth, seed=spec.task_seed,
                         num_keys=4 if spec.kind == "multikey" else None, filler=None if spec.sentences else text)
        head = list(task.prompt) + list(task.answer) + TOK.encode(".")
        assert docs[i, : len(head)].tolist() == head
        rest = docs[i, len(head):]  # the rest of the document is text, from the spec's offset
        assert rest.tolist() == text[spec.text_offset: spec.text_offset + len(rest)].tolist()
        if min_task_length is None:
            assert len(head) == 401
        else:
            assert 300 <= spec.task_length <= 401 - len(task.answer) - 1
        kinds.add(spec.kind)
        fillers.add(spec.sentences)
    assert kinds == {"passkey", "multikey"} and fillers == {True, False}
    for i in sorted(set(range(40)) - set(tasks.tolist())):  # text windows
        spec = document_spec(TOK, m, "train", i, len(text))
        assert spec.kind is None and docs[i].tolist() == text[spec.text_offset: spec.text_offset + 401].tolist()


@pytest.mark.parametrize("fraction,expected", [(0.0, 0), (0.25, 10), (0.5, 20), (1.0, 40)])
def test_task_fraction_is_honoured(fraction, expected):
    m = mix(task_fraction=fraction)
    assert len(task_indices(m, "train")) == expected
    docs = mix_documents(TOK, m, text_tokens(), "train")
    header = TOK.encode("Find and remember")
    assert sum(d[: len(header)].tolist() == header for d in docs) == expected


def test_heldout_documents_share_no_seeds_or_text():
    m = mix()
    assert {task_seed(m, "train", i) for i in range(40)}.isdisjoint({task_seed(m, "heldout", i) for i in range(8)})
    assert min(task_seed(m, s, 0) for s in ("train", "heldout")) >= 2 ** 32  # above the benchmark's seeds
    text = np.arange(10_000) % 200
    parts = split_text(text, m, 0.2)
    assert len(parts["heldout"]) == 2000 and parts["train"].tolist() + parts["heldout"].tolist() == text.tolist()


def test_load_splits_windows_start_at_document_starts(tmp_path):
    src = tmp_path / "story.txt"
    src.write_text(TEXT)
    splits = load_splits(data_cfg(src, task_fraction=0.5), 256, tmp_path / "cache")
    assert splits.align == 401 and len(splits.train) == 40 * 401 and len(splits.val) == 8 * 401
    assert splits.description.startswith("retrieval_mix:")
    m = data_cfg(src, task_fraction=0.5).retrieval_mix
    parts = split_text(text_tokens(), m, 0.2)
    expected = mix_documents(TOK, m, parts["train"], "train")
    np.testing.assert_array_equal(np.asarray(splits.train).reshape(40, 401), expected)
    np.testing.assert_array_equal(np.asarray(splits.val).reshape(8, 401),
                                  mix_documents(TOK, m, parts["heldout"], "heldout"))
    docs = {tuple(d) for d in expected.tolist()}
    batches = TrainBatches(splits.train, 4, 400, seed=3, align=splits.align)
    for step in range(5):
        assert (batches.offsets(step, 0) % 401 == 0).all()
        x, y = batches.get(step, 0)
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            assert tuple(row_x + row_y[-1:]) in docs  # each window is one whole document
    for x, y in eval_batches(splits.val, 4, 400, 2, align=splits.align):
        assert x.shape[1] == 400
    again = load_splits(data_cfg(src, task_fraction=0.5), 256, tmp_path / "cache")  # cached
    assert again.path == splits.path


@pytest.mark.parametrize("section,key", [
    ({"length": 400, "task_fraction": 1.5}, "retrieval_mix.task_fraction"),
    ({"length": 400, "kinds": ["passkey", "haystack"]}, "retrieval_mix.kinds"),
    ({"length": 400, "documents": 0}, "retrieval_mix.documents"),
    ({"length": 400, "num_keys": 40}, "retrieval_mix.num_keys"),
    ({"length": 400, "sentence_filler": -0.1}, "retrieval_mix.sentence_filler"),
    ({"length": "long"}, "retrieval_mix.length"),
    ({"length": 400, "min_task_length": 500}, "min_task_length"),
    ({"length": 400, "frac": 0.5}, "retrieval_mix.frac"),
])
def test_bad_values_are_one_line_errors(tmp_path, section, key):
    from attnlab.config.base import validate_section

    with pytest.raises(ConfigError) as err:
        validate_section(DataConfig, {"source": "retrieval_mix", "path": "x.txt", "retrieval_mix": section}, "data")
    assert key in str(err.value) and "\n" not in str(err.value)


def test_missing_section_and_path_are_refused():
    from attnlab.config.base import validate_section

    for data, needle in (({"source": "retrieval_mix", "path": "x.txt"}, "retrieval_mix"),
                         ({"source": "retrieval_mix", "retrieval_mix": {"length": 64}}, "path"),
                         ({"source": "embedded", "retrieval_mix": {"length": 64}}, "retrieval_mix")):
        with pytest.raises(ConfigError, match=needle) as err:
            validate_section(DataConfig, data, "data")
        assert "\n" not in str(err.value)


def test_too_short_documents_name_the_key():
    with pytest.raises(ConfigError, match=r"data\.retrieval_mix\.length") as err:
        mix_documents(TOK, mix(length=100, task_fraction=1.0, kinds=["multikey"]), text_tokens(), "train")
    assert "\n" not in str(err.value)


def test_manifest_window_must_be_one_document(tmp_path):
    from attnlab.manifest import load_plan_from_dict

    src = tmp_path / "story.txt"
    src.write_text(TEXT)
    spec = {"version": 1, "name": "m", "defaults": {"out_dir": str(tmp_path / "runs")},
            "model": {"vocab_size": 256, "d_model": 32, "num_layers": 1, "block_size": 256,
                      "attention": {"type": "standard", "num_heads": 2}},
            "data": {"source": "retrieval_mix", "path": str(src), "retrieval_mix": {"length": 300}},
            "train": {"steps": 1}, "groups": [{"name": "g", "runs": [{"id": "r"}]}]}
    with pytest.raises(ConfigError, match=r"data\.retrieval_mix\.length: must equal the training window"):
        load_plan_from_dict(spec, tmp_path)
    spec["data"]["retrieval_mix"]["length"] = 256
    (run,) = load_plan_from_dict(spec, tmp_path).runs
    assert run.data.retrieval_mix.length == 256


def test_build_document_text_window():
    m = mix()
    text = text_tokens()
    spec = document_spec(TOK, m, "train", next(i for i in range(40) if i not in set(task_indices(m, "train"))),
                         len(text))
    assert build_document(TOK, m, spec, text).tolist() == text[spec.text_offset: spec.text_offset + 401].tolist()


def test_follow_up_questions_ask_about_every_other_key():
    m = mix(length=512, task_fraction=1.0, kinds=["multikey"], follow_up=True, min_task_length=260)
    text = text_tokens()
    spec = document_spec(TOK, m, "train", 0, len(text), text=text)
    doc = build_document(TOK, m, spec, text)
    assert len(doc) == 513
    task = make_task(TOK, "multikey", spec.task_length, spec.depth, seed=spec.task_seed, num_keys=4,
                     filler=None if spec.sentences else text)
    decoded = TOK.decode(doc.tolist())
    assert decoded.startswith(TOK.decode(list(task.prompt + task.answer)) + ".")
    tail = decoded[len(TOK.decode(list(task.prompt + task.answer))):]
    for name, value in task.pairs:  # the queried key was answered right after the prompt
        assert (f"The value of key {name} is {value}." in tail) == (name != task.key)
    assert len(task.pairs) == 4



def test_a_parallel_build_equals_the_sequential_one(monkeypatch):
    import attnlab.data.retrieval_mix as rm

    monkeypatch.setattr(rm, "PARALLEL_CHUNK", 7)  # 40 documents -> 6 worker tasks
    text = text_tokens()
    for m in (mix(), mix(min_task_length=300), mix(task_fraction=1.0, kinds=["multikey"])):
        assert np.array_equal(mix_documents(TOK, m, text, "train", workers=2),
                              mix_documents(TOK, m, text, "train", workers=1))
    bad = mix(min_task_length=399)  # no room for the answer: the worker's error reaches the caller as itself
    with pytest.raises(ConfigError, match="min_task_length"):
        mix_documents(TOK, bad, text, "train", workers=2)
