"""Execute resolved runs: data -> model -> train, with provenance, resume and one result each.

Under torchrun the same functions run on every rank; rank 0 alone writes files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnlab.bench.suite import Target, check_bench_names, run_benchmarks
from attnlab.errors import ConfigError, DataError
from attnlab.paths import shorten
from attnlab.provenance import write_provenance
from attnlab.report import write_report
from attnlab.runfolder import (OneLineOSErrors, RunFolder, RunResult, check_run_paths, data_cache_dir,
                               run_lock)
from attnlab.train.checkpoint import check_compatible, load_resume_checkpoint
from attnlab.train.distributed import DistInfo, barrier, dist_env, distributed_session, resolve_device
from attnlab.train.evaluate import perplexity
from attnlab.train.loop import BEST, LAST, build_trainer, count_parameters
from attnlab.upcycling import execute_mode_run

if TYPE_CHECKING:
    from attnlab.manifest import Plan, ResolvedRun

__all__ = ["RunResult", "OneLineOSErrors", "check_run_paths", "check_plan_paths", "data_cache_dir", "run_lock",
           "load_run_data", "execute_run", "execute_plan", "group_report_dir", "benchmark_and_report"]


def _data_api():
    """(load_splits, TrainBatches, eval_batches) from attnlab.data (imported on first use)."""
    from attnlab.data import TrainBatches, eval_batches, load_splits
    return load_splits, TrainBatches, eval_batches


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


def _resume_checkpoint(run: "ResolvedRun", data_description: str, info: DistInfo, model_config=None) -> dict | None:
    """``last.pt`` (or, when it is damaged, ``best.pt``: logged) after the compatibility check;
    None for a fresh run."""
    def compatible(ckpt, path):
        check_compatible(ckpt, path, model_config=(model_config or run.model).model_dump(mode="json"),
                         train_config=run.train.model_dump(mode="json"), data_description=data_description,
                         world_size=info.world_size)

    return load_resume_checkpoint(run.run_dir, last=LAST, fallback=BEST, check=compatible,
                                  log=None if info.is_main else (lambda message: None))


def check_plan_paths(plan: "Plan") -> None:
    """Every file name a plan's runs and benchmarks will build, checked before anything is written."""
    for run in plan.runs:
        check_run_paths(run)
    for group, benches in plan.benchmarks.items():
        check_bench_names(benches, f"groups({shorten(str(group))}).benchmarks")


def execute_run(run: "ResolvedRun", command: str = "", *, resume: bool = True, stop_after: int | None = None,
                splits=None, model_config=None, model_factory=None, objective=None, trainable=None,
                align: int | None = None) -> RunResult:
    """Train ``run`` in ``run.run_dir``, resuming from its ``last.pt`` when ``resume`` (a finished
    run returns its results without training). ``splits``: preloaded ``TokenSplits`` to reuse.
    Distillation passes the student's real ``model_config``, a ``model_factory`` that loads its
    starting weights, the ``objective`` and which parameters are ``trainable``.
    ``align``: window starts are multiples of it (fixed-length documents); default the splits' own
    (``TokenSplits.align``: a ``retrieval_mix`` source's document length, else 1).

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
        align = getattr(splits, "align", 1) if align is None else align
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
                RunFolder(run_dir).archive_previous()
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


def execute_plan(plan: "Plan", command: str = "", *, rebench: bool = False, **kwargs: Any) -> list[RunResult]:
    """``execute_run`` for every run of ``plan`` in order, in one process group; data shared
    by several runs is loaded once. Then each group's declared benchmarks run where their record
    is missing or stale (settings changed, checkpoint newer; all of them with ``rebench``) and
    the group reports are written."""
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
            if run.mode != "train":  # import / upcycle / distillation: they train through execute_run
                results.append(execute_mode_run(run, command, info=info, train=execute_run, **kwargs))
            else:
                key = (run.data.model_dump_json(), run.model.vocab_size, str(_cache_dir(run)))
                if key not in loaded:
                    loaded[key] = load_run_data(run, info)
                results.append(execute_run(run, command, splits=loaded[key], **kwargs))
            if run.train is not None and results[-1].steps < run.train.steps:
                return results  # stopped early (stop_after): later runs may depend on this one
    if dist_env().rank == 0:
        for group in dict.fromkeys(run.group for run in plan.runs):
            benchmark_and_report(plan, group, command, rebench=rebench)
    return results


def group_report_dir(plan: "Plan", group: str) -> Path:
    """``<out_dir>/<name>/<group>/report``."""
    return Path(plan.group_runs(group)[0].run_dir).parent / "report"


def benchmark_and_report(plan: "Plan", group: str, command: str = "", *, run_benchmarks_first: bool = True,
                         rebench: bool = True) -> Path:
    """Run the group's declared benchmarks on each of its runs (records saved in
    ``<run_dir>/bench/`` as the primary record of their name), then write the group's report
    folder. Without ``rebench``, only benchmarks whose record is missing or stale run
    (``bench.suite.stale_reason``). Returns the folder."""
    check_plan_paths(plan)
    runs = plan.group_runs(group)
    siblings = {r.run_id: Path(r.run_dir) for r in runs}
    if run_benchmarks_first:
        for run in runs:
            target = Target(run.run_dir, key=run.key, siblings=siblings)
            run_benchmarks(plan.benchmarks.get(group, []), target, command,  # locks the run folder
                           progress=lambda m: print(m, flush=True), only_stale=not rebench, primary=True)
    folder = group_report_dir(plan, group)
    files = write_report([r.run_dir for r in runs], folder, title=f"{plan.name} / {group}", command=command)
    print(f"report: {files.markdown} ({len(files.plots)} plots, {len(files.tables)} LaTeX tables)", flush=True)
    return folder
