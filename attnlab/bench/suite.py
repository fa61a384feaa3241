"""Run declared benchmarks against a run folder or checkpoint and save one record each."""

from __future__ import annotations

import glob
import importlib
import json
from pathlib import Path

import torch

from attnlab._version import __version__
from attnlab.api import load
from attnlab.bench.context import (BenchContext, BenchRecord, bench_provenance, bench_settings, context_settings,
                                   describe_device)
from attnlab.errors import AttnlabError, ConfigError
from attnlab.fsutil import folder_lock
from attnlab.paths import MAX_NAME_LENGTH, check_name
from attnlab.runfolder import RunFolder, resolve_checkpoint

#: benchmark type -> "module:function" (imported on use: import cost; no module here imports this one)
RUNNERS = {
    "perplexity": "attnlab.bench.perplexity:run_perplexity",
    "latency": "attnlab.bench.latency:run_latency",
    "memory": "attnlab.bench.memory:run_memory",
    "context_sweep": "attnlab.bench.sweep:run_context_sweep",
    "downstream": "attnlab.bench.downstream:run_downstream",
    "quality": "attnlab.bench.quality:run_quality",
    "retrieval": "attnlab.bench.retrieval:run_retrieval_bench",
    "wikitext": "attnlab.bench.wikitext:run_wikitext",
    "lm_eval": "attnlab.bench.lm_eval_adapter:run_lm_eval",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _runner(kind: str):
    module, func = RUNNERS[kind].split(":")
    return getattr(importlib.import_module(module), func)


def resolve_device_dtype(cfg) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise AttnlabError(f"benchmark {cfg.name}: device cuda requested but CUDA is not available")
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    if cfg.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, DTYPES[cfg.dtype]


class Target:
    """A run folder or checkpoint to benchmark: loads the model once per (device, dtype) and
    knows the run's held-out tokens, tokenizer and cache policy (through its ``RunFolder``)."""

    def __init__(self, path: str | Path, key: str | None = None, siblings: dict[str, Path] | None = None):
        self.path = Path(path)
        self.checkpoint = resolve_checkpoint(self.path)
        self.folder = RunFolder.of(self.path)
        self.run_dir = self.folder.path
        self.key = key or f"{self.run_dir.parent.name}/{self.run_dir.name}"
        self.siblings = siblings or {}
        self.config = self.folder.resolved_config()  # None for a bare checkpoint
        self._models: dict = {}
        self._heldout = None
        self.align = 1

    def model(self, device: torch.device, dtype: torch.dtype):
        key = (str(device), dtype)
        if key not in self._models:
            self._models[key] = load(self.checkpoint).to(device=device, dtype=dtype).eval()
        return self._models[key]

    def heldout(self):
        if self._heldout is None and self.config is not None:
            self._heldout, self.align = self.folder.heldout_tokens(with_align=True)
        return self._heldout

    def tokenizer(self):
        return self.folder.tokenizer()

    def cache_policy(self) -> str | None:
        return self.folder.cache_policy()

    def reference_loader(self, device, dtype):
        def load_reference(run_id: str):
            if run_id not in self.siblings:
                raise AttnlabError(f"quality reference run:{run_id} is not a run of this group "
                                   f"(runs: {', '.join(sorted(self.siblings))})")
            return Target(self.siblings[run_id]).model(device, dtype)
        return load_reference


def run_benchmark(cfg, target: Target, command: str = "") -> BenchRecord:
    device, dtype = resolve_device_dtype(cfg)
    heldout = target.heldout()
    ctx = BenchContext(model=target.model(device, dtype), device=device, dtype=dtype, run_key=target.key,
                       command=command, heldout=heldout, tokenizer=target.tokenizer(),
                       cache_policy=target.cache_policy(), load_reference=target.reference_loader(device, dtype),
                       align=target.align)
    config = cfg.model_dump(mode="json")
    rows = _runner(cfg.type)(cfg, ctx)
    return BenchRecord(cfg.name, cfg.type, target.key, rows, bench_provenance(ctx, config),
                       settings=context_settings(ctx, config))


def planned_settings(cfg, target: Target) -> dict:
    """The settings a record of ``cfg`` on ``target`` would have (``bench_settings``), known
    before anything is loaded or measured."""
    device, dtype = resolve_device_dtype(cfg)
    return bench_settings(cfg.model_dump(mode="json"), str(device), describe_device(device), str(dtype),
                          torch.get_num_threads(), target.cache_policy())


def saved_records(bench_dir: Path, name: str) -> list[tuple[Path, BenchRecord]]:
    """The readable records of benchmark ``name`` in ``bench_dir`` (``<name>.json`` first, then
    the ones stored beside it with other settings, ``<name>.<hash8>.json``)."""
    out = []
    stem = glob.escape(name[:MAX_NAME_LENGTH - 9])  # see BenchRecord.hashed_path
    paths = [bench_dir / f"{name}.json", *sorted(p for p in bench_dir.glob(f"{stem}*.json") if p.name != f"{name}.json")]
    for path in paths:
        if not path.is_file():
            continue
        try:
            record = BenchRecord(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, AttributeError):
            continue  # unreadable: not a record to trust
        if record.benchmark == name:
            out.append((path, record))
    return out


def stale_reason(cfg, target: Target) -> str | None:
    """Why ``cfg`` needs measuring on ``target``: no record, settings changed, the checkpoint is
    newer than the record, or the record is from another attnlab version; None when a fresh
    record exists."""
    records = saved_records(target.run_dir / "bench", cfg.name)
    if not records:
        return "no record"
    settings = planned_settings(cfg, target)
    same = [(path, rec) for path, rec in records if rec.same_settings(settings)]
    if not same:
        return "settings changed"
    checkpoint_mtime = target.checkpoint.stat().st_mtime
    fresh = [(p, r) for p, r in same if p.stat().st_mtime >= checkpoint_mtime]
    if not fresh:
        return "checkpoint newer than the record"
    if not any(r.meta.get("versions", {}).get("attnlab") == __version__ for _, r in fresh):
        return "measured by another attnlab version"
    return None


def check_bench_names(benches: list, prefix: str = "benchmarks") -> None:
    """Each benchmark's name (its ``id``, else its type) names its record file: a safe file name,
    distinct within the list. Checked before anything runs or is written."""
    seen: dict[str, int] = {}
    for i, cfg in enumerate(benches):
        key = f"{prefix}[{i}].id"
        check_name(cfg.name, key)
        if cfg.name in seen:
            raise ConfigError(key, f"{prefix}[{seen[cfg.name]}] has the same name (their records would "
                                   "overwrite each other); give them distinct ids", cfg.name)
        seen[cfg.name] = i


def run_benchmarks(benches: list, target: Target, command: str = "", *, save: bool = True,
                   progress=print, only_stale: bool = False, primary: bool = False) -> list[BenchRecord]:
    """Run ``benches`` on ``target``; with ``save``, each record goes to ``<run_dir>/bench/`` (see
    ``BenchRecord.save``: beside, never over, a record with other settings; ``primary`` for the
    manifest-declared benchmarks) while holding the run folder's lock (a run training there
    meanwhile is a one-line error). With ``only_stale``, a benchmark whose fresh record exists
    (``stale_reason``) is skipped. Returns the records measured."""
    check_bench_names(benches)
    if not save:
        return _run_all(benches, target, command, save, progress, only_stale, primary)
    with folder_lock(target.run_dir, f"run {target.key}"):
        return _run_all(benches, target, command, save, progress, only_stale, primary)


def _run_all(benches: list, target: Target, command: str, save: bool, progress, only_stale: bool,
             primary: bool) -> list[BenchRecord]:
    records = []
    for cfg in benches:
        if only_stale:
            reason = stale_reason(cfg, target)
            if reason is None:
                progress(f"bench {target.key}: {cfg.name}: up to date (--rebench measures again)")
                continue
            progress(f"bench {target.key}: {cfg.name} ({reason}) ...")
        else:
            progress(f"bench {target.key}: {cfg.name} ...")
        record = run_benchmark(cfg, target, command)
        if save:
            record.save(target.run_dir / "bench", primary=primary)
        records.append(record)
    return records
