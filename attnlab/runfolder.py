"""What a run folder contains, and how to read and write it.

A run folder ``<out_dir>/<manifest name>/<group>/<run id>/`` holds::

    resolved_config.json   the run's resolved manifest sections (model, data, train, cache, ...)
    command.txt, env.json  provenance (written by ``attnlab.provenance``)
    train.jsonl            events: meta, train, eval, done (``attnlab.train.events``)
    last.pt, best.pt       checkpoints (``attnlab.train.checkpoint``); import/upcycle runs write
                           model-only ones (``save_model``)
    heldout.json           runs whose data was prepared at run time (teacher samples): where the
                           held-out tokens are, ``{"path", "val_start", "align"}``
    tuned_policy.json      the cache policy ``attnlab tune-cache`` chose, with its evidence (decoding
                           uses it by default); tune/ holds every candidate, the fronts and plots
    surgery.json, verify.json, bench/<name>.json (a record with other settings beside it as bench/<name>.<hash8>.json), previous/<time>/ (an earlier attempt), .lock

Prepared token files are shared by the runs of a manifest: ``data.cache_dir``, else
``<out_dir>/<manifest name>/.data``.

Everything that reads run-folder knowledge (``api``, ``run``, ``upcycling``, ``bench.suite``,
``report.collect``, ``cli``) goes through this module; it sits below the benchmarks and the
runner and imports neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from attnlab.config.base import validate_section
from attnlab.config.cache import CacheConfig
from attnlab.config.data import DataConfig, TokenizerConfig
from attnlab.config.model import ModelConfig
from attnlab.errors import AttnlabError, CheckpointError, DataError
from attnlab.fsutil import describe_os_error, folder_lock, remove_stale_temps_in
from attnlab.paths import check_run_dir, shorten
from attnlab.train.checkpoint import FORMAT, VERSION, read_checkpoint, save_checkpoint
from attnlab.train.distributed import DistInfo
from attnlab.train.loop import BEST, EVENTS, LAST

if TYPE_CHECKING:
    from attnlab.manifest import ResolvedRun
    from attnlab.model.decoder import DecoderLM

#: names of a run folder's files (``command.txt``/``env.json``/``resolved_config.json`` are the
#: ones ``attnlab.provenance`` writes; checkpoint and event names come from the trainer)
RESOLVED_CONFIG, ENV, COMMAND = "resolved_config.json", "env.json", "command.txt"
HELDOUT, BENCH, PREVIOUS = "heldout.json", "bench", "previous"
TUNED_POLICY, TUNE = "tuned_policy.json", "tune"
CHECKPOINT_REQUIRED = ("format", "version", "model_config", "model")

__all__ = ["BEST", "EVENTS", "LAST", "RESOLVED_CONFIG", "ENV", "COMMAND", "HELDOUT", "BENCH", "PREVIOUS",
           "RunFolder", "RunResult", "OneLineOSErrors", "read_json_object", "read_events", "resolve_checkpoint",
           "load_checkpoint_model", "data_cache_dir", "check_run_paths", "run_lock"]


# ---------------------------------------------------------------- files
def read_json_object(path: Path, what: str) -> dict:
    """``path`` parsed as a JSON object; a one-line ``CheckpointError`` naming the file when it is
    unreadable, not JSON or not an object."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as err:
        reason = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: unreadable {what} ({reason})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def read_events(path: Path) -> list[tuple[int, dict]]:
    """``(line number, event)`` for the events of a ``train.jsonl``, in file order. A torn last
    line (a write cut short) is dropped; any other line that is not a JSON object is a one-line
    ``AttnlabError``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AttnlabError(f"{path}: unreadable ({type(err).__name__})") from None
    lines, events = text.splitlines(), []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            if line_no == len(lines) and not text.endswith("\n"):
                break  # a torn last line: the events before it stand
            raise AttnlabError(f"{path}:{line_no}: not a JSON event") from None
        if not isinstance(event, dict):
            raise AttnlabError(f"{path}:{line_no}: not a JSON event object")
        events.append((line_no, event))
    return events


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's ``best.pt`` (else ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: run folder holds no best.pt or last.pt")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    return path


def load_checkpoint_model(ckpt: str | Path, *, map_location: str = "cpu") -> "DecoderLM":
    """The model (eval mode) of an attnlab ``.pt`` checkpoint: its ``model_config`` validated, then
    its weights loaded strictly."""
    from attnlab.model.decoder import build_model  # local: keep `import attnlab` light

    payload = read_checkpoint(ckpt, required=CHECKPOINT_REQUIRED, map_location=map_location)
    try:
        cfg = validate_section(ModelConfig, payload["model_config"], "model_config")
    except AttnlabError as err:
        raise CheckpointError(f"checkpoint {ckpt}: invalid model config: {err}") from None
    model = build_model(cfg)
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {ckpt}: weights do not fit the model config ({first})") from None
    return model.eval()


def data_cache_dir(data: DataConfig, run_dir: str | Path) -> Path:
    """Where prepared token files go: ``data.cache_dir``, else ``<out_dir>/<manifest name>/.data``
    (shared by the runs of a manifest)."""
    return Path(data.cache_dir) if data.cache_dir else Path(run_dir).parent.parent / ".data"


# ---------------------------------------------------------------- one run folder
class RunFolder:
    """A run folder: its files' paths and typed readers/writers. ``RunFolder.of(path)`` accepts a
    file inside the folder (a checkpoint) as well."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def of(cls, path: str | Path) -> "RunFolder":
        """The folder ``path`` is, or (for a file such as a checkpoint) the folder holding it."""
        path = Path(path)
        return cls(path if path.is_dir() else path.parent)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # paths
    @property
    def resolved_config_path(self) -> Path:
        return self.path / RESOLVED_CONFIG

    @property
    def env_path(self) -> Path:
        return self.path / ENV

    @property
    def events_path(self) -> Path:
        return self.path / EVENTS

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def heldout_path(self) -> Path:
        return self.path / HELDOUT

    @property
    def bench_dir(self) -> Path:
        return self.path / BENCH

    def has_checkpoint(self) -> bool:
        return self.best.is_file() or self.last.is_file()

    def checkpoint(self) -> Path:
        """``best.pt``, else ``last.pt`` (``CheckpointError`` when neither exists)."""
        return resolve_checkpoint(self.path)

    # the resolved config
    def resolved_config(self) -> dict | None:
        """``resolved_config.json`` as a dict (None when the folder has none)."""
        resolved = self.resolved_config_path
        return read_json_object(resolved, RESOLVED_CONFIG) if resolved.is_file() else None

    def section(self, key: str, cfg: dict | None = None) -> dict:
        """One top-level section of the resolved config (``{}`` when absent)."""
        cfg = self.resolved_config() if cfg is None else cfg
        value = (cfg or {}).get(key) or {}
        if not isinstance(value, dict):
            raise CheckpointError(f"{self.resolved_config_path}: {key} must be a mapping, got {type(value).__name__}")
        return value

    def model_config(self) -> ModelConfig | None:
        """The run's ``ModelConfig`` from its resolved config (None without one)."""
        cfg = self.resolved_config()
        if cfg is None:
            return None
        return validate_section(ModelConfig, self.section("model", cfg), "model")

    def tokenizer_config(self) -> TokenizerConfig | None:
        """The tokenizer the run trained with (None if unknown)."""
        cfg = self.resolved_config()
        if cfg is None:
            return None
        data = self.section("data", cfg)
        if "tokenizer" not in data:
            return None
        return validate_section(TokenizerConfig, data["tokenizer"], "data.tokenizer")

    def tokenizer(self):
        """The run's tokenizer, built (None if unknown)."""
        from attnlab.data import build_tokenizer

        cfg = self.tokenizer_config()
        return build_tokenizer(cfg) if cfg is not None else None

    def cache_policy(self) -> str | None:
        """The policy the run decodes with by default: the one ``attnlab tune-cache`` chose
        (``tuned_policy.json``), else the manifest's ``cache`` section as a ``--cache-policy``
        string (None if neither)."""
        tuned = self.tuned_policy()
        if tuned is not None:
            return tuned
        section = self.section("cache", self.resolved_config() or {})
        return validate_section(CacheConfig, section, "cache").policy_text() or None

    @property
    def tuned_policy_path(self) -> Path:
        return self.path / TUNED_POLICY

    def tuned_policy(self) -> str | None:
        """The policy ``attnlab tune-cache`` chose for this run (None when it chose none)."""
        path = self.tuned_policy_path
        if not path.is_file():
            return None
        data = read_json_object(path, TUNED_POLICY)
        policy = data.get("policy")
        if not isinstance(policy, str) or not policy:
            raise CheckpointError(f"{path}: 'policy' must be a non-empty policy string")
        return policy

    def write_tuned_policy(self, record: dict) -> Path:
        """Write ``tuned_policy.json`` (the chosen policy and its evidence) atomically."""
        import json

        from attnlab.fsutil import atomic_write_text

        return atomic_write_text(self.tuned_policy_path, json.dumps(record, indent=2) + "\n")

    # data
    def heldout_tokens(self, *, with_align: bool = False):
        """The held-out split the run was evaluated on (from ``resolved_config.json``; for data
        sampled from a teacher, from the token file recorded in ``heldout.json``). With
        ``with_align``: ``(tokens, align)`` where align > 1 means fixed-length documents (teacher
        samples, ``retrieval_mix``)."""
        from attnlab.data import load_splits

        cfg = self.resolved_config()
        if cfg is None:
            raise AttnlabError(f"{self.path}: no resolved_config.json, so the run's data is unknown")
        if self.heldout_path.is_file():  # recorded by runs whose data was prepared at run time
            return self._heldout_from_pointer(with_align)
        data = validate_section(DataConfig, self.section("data", cfg), "data")
        vocab = self.section("model", cfg).get("vocab_size")
        if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab <= 0:
            raise CheckpointError(f"{self.resolved_config_path}: model.vocab_size must be a positive integer "
                                  f"(got {vocab!r})")
        splits = load_splits(data, vocab, self.data_cache_dir(data))
        return (splits.val, splits.align) if with_align else splits.val

    def _heldout_from_pointer(self, with_align: bool):
        """The held-out tokens ``heldout.json`` points at: ``{"path", "val_start", "align"}``, checked."""
        from attnlab.data.tokens import open_tokens

        pointer = self.heldout_path
        info = read_json_object(pointer, HELDOUT)
        path, start, align = info.get("path"), info.get("val_start"), info.get("align", 1)
        if not isinstance(path, str) or not path:
            raise DataError(f"{pointer}: path must be a token file path (got {path!r})")
        for key, value, low in (("val_start", start, 0), ("align", align, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DataError(f"{pointer}: {key} must be an integer >= {low} (got {value!r})")
        if not path.endswith(".npy"):
            raise DataError(f"{pointer}: path must name a .npy token file (got {path!r})")
        tokens = open_tokens(Path(path))  # one-line DataError for missing/object/2-D/truncated arrays
        if start > len(tokens):
            raise DataError(f"{pointer}: val_start={start} is past the end of {path} ({len(tokens)} tokens)")
        tokens = tokens[start:]
        return (tokens, align) if with_align else tokens

    def write_heldout_pointer(self, tokens_path: Path, val_start: int, align: int) -> Path:
        """Record where the held-out tokens of data prepared at run time are (``heldout.json``)."""
        from attnlab.fsutil import atomic_write_text

        self.path.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(self.heldout_path, json.dumps(
            {"path": str(Path(tokens_path).resolve()), "val_start": val_start, "align": align}))

    def data_cache_dir(self, data: DataConfig) -> Path:
        return data_cache_dir(data, self.path)

    # events, checkpoints, archive
    def events(self) -> list[dict]:
        """``train.jsonl``'s events in file order (``[]`` when the folder has none); see ``read_events``."""
        return [event for _, event in read_events(self.events_path)] if self.events_path.is_file() else []

    def archive_previous(self) -> Path | None:
        """Move events/checkpoints of an earlier, not-resumed attempt to ``previous/<time>/``
        (returns that folder; None when there was nothing to move)."""
        stale = [p for p in (self.events_path, self.last, self.best) if p.exists()]
        if not stale:
            return None
        dest = self.path / PREVIOUS / _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        dest.mkdir(parents=True)
        for path in stale:
            os.replace(path, dest / path.name)
        return dest

    def save_model(self, model, extra: dict | None = None) -> None:
        """A model-only checkpoint (step 0, no optimizer state) as both ``best.pt`` and ``last.pt``."""
        payload = {"format": FORMAT, "version": VERSION, "step": 0, "model_config": model.config.model_dump(mode="json"),
                   "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **(extra or {})}
        for path in (self.best, self.last):
            save_checkpoint(path, payload)

    def read_checkpoint(self, path: Path | None = None, **kwargs) -> dict:
        """A checkpoint's payload (``best.pt``/``last.pt`` by default), its model fields required."""
        return read_checkpoint(path or self.checkpoint(), required=CHECKPOINT_REQUIRED, **kwargs)

    def load_model(self, *, map_location: str = "cpu") -> "DecoderLM":
        """The model of ``best.pt`` (else ``last.pt``), eval mode."""
        return load_checkpoint_model(self.checkpoint(), map_location=map_location)

    @contextlib.contextmanager
    def lock(self, what: str) -> Iterator[Path]:
        """The folder's exclusive lock (see ``fsutil.folder_lock``); temp files of killed writers
        are removed once it is held (live writers' are kept)."""
        with folder_lock(self.path, what):
            remove_stale_temps_in(self.path)
            yield self.path


# ---------------------------------------------------------------- a resolved run's folder
@dataclass
class RunResult:
    """What one run of a plan produced (its folder, size and held-out numbers)."""

    run_id: str
    group: str | None
    run_dir: Path
    params: int
    val_loss: float | None
    val_ppl: float | None
    train_tokens_per_s: float
    steps: int
    best_val_loss: float | None
    kv_bytes_per_token: float | None = None  # filled in by the caller

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["run_dir"] = str(self.run_dir)
        return out


def check_run_paths(run: "ResolvedRun") -> Path:
    """The run folder ``<out_dir>/<name>/<group>/<id>`` after checking that its user-named parts
    are safe file names and that it stays inside ``out_dir`` (``ConfigError`` otherwise)."""
    group, run_id = shorten(str(run.group)), shorten(str(run.run_id))
    return check_run_dir(run.run_dir, {"name": run.name, f"groups({group}).name": run.group,
                                       f"groups({group}).runs({run_id}).id": run.run_id})


def run_lock(run: "ResolvedRun", info: DistInfo = DistInfo()):
    """The run folder's exclusive lock (rank 0 holds it for every rank), after checking its path."""
    run_dir = check_run_paths(run)
    return RunFolder(run_dir).lock(f"run {run.key}") if info.is_main else contextlib.nullcontext(run_dir)


class OneLineOSErrors:
    """Turn an ``OSError`` escaping work in a run folder (a full disk during a checkpoint or log
    write) into one ``AttnlabError`` line naming the file and the cause."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if isinstance(err, OSError) and not isinstance(err, AttnlabError):
            where = err.filename if err.filename else self.what
            raise AttnlabError(f"{where}: {describe_os_error(err)}") from None
        return False
