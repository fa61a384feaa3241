"""Execute resolved runs: data -> model -> train, with provenance, resume and one result each.

Under torchrun the same functions run on every rank; rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnlab.errors import AttnlabError, ConfigError, DataError
from attnlab.fsutil import describe_os_error, folder_lock, remove_stale_temps_in
from attnlab.paths import check_run_dir, shorten
from attnlab.provenance import write_provenance
from attnlab.train.checkpoint import check_compatible, load_resume_checkpoint
from attnlab.train.distributed import DistInfo, barrier, dist_env, distributed_session, resolve_device
from attnlab.train.evaluate import perplexity
from attnlab.train.loop import BEST, EVENTS, LAST, build_trainer, count_parameters

if TYPE_CHECKING:
    from attnlab.config.data import DataConfig
    from attnlab.manifest import Plan, ResolvedRun


@dataclass
class RunResult:
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


def _data_api():
    """(load_splits, TrainBatches, eval_batches) from attnlab.data (imported on first use)."""
    from attnlab.data import TrainBatches, eval_batches, load_splits
    return load_splits, TrainBatches, eval_batches


def data_cache_dir(data: "DataConfig", run_dir: Path) -> Path:
    """Where prepared token files go: ``data.cache_dir``, else ``<out_dir>/<manifest name>/.data``
    (shared by the runs of a manifest)."""
    return Path(data.cache_dir) if data.cache_dir else Path(run_dir).parent.parent / ".data"


def _cache_dir(run: "ResolvedRun") -> Path:
    return data_cache_dir(run.data, run.run_dir)


def load_run_data(run: "ResolvedRun", info: DistInfo = DistInfo()):
    """``load_splits`` for ``run``; rank 0 first (it may tokenize into the cache), then the rest."""
    load_splits = _data_api()[0]
    splits = load_splits(run.data, run.model.vocab_size, cache_dir=_cache_dir(run)) if info.is_main else None
    barrier()
    if not info.is_main:
        splits = load_splits(run.data, run.model.vocab_size, cache_dir=_cache_dir(run))
    return splits


def _sequence_length(run: "ResolvedRun", splits) -> int:
    seq_len = run.train.seq_len or run.model.block_size
    if seq_len > run.model.block_size:
        raise ConfigError("train.seq_len", f"exceeds model.block_size={run.model.block_size}", seq_len)
    for name in ("train", "val"):
        n = len(getattr(splits, name))
        if n < seq_len + 1:
            raise DataError(f"data {splits.description!r}: the {name} split has {n} tokens; one sequence "
                            f"of seq_len={seq_len} needs {seq_len + 1}")
    return seq_len


def _archive_previous(run_dir: Path) -> None:
    """Move events/checkpoints of an earlier, not-resumed attempt to ``previous/<time>/``."""
    stale = [run_dir / n for n in (EVENTS, LAST, BEST) if (run_dir / n).exists()]
    if stale:
        dest = run_dir / "previous" / _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        dest.mkdir(parents=True)
        for path in stale:
            os.replace(path, dest / path.name)


def _resume_checkpoint(run: "ResolvedRun", data_description: str, info: DistInfo, model_config=None) -> dict | None:
    """``last.pt`` (or, when it is damaged, ``best.pt``: logged) after the compatibility check;
    None for a fresh run."""
    def compatible(ckpt, path):
        check_compatible(ckpt, path, model_config=(model_config or run.model).model_dump(mode="json"),
                         train_config=run.train.model_dump(mode="json"), data_description=data_description,
                         world_size=info.world_size)

    return load_resume_checkpoint(run.run_dir, last=LAST, fallback=BEST, check=compatible,
                                  log=None if info.is_main else (lambda message: None))


def check_run_paths(run: "ResolvedRun") -> Path:
    """The run folder ``<out_dir>/<name>/<group>/<id>`` after checking that its user-named parts
    are safe file names and that it stays inside ``out_dir`` (``ConfigError`` otherwise)."""
    group, run_id = shorten(str(run.group)), shorten(str(run.run_id))
    return check_run_dir(run.run_dir, {"name": run.name, f"groups({group}).name": run.group,
                                       f"groups({group}).runs({run_id}).id": run.run_id})


def check_plan_paths(plan: "Plan") -> None:
    """Every file name a plan's runs and benchmarks will build, checked before anything is written."""
    for run in plan.runs:
        check_run_paths(run)
    from attnlab.bench.suite import check_bench_names

    for group, benches in plan.benchmarks.items():
        check_bench_names(benches, f"groups({shorten(str(group))}).benchmarks")


def run_lock(run: "ResolvedRun", info: DistInfo = DistInfo()):
    """The run folder's exclusive lock (rank 0 holds it for every rank), after checking its path."""
    run_dir = check_run_paths(run)
    return _locked_and_clean(run_dir, run.key) if info.is_main else contextlib.nullcontext(run_dir)


@contextlib.contextmanager
def _locked_and_clean(run_dir: Path, key: str):
    with folder_lock(run_dir, f"run {key}"):
        remove_stale_temps_in(run_dir)  # temp files of killed writers (live writers' are kept)
        yield run_dir


class OneLineOSErrors:
    """Turn an ``OSError`` escaping training (a full disk during a checkpoint or log write) into
    one ``AttnlabError`` line naming the file and the cause."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if isinstance(err, OSError) and not isinstance(err, AttnlabError):
            where = err.filename if err.filename else self.what
            raise AttnlabError(f"{where}: {describe_os_error(err)}") from None
        return False


def execute_run(run: "ResolvedRun", command: str = "", *, resume: bool = True, stop_after: int | None = None,
                splits=None, model_config=None, model_factory=None, objective=None, trainable=None,
                align: int = 1) -> RunResult:
    """Train ``run`` in ``run.run_dir``, resuming from its ``last.pt`` when ``resume`` (a finished
    run returns its results without training). ``splits``: preloaded ``TokenSplits`` to reuse.
    Distillation passes the student's real ``model_config``, a ``model_factory`` that loads its
    starting weights, the ``objective`` and which parameters are ``trainable``.

    The run folder is locked for the whole run (a second process gets a one-line error naming
    this one's pid). Its records (``command.txt``, ``resolved_config.json``, ``env.json``) are
    written only once the resume point has been checked and restored, so a refused resume leaves
    them as they were."""
    from attnlab.model import build_model

    model_config = model_config or run.model
    model_factory = model_factory or (lambda: build_model(model_config))

    cfg, run_dir = run.train, Path(run.run_dir)
    check_run_paths(run)
    device = resolve_device(cfg.device, dist_env())
    with distributed_session(device) as info, run_lock(run, info), OneLineOSErrors(str(run_dir)):
        splits = splits if splits is not None else load_run_data(run, info)
        seq_len = _sequence_length(run, splits)
        ckpt = _resume_checkpoint(run, splits.description, info, model_config) if resume else None
        _, TrainBatches, eval_batches = _data_api()
        batches = TrainBatches(splits.train, cfg.batch_size, seq_len, cfg.seed,
                               rank=info.rank, world_size=info.world_size, align=align)
        eval_set = eval_batches(splits.val, cfg.batch_size, seq_len, cfg.eval_batches, align=align)
        trainer = build_trainer(model_factory, cfg, batches=batches, eval_set=eval_set,
                                run_dir=run_dir, data_description=splits.description, info=info,
                                device=device, checkpoint=ckpt, meta_config=run.resolved,
                                objective=objective, trainable=trainable)
        if info.is_main:  # the resume point is valid and restored: now the records may change
            if ckpt is None:
                _archive_previous(run_dir)
            write_provenance(run_dir, command, run.resolved, world_size=info.world_size)
        barrier()
        del ckpt
        state = trainer.train(stop_after=stop_after)
        barrier()
    tokens_per_s = state.tokens_seen / state.train_time_s if state.train_time_s > 0 else 0.0
    return RunResult(
        run_id=run.run_id, group=run.group, run_dir=run_dir, params=count_parameters(trainer.model.raw),
        val_loss=state.last_val_loss,
        val_ppl=None if state.last_val_loss is None else perplexity(state.last_val_loss),
        train_tokens_per_s=tokens_per_s, steps=state.step, best_val_loss=state.best_val_loss)


def execute_plan(plan: "Plan", command: str = "", **kwargs: Any) -> list[RunResult]:
    """``execute_run`` for every run of ``plan`` in order, in one process group; data shared
    by several runs is loaded once."""
    if not plan.runs:
        return []
    check_plan_paths(plan)  # before anything is written
    results: list[RunResult] = []
    first_train = next((r.train for r in plan.runs if r.train is not None), None)
    device = resolve_device(first_train.device if first_train else "auto", dist_env())
    loaded: dict[tuple, Any] = {}
    with distributed_session(device) as info:
        for i, run in enumerate(plan.runs):
            if info.is_main:
                print(f"[{i + 1}/{len(plan.runs)}] run {run.run_id} -> {run.run_dir}", flush=True)
            if run.mode != "train":
                from attnlab.upcycling import execute_mode_run

                results.append(execute_mode_run(run, command, info=info, **kwargs))
            else:
                key = (run.data.model_dump_json(), run.model.vocab_size, str(_cache_dir(run)))
                if key not in loaded:
                    loaded[key] = load_run_data(run, info)
                results.append(execute_run(run, command, splits=loaded[key], **kwargs))
            if run.train is not None and results[-1].steps < run.train.steps:
                return results  # stopped early (stop_after): later runs may depend on this one
    if dist_env().rank == 0:
        for group in dict.fromkeys(run.group for run in plan.runs):
            benchmark_and_report(plan, group, command)
    return results


def group_report_dir(plan: "Plan", group: str) -> Path:
    """``<out_dir>/<name>/<group>/report``."""
    return Path(plan.group_runs(group)[0].run_dir).parent / "report"


def benchmark_and_report(plan: "Plan", group: str, command: str = "", *, run_benchmarks_first: bool = True) -> Path:
    """Run the group's declared benchmarks on each of its runs (records saved in
    ``<run_dir>/bench/``), then write the group's report folder. Returns the folder."""
    from attnlab.bench.suite import Target, run_benchmarks
    from attnlab.report import write_report

    check_plan_paths(plan)
    runs = plan.group_runs(group)
    siblings = {r.run_id: Path(r.run_dir) for r in runs}
    if run_benchmarks_first:
        for run in runs:
            target = Target(run.run_dir, key=run.key, siblings=siblings)
            run_benchmarks(plan.benchmarks.get(group, []), target, command,  # locks the run folder
                           progress=lambda m: print(m, flush=True))
    folder = group_report_dir(plan, group)
    files = write_report([r.run_dir for r in runs], folder, title=f"{plan.name} / {group}", command=command)
    print(f"report: {files.markdown} ({len(files.plots)} plots, {len(files.tables)} LaTeX tables)", flush=True)
    return folder
