"""Runs that start from an existing model: ``import`` (copy a teacher in), ``upcycle`` (attention
surgery standard -> DBA), ``retrofit`` (zero-training Butterfly attention, same weights), ``blockwise`` and ``finetune`` (distillation from the teacher, through
the regular trainer: checkpoints and exact resume), each optionally verified against the teacher."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from attnlab.api import load
from attnlab.config.data import DataConfig
from attnlab.convert.butterfly import retrofit_butterfly
from attnlab.convert.surgery import upcycle
from attnlab.data import TrainBatches, eval_batches, load_splits
from attnlab.errors import AttnlabError
from attnlab.fsutil import atomic_write_text
from attnlab.infer.generate import generate
from attnlab.infer.sampling import SamplingConfig
from attnlab.model import build_model
from attnlab.paths import safe_child
from attnlab.provenance import write_provenance
from attnlab.runfolder import BEST, OneLineOSErrors, RunFolder, RunResult, data_cache_dir, run_lock
from attnlab.train.distributed import DistInfo, resolve_device
from attnlab.train.evaluate import Evaluator, perplexity
from attnlab.train.events import EventLog
from attnlab.train.objectives import BlockwiseDistillation, GlobalDistillation
from attnlab.verify import verify_and_record

if TYPE_CHECKING:
    from attnlab.manifest import ResolvedRun

#: ``run.execute_run``'s signature: distillation trains through the regular trainer, which the
#: plan executor (``attnlab.run``, the layer above this one) passes in
TrainRun = Callable[..., RunResult]


def resolve_ref(ref: str, run: "ResolvedRun") -> Path:
    """``run:<id>`` -> that run's folder in the same group; anything else is a path."""
    if ref.startswith("run:"):
        return safe_child(Path(run.run_dir).parent, ref[4:], f"groups({run.group}).runs({run.run_id}): {ref}")
    return Path(ref)


def source_fingerprint(ref: str, run: "ResolvedRun") -> str:
    """Identifies the weights behind ``ref`` (file sizes and modification times), so a derived run
    notices when its source was retrained or replaced."""
    path = resolve_ref(ref, run)
    if path.is_dir():
        names = [BEST] if (path / BEST).is_file() else sorted(p.name for p in path.iterdir() if p.is_file())
        files = [path / n for n in names]
    else:
        files = [path]
    parts = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def load_ref(ref: str, run: "ResolvedRun", device: torch.device):
    path = resolve_ref(ref, run)
    if ref.startswith("run:") and not RunFolder(path).has_checkpoint():
        raise AttnlabError(f"{run.key}: {ref} has no checkpoint yet; run that run first")
    return load(path).to(device)


# ---------------------------------------------------------------- data
def teacher_samples_file(run: "ResolvedRun", teacher, cache_dir: Path) -> Path:
    """Sample ``data.teacher_samples`` sequences from the teacher once; cached by content key."""
    spec = run.data.teacher_samples
    length = spec.length or teacher.config.block_size
    source = resolve_ref(run.teacher, run)
    weights = source / BEST if source.is_dir() and (source / BEST).is_file() else source
    stat = weights.stat() if weights.is_file() else None
    key = json.dumps({"teacher": str(weights.resolve()), "size": stat.st_size if stat else None,
                      "mtime": stat.st_mtime_ns if stat else None, **spec.model_dump(), "length": length},
                     sort_keys=True)
    path = cache_dir / f"teacher-samples-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = generate(teacher, [[spec.bos_id]] * spec.sequences, length - 1,
                   SamplingConfig(temperature=spec.temperature), seed=spec.seed)
    tokens = np.concatenate([[spec.bos_id] + seq + [spec.bos_id] * (length - 1 - len(seq)) for seq in out.tokens])
    dtype = np.uint16 if teacher.config.vocab_size <= 65536 else np.uint32
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, tokens.astype(dtype))
    os.replace(tmp, path)
    return path


def run_splits(run: "ResolvedRun", teacher):
    """(splits, align): teacher samples are fixed-length documents, so windows start at document
    starts (``align``) and the held-out split starts at the first document boundary in it."""
    data = run.data
    cache_dir = data_cache_dir(data, run.run_dir)
    if data.source != "teacher":
        splits = load_splits(data, run.model.vocab_size, cache_dir)
        return splits, splits.align  # retrieval_mix: fixed-length documents too
    path = teacher_samples_file(run, teacher, cache_dir)
    align = data.teacher_samples.length or teacher.config.block_size
    data = DataConfig.model_validate({**data.model_dump(exclude={"teacher_samples", "source"}, exclude_unset=True),
                                      "source": "tokens", "path": str(path)})
    splits = load_splits(data, run.model.vocab_size, cache_dir)
    first = (-len(splits.train)) % align  # the val split's first document start
    RunFolder(run.run_dir).write_heldout_pointer(path, len(splits.train) + first, align)
    return dataclasses.replace(splits, val=splits.val[first:]), align


def eval_set(splits, model, run: "ResolvedRun", align: int = 1):
    seq_len = min(model.config.block_size, (run.train.seq_len if run.train and run.train.seq_len else model.config.block_size))
    if align > 1:
        seq_len = min(seq_len, align - 1)  # one document per window
    batch = run.train.batch_size if run.train else 8
    batches = run.train.eval_batches if run.train else 8
    return eval_batches(splits.val, batch, seq_len, batches, align=align)


# ---------------------------------------------------------------- runs
def _result(run: "ResolvedRun", model, val_loss: float | None, steps: int = 0, tokens_per_s: float = 0.0) -> RunResult:
    return RunResult(run_id=run.run_id, group=run.group, run_dir=Path(run.run_dir), params=model.num_parameters(),
                     val_loss=val_loss, val_ppl=None if val_loss is None else perplexity(val_loss),
                     train_tokens_per_s=tokens_per_s, steps=steps, best_val_loss=val_loss)


def _convert(run: "ResolvedRun", command: str, teacher, splits, device, resume: bool, align: int):
    """import / upcycle: build the model, save it, evaluate it; a finished run is reloaded."""
    folder = RunFolder(run.run_dir)
    run_dir, done = folder.path, folder.best
    fingerprint = source_fingerprint(run.teacher, run)
    if run.retrofit is not None:  # other retrofit options: another model from the same teacher
        options = json.dumps(run.retrofit.model_dump(mode="json"), sort_keys=True)
        fingerprint += ":" + hashlib.sha256(options.encode()).hexdigest()[:16]
    if resume and done.is_file() and folder.events_path.is_file():
        previous = folder.read_checkpoint(done)
        if previous.get("source_fingerprint") == fingerprint:
            finished = [e for e in folder.events() if e.get("event") == "done"]
            return load(done).to(device), (finished[-1]["val_loss"] if finished else None)
        print(f"{run.key}: its teacher changed since this run; redoing it", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    folder.archive_previous()
    write_provenance(run_dir, command, run.resolved)
    log = EventLog(folder.events_path)
    extra: dict = {"source": run.teacher, "source_fingerprint": fingerprint}
    if run.mode == "import":
        model = teacher
    elif run.mode == "retrofit":
        model = retrofit_butterfly(teacher, **run.retrofit.options())
        r = run.retrofit
        print(f"{run.key}: {r.kind} retrofit of {run.teacher} (window {r.window}, block {r.block_size}, "
              f"{r.partner}, layers {r.layers}), no training", flush=True)
    else:
        calibration = None
        if run.surgery.calibration_batches:
            length = teacher.config.block_size if align == 1 else min(teacher.config.block_size, align - 1)
            sampler = TrainBatches(splits.train, 4, length, seed=0, align=align)
            calibration = torch.cat([sampler.get(i, 0)[0] for i in range(run.surgery.calibration_batches)]).to(device)
        model, report = upcycle(teacher, run.surgery.plan(), calibration)
        atomic_write_text(run_dir / "surgery.json", json.dumps(report.to_dict(), indent=2, default=str))
        print(report.summary(), flush=True)
    log.write("meta", config=run.resolved, params=model.num_parameters(), mode=run.mode, source=run.teacher)
    result = Evaluator(eval_set(splits, model, run, align), device)(model)
    log.write("eval", step=0, val_loss=result.loss, val_ppl=result.ppl)
    folder.save_model(model, extra)
    log.write("done", step=0, best_val_loss=result.loss, val_loss=result.loss, train_tokens_per_s=None, wall_time_s=None)
    print(f"{run.key}: {run.mode} done | held-out loss {result.loss:.4f} | ppl {result.ppl:.2f}", flush=True)
    return model, result.loss


def _distill(run: "ResolvedRun", command: str, teacher, splits, device, resume: bool, stop_after, align: int,
            train: TrainRun):
    start = load_ref(run.init_from, run, torch.device("cpu"))
    state = {k: v.clone() for k, v in start.state_dict().items()}

    def factory():
        model = build_model(start.config)
        model.load_state_dict(state)
        return model

    # a resume must continue from the same starting weights and teacher: fold their fingerprints
    # into the data description that checkpoints are checked against
    sources = f"init {source_fingerprint(run.init_from, run)}, teacher {source_fingerprint(run.teacher, run)}"
    splits = dataclasses.replace(splits, description=f"{splits.description} | {sources}")
    if run.mode == "blockwise":
        objective, trainable = BlockwiseDistillation(teacher), (lambda name: ".attention." in name)
    else:
        d = run.distill
        objective = GlobalDistillation(teacher, ce_weight=d.ce_weight, kl_weight=d.kl_weight, temperature=d.temperature)
        trainable = None
    result = train(run, command, resume=resume, stop_after=stop_after, splits=splits,
                         model_config=start.config, model_factory=factory, objective=objective, trainable=trainable,
                         align=align)
    return load(Path(run.run_dir)).to(device), result


def execute_mode_run(run: "ResolvedRun", command: str = "", *, train: TrainRun, info: DistInfo = DistInfo(),
                     resume: bool = True, stop_after: int | None = None, **_) -> RunResult:
    """Run ``run`` (mode import / upcycle / blockwise / finetune) in its locked folder; the
    distillation modes train through ``train`` (``attnlab.run.execute_run``)."""
    if info.world_size > 1:
        raise AttnlabError(f"{run.key}: mode {run.mode!r} runs in one process; start it without torchrun")
    with run_lock(run, info), OneLineOSErrors(str(run.run_dir)):
        return _execute_mode_run(run, command, info=info, resume=resume, stop_after=stop_after, train=train)


def _execute_mode_run(run: "ResolvedRun", command: str, *, info: DistInfo, resume: bool,
                      stop_after: int | None, train: TrainRun) -> RunResult:
    device = resolve_device(run.train.device if run.train else "auto", info)
    teacher = load_ref(run.teacher, run, device).eval()
    splits, align = run_splits(run, teacher)
    if run.mode in ("import", "upcycle", "retrofit"):
        model, val_loss = _convert(run, command, teacher, splits, device, resume, align)
        result = _result(run, model, val_loss)
    else:
        model, result = _distill(run, command, teacher, splits, device, resume, stop_after, align, train)
    if run.verify is not None:
        cfg = run.verify
        seq_len = min(cfg.seq_len or model.config.block_size, model.config.block_size)
        if align > 1:
            seq_len = min(seq_len, align - 1)
        batches = torch.stack([x for x, _ in eval_batches(splits.val, cfg.batch_size, seq_len, cfg.batches, align)]).to(device)
        tokenizer = RunFolder(run.run_dir).tokenizer() if run.data.source != "teacher" else None
        outcome = verify_and_record(model.eval(), teacher, cfg, batches, Path(run.run_dir), tokenizer)
        print(f"{run.key}: verified (logits KL {outcome.logits['kl']:.4g}, attention max |diff| "
              f"{outcome.attention['max_abs']:.4g})", flush=True)
    return result
