"""``attnlab.runfolder``: a run folder's paths, typed readers, archive and model-only checkpoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))

from attnlab import api  # noqa: E402
from attnlab.config import DataConfig  # noqa: E402
from attnlab.config.data import TokenizerConfig  # noqa: E402
from attnlab.errors import AttnlabError, CheckpointError  # noqa: E402
from attnlab.model import build_model  # noqa: E402
from attnlab.run import execute_run  # noqa: E402
from attnlab.runfolder import (OneLineOSErrors, RunFolder, check_run_paths, data_cache_dir,  # noqa: E402
                               load_checkpoint_model, read_events, resolve_checkpoint)
from train_helpers import make_run, model_config, synthetic_splits, train_config  # noqa: E402


def _resolved(folder: Path, **sections) -> RunFolder:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "resolved_config.json").write_text(json.dumps(sections))
    return RunFolder(folder)


def test_paths_and_of(tmp_path):
    folder = RunFolder(tmp_path / "out" / "m" / "g" / "r")
    assert folder.resolved_config_path.name == "resolved_config.json"
    assert (folder.events_path.name, folder.last.name, folder.best.name) == ("train.jsonl", "last.pt", "best.pt")
    assert folder.bench_dir == folder.path / "bench" and folder.heldout_path.name == "heldout.json"
    folder.path.mkdir(parents=True)
    (folder.path / "last.pt").write_bytes(b"x")
    assert RunFolder.of(folder.path / "last.pt").path == folder.path  # a file: the folder holding it
    assert RunFolder.of(folder.path).path == folder.path
    assert data_cache_dir(DataConfig(), folder.path) == tmp_path / "out" / "m" / ".data"
    assert folder.data_cache_dir(DataConfig(cache_dir=str(tmp_path / "c"))) == tmp_path / "c"


def test_resolve_checkpoint_prefers_best(tmp_path):
    with pytest.raises(CheckpointError, match="holds no best.pt or last.pt"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "last.pt").write_bytes(b"x")
    assert RunFolder(tmp_path).checkpoint() == tmp_path / "last.pt"
    (tmp_path / "best.pt").write_bytes(b"x")
    assert resolve_checkpoint(tmp_path) == tmp_path / "best.pt"
    assert resolve_checkpoint(tmp_path / "last.pt") == tmp_path / "last.pt"


def test_model_only_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(model_config())
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.save_model(model, {"source": "teacher-x"})
    assert folder.best.is_file() and folder.last.is_file()
    assert folder.read_checkpoint()["source"] == "teacher-x"
    loaded = folder.load_model()
    assert not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.equal(api.load(folder.path)(ids), loaded(ids))
    assert torch.equal(load_checkpoint_model(folder.last)(ids), loaded(ids))


def test_archive_previous(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.archive_previous() is None
    for name in ("train.jsonl", "last.pt", "best.pt", "resolved_config.json"):
        (tmp_path / name).write_text(name)
    dest = folder.archive_previous()
    assert dest.parent == tmp_path / "previous"
    assert sorted(p.name for p in dest.iterdir()) == ["best.pt", "last.pt", "train.jsonl"]
    assert not folder.events_path.exists() and not folder.has_checkpoint()
    assert folder.resolved_config_path.is_file()  # provenance is rewritten, not archived


def test_typed_sections(tmp_path):
    bare = RunFolder(tmp_path / "bare")
    assert bare.resolved_config() is None and bare.model_config() is None
    assert bare.tokenizer_config() is None and bare.tokenizer() is None and bare.cache_policy() is None
    with pytest.raises(AttnlabError, match="run's data is unknown"):
        bare.heldout_tokens()
    cfg = model_config()
    folder = _resolved(tmp_path / "run", model=cfg.model_dump(mode="json"),
                       data={"tokenizer": {"type": "byte"}}, cache={"default": "q8_0", "tail": 4})
    assert folder.model_config() == cfg
    assert folder.tokenizer_config() == TokenizerConfig(type="byte")
    assert folder.tokenizer().encode("ab") == [97, 98]
    assert folder.cache_policy() == "q8_0,tail=4"
    # the api shorthands read the same thing, from the folder or a file in it
    assert api.run_tokenizer(folder.path / "best.pt") == folder.tokenizer_config()
    assert api.run_cache_policy(folder.path) == folder.cache_policy()


def test_bad_sections_are_one_line(tmp_path):
    folder = _resolved(tmp_path, data=5)
    with pytest.raises(CheckpointError, match="data must be a mapping"):
        folder.tokenizer_config()
    (tmp_path / "resolved_config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="must be a JSON object"):
        folder.resolved_config()


def test_heldout_pointer_round_trip(tmp_path):
    tokens = tmp_path / "tok.npy"
    np.save(tokens, np.arange(50, dtype=np.uint16))
    folder = _resolved(tmp_path / "run", data={}, model={"vocab_size": 64})
    folder.write_heldout_pointer(tokens, 40, 5)
    held, align = folder.heldout_tokens(with_align=True)
    assert list(held) == list(range(40, 50)) and align == 5
    assert list(api.run_heldout_tokens(folder.path)) == list(range(40, 50))


def test_read_events_torn_tail_and_bad_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"event": "meta"}\n\n{"event": "done", "val_loss": 1.5}\n{"event": "tra')
    assert read_events(path) == [(1, {"event": "meta"}), (3, {"event": "done", "val_loss": 1.5})]
    assert RunFolder(tmp_path).events()[-1]["val_loss"] == 1.5
    path.write_text('{"event": "meta"}\nnot json\n{"event": "done"}\n')
    with pytest.raises(AttnlabError, match="train.jsonl:2: not a JSON event"):
        read_events(path)
    path.write_text("[1]\n")
    with pytest.raises(AttnlabError, match="not a JSON event object"):
        read_events(path)


def test_one_line_os_errors():
    with pytest.raises(AttnlabError) as info:
        with OneLineOSErrors("somewhere"):
            raise OSError(28, "No space left on device", "/x/last.pt")
    assert str(info.value).startswith("/x/last.pt: ") and "\n" not in str(info.value)


def test_a_trained_run_folder_reads_back(tmp_path):
    run = make_run(tmp_path / "out", train=train_config(steps=2, eval_every=2, log_every=1))
    assert check_run_paths(run) == Path(run.run_dir)
    result = execute_run(run, "attnlab run t.yml", splits=synthetic_splits())
    folder = RunFolder(result.run_dir)
    assert folder.model_config() == run.model
    assert folder.checkpoint() == folder.best
    assert [e["event"] for e in folder.events()][-1] == "done"
    ids = torch.randint(0, run.model.vocab_size, (1, 8))
    assert torch.equal(folder.load_model()(ids), api.load(folder.path)(ids))
    with folder.lock("test"):  # the same process may nest the lock (the runner holds it)
        with folder.lock("test again"):
            pass
