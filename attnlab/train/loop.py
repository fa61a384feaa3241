"""The training loop: ``Trainer.train`` fits on a screen and delegates to ``train_step``, the
``Evaluator`` and the checkpointer. Rank 0 alone writes ``train.jsonl``, checkpoints and output.

Files in ``run_dir``: ``train.jsonl`` (events ``meta``, ``train``, ``eval``, ``done``), ``last.pt``
(every ``checkpoint_every`` steps, at ``stop_after`` and at the end), ``best.pt`` (whenever the
held-out loss improves). ``train.jsonl`` is append-only: a resumed run adds a ``meta`` event
(``resumed_from``), and after a hard crash the steps between the last checkpoint and the crash
are logged again; the later event for a step is the one the final weights followed.

Non-finite guard: a NaN/inf training loss or gradient norm never updates the weights. With
``train.on_nonfinite: stop`` (default) the run writes a ``nan`` event and raises
``NonFiniteError`` (one line naming the step; the CLI exits 2); ``last.pt``/``best.pt`` are left
as they were. With ``skip`` the step is counted but makes no update and a ``nan_skipped`` event is
written; more than ``train.max_nonfinite_skips`` consecutive skips stop as above. A non-finite
held-out loss never becomes ``best.pt`` (and stops the run in ``stop`` mode); a checkpoint whose
tensors are not all finite is never written (``nan`` event with ``phase: checkpoint``, stop).
Other events: ``repair`` (a torn ``train.jsonl`` tail was cut on resume), ``warning`` (e.g. a
damaged ``last.pt`` replaced by ``best.pt`` as the resume point), ``interrupt``.

Ctrl-C: the first SIGINT (main thread) lets the current step finish, then ``last.pt`` is saved
at that step (atomically, as every save) and ``TrainingInterrupted`` (a ``KeyboardInterrupt``
with a one-line message; the CLI exits 130) is raised; a second Ctrl-C aborts at once. A
``KeyboardInterrupt`` raised between or at the start of steps (no handler installed, e.g. off
the main thread) saves the same way. Under DDP the ranks agree on the stopping step (the flag is
all-reduced after every step). Resuming continues from the saved step.
"""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from attnlab.config.train import TrainConfig
from attnlab.progress import Progress, eta_seconds
from attnlab.train.checkpoint import first_nonfinite, save_checkpoint
from attnlab.train.distributed import (DistInfo, ParallelModel, all_reduce_mean, apply_ddp,
                                       resolve_device)
from attnlab.train.evaluate import Evaluator
from attnlab.train.events import EventLog
from attnlab.train.tracking import build_tracker
from attnlab.train.optim import build_optimizer
from attnlab.train.schedule import lr_at
from attnlab.train.state import TrainState, make_payload, restore
from attnlab.train.objectives import LanguageModeling
from attnlab.train.step import Batch, NonFiniteError, StepStats, autocast_factory, train_step

LAST, BEST, EVENTS = "last.pt", "best.pt", "train.jsonl"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, after ``last.pt`` was saved at ``step`` (one-line message)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class _Abort(KeyboardInterrupt):
    """The second Ctrl-C: stop now, save nothing."""


class _InterruptFlag:
    """While active (main thread only): the first SIGINT sets ``requested`` and says so; a
    second one raises ``KeyboardInterrupt`` at once."""

    def __init__(self, say: Callable[[str], None]):
        self.requested, self._say, self._previous = False, say, None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise _Abort
        self.requested = True
        self._say("interrupt: saving a checkpoint after this step (Ctrl-C again to abort without saving)")

    def __enter__(self) -> "_InterruptFlag":
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handler)
            except (ValueError, OSError):  # not installable here: a plain KeyboardInterrupt still saves
                self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class BatchSource(Protocol):
    """``attnlab.data.TrainBatches``: ``get(step, micro) -> (x, y)``, a pure function of its
    arguments (and the source's seed and rank), so a resumed run sees the same batches."""

    def get(self, step: int, micro: int) -> tuple[Any, Any]: ...


THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count`` where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def thread_defaults(env: dict[str, str], available: int, load_1min: float | None) -> tuple[int | None, str | None]:
    """``(intra-op threads to set or None, notice or None)``: the available CPUs shared by the
    processes of this host (``LOCAL_WORLD_SIZE``), unless ``env`` names a thread count; a notice
    when the 1-minute load average exceeds the available CPUs."""
    threads = None
    if not any(env.get(k) for k in THREAD_ENV):
        try:
            local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
        except ValueError:
            local = 1
        threads = max(1, available // local)
    notice = None
    if load_1min is not None and load_1min > available:
        notice = (f"note: the 1-minute load average ({load_1min:.1f}) exceeds the {available} CPU(s) available; "
                  "other processes share them, so throughput drops (OMP_NUM_THREADS=N sets attnlab's threads)")
    return threads, notice


def _load_1min() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def configure_threads() -> int:
    """Apply ``thread_defaults`` to this process (the CLI calls it before computing); returns the
    intra-op thread count in effect."""
    threads, _ = thread_defaults(dict(os.environ), available_cpus(), None)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def load_notice() -> str | None:
    """The one-line notice of ``thread_defaults`` for this machine now (None when not loaded)."""
    return thread_defaults({}, available_cpus(), _load_1min())[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CPU and every CUDA device


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class Trainer:
    def __init__(self, model: ParallelModel, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                 batches: BatchSource, evaluator: Evaluator, *, run_dir: Path, device: torch.device,
                 info: DistInfo, data_description: str, state: TrainState | None = None,
                 resumed: bool = False, meta_config: dict | None = None, progress: Progress | None = None):
        self.model, self.optimizer, self.cfg, self.batches = model, optimizer, cfg, batches
        self.evaluate, self.run_dir, self.device, self.info = evaluator, Path(run_dir), device, info
        self.data_description, self.meta_config = data_description, meta_config
        self.state = state if state is not None else TrainState()
        self.resumed_from = self.state.step if resumed else None
        self.autocast = autocast_factory(cfg.precision, device)
        self.events = EventLog(self.run_dir / EVENTS if info.is_main else None)
        self.progress = progress
        self.objective = LanguageModeling(compile=cfg.compile)
        self.notes: list[str] = []   # said once at the start (e.g. a resume fallback)
        self.nonfinite_skips = 0     # consecutive skipped steps

    # ------------------------------------------------------------------ the loop
    def train(self, stop_after: int | None = None) -> TrainState:
        """Train from ``state.step`` to ``cfg.steps`` (or to ``stop_after``, saving ``last.pt``
        there as if interrupted). A finished run returns at once."""
        cfg, state = self.cfg, self.state
        target = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        if state.step >= target:
            return state
        try:
            with self._start(), _InterruptFlag(self.progress.note) as interrupt:
                try:
                    while state.step < target:
                        stats = self._timed_step()
                        if stats.finite and state.step % cfg.log_every == 0:  # a skipped step has its own event
                            self._log(stats)
                        evaluate = state.step % cfg.eval_every == 0 or state.step == cfg.steps
                        improved = self._eval() if evaluate else False
                        last = state.step % cfg.checkpoint_every == 0 or state.step == target
                        if last or improved:
                            self._checkpoint(last=last, best=improved)
                        if self._interrupt_requested(interrupt) and state.step < target:
                            raise KeyboardInterrupt
                except (TrainingInterrupted, _Abort):
                    raise
                except KeyboardInterrupt:
                    self._save_interrupted()
                if state.step == cfg.steps:
                    self._finish()
        finally:
            self._close_tracker()
        return state

    # ------------------------------------------------------------------ pieces
    def _interrupt_requested(self, interrupt: _InterruptFlag) -> bool:
        if self.info.world_size == 1:
            return interrupt.requested
        flag = torch.tensor(float(interrupt.requested), device=self.device)
        return all_reduce_mean(flag).item() > 0  # every rank stops at the same step

    def _save_interrupted(self) -> None:
        """Ctrl-C between steps: save ``last.pt`` at ``state.step`` (unless it already holds that
        step), record an ``interrupt`` event and raise ``TrainingInterrupted``."""
        step, path = self.state.step, self.run_dir / LAST
        if step > self._step0 and self._saved_step != step:
            self._checkpoint(last=True, best=False)
            saved = f"saved {path} at step {step}"
        elif path.is_file():
            saved = f"{path} kept (step {self._saved_step if self._saved_step is not None else step})"
        else:
            saved = "no checkpoint written yet"
        self.events.write("interrupt", step=step, message=saved)
        raise TrainingInterrupted(f"interrupted at step {step}/{self.cfg.steps}: {saved}; "
                                  "run the same command again to resume", step) from None

    def _close_tracker(self) -> None:
        tracker, self.events.sink = self.events.sink, None
        if tracker is not None:
            tracker.close()

    def _start(self) -> Progress:
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.events.sink = build_tracker(self.cfg.tracking, self.run_dir, self.resumed_from)
        if self.progress is None:
            self.progress = Progress(self.cfg.steps, self.state.step, enabled=self.info.is_main)
        self._t0 = time.perf_counter()
        self._wall0, self._step0 = self.state.wall_time_s, self.state.step
        self._saved_step = self.state.step if self.resumed_from is not None else None
        self._last_log = (self.state.tokens_seen, self.state.train_time_s, self.state.step)
        notice = load_notice() if self.info.is_main else None
        if notice:
            self.progress.note(notice)
        if self.events.sink is not None:
            self.progress.note(f"tracking: TensorBoard event files in {self.events.sink.log_dir} "
                               f"(tensorboard --logdir {self.events.sink.log_dir})")
        repaired = self.events.repair()
        if repaired and self.info.is_main:
            print(f"warning: {repaired}", file=sys.stderr, flush=True)
        self.events.write("meta", config=self.meta_config or {"train": self.cfg.model_dump(mode="json")},
                          params=count_parameters(self.model.raw), data=self.data_description,
                          world_size=self.info.world_size, device=str(self.device),
                          resumed_from=self.resumed_from, steps=self.cfg.steps)
        if repaired:
            self.events.write("repair", message=repaired)
        for note in self.notes:
            self.events.write("warning", message=note)
        return self.progress

    def micro_batches(self, step: int) -> list[Batch]:
        out = []
        for micro in range(self.cfg.grad_accum):
            x, y = self.batches.get(step, micro)
            out.append((torch.as_tensor(x, dtype=torch.long).to(self.device, non_blocking=True),
                        torch.as_tensor(y, dtype=torch.long).to(self.device, non_blocking=True)))
        return out

    def _timed_step(self) -> StepStats:
        state, t0 = self.state, time.perf_counter()
        batches = self.micro_batches(state.step)
        stats = train_step(self.model, self.optimizer, batches, lr=lr_at(state.step, self.cfg),
                           grad_clip=self.cfg.grad_clip, autocast=self.autocast, objective=self.objective)
        if not stats.finite:
            self._nonfinite_step(stats)  # raises in stop mode
        else:
            self.nonfinite_skips = 0
        if self.device.type == "cuda" and (state.step + 1) % self.cfg.log_every == 0:
            torch.cuda.synchronize(self.device)  # so the logged throughput is honest
        state.step += 1
        state.tokens_seen += sum(x.numel() for x, _ in batches) * self.info.world_size
        state.train_time_s += time.perf_counter() - t0
        state.wall_time_s = self._wall0 + time.perf_counter() - self._t0
        self.progress.update(state.step)
        return stats

    def _last_good(self) -> str:
        path = self.run_dir / LAST
        return f"{path} kept" if path.is_file() else "no checkpoint written yet"

    def _stop(self, step: int, phase: str, message: str, **fields: Any) -> None:
        self.events.write("nan", step=step, phase=phase, action="stop", **fields)
        raise NonFiniteError(f"{message}; stopped ({self._last_good()})")  # the CLI prints it

    def _nonfinite_step(self, stats: StepStats) -> None:
        """A NaN/inf loss or grad norm at the step being taken (``state.step + 1``): no update
        was made. Stop, or (skip mode) log it and carry on."""
        cfg, step = self.cfg, self.state.step + 1
        loss, grad_norm = all_reduce_mean(stats.loss).item(), stats.grad_norm.item()
        which = " and ".join(n for n, v in (("training loss", loss), ("grad norm", grad_norm)) if not math.isfinite(v))
        what = f"non-finite {which or 'loss on another rank'} at step {step} (loss={loss:.4g}, grad_norm={grad_norm:.4g})"
        if cfg.on_nonfinite == "skip":
            self.nonfinite_skips += 1
            if self.nonfinite_skips > cfg.max_nonfinite_skips:
                self._stop(step, "train", f"{what}: more than train.max_nonfinite_skips="
                           f"{cfg.max_nonfinite_skips} consecutive non-finite steps",
                           loss=loss, grad_norm=grad_norm, consecutive=self.nonfinite_skips)
            self.events.write("nan_skipped", step=step, phase="train", loss=loss, grad_norm=grad_norm,
                              consecutive=self.nonfinite_skips)
            self.progress.note(f"warning: {what}; step skipped (no update)")
            return
        self._stop(step, "train", f"{what}; lower train.lr or set train.on_nonfinite: skip",
                   loss=loss, grad_norm=grad_norm)

    def _log(self, stats: StepStats) -> None:
        state = self.state
        loss = all_reduce_mean(stats.loss).item()
        tokens, seconds = state.tokens_seen - self._last_log[0], state.train_time_s - self._last_log[1]
        steps = state.step - self._last_log[2]
        self._last_log = (state.tokens_seen, state.train_time_s, state.step)
        tokens_per_s = tokens / seconds if seconds > 0 else 0.0
        eta = eta_seconds(self.cfg.steps - state.step, steps, seconds)  # the tok/s window's pace
        self.events.write("train", step=state.step, loss=loss, lr=lr_at(state.step - 1, self.cfg),
                          grad_norm=stats.grad_norm.item(), tokens_per_s=tokens_per_s,
                          elapsed_s=state.wall_time_s, eta_s=eta)
        self.progress.log_train(state.step, loss, tokens_per_s, eta)

    def _eval(self) -> bool:
        """Evaluate; record it; True when the held-out loss improved on the best so far."""
        state, result = self.state, self.evaluate(self.model.raw)
        finite = math.isfinite(result.loss)
        state.last_val_loss, state.last_val_step = (result.loss if finite else None), state.step
        improved = finite and (state.best_val_loss is None or result.loss < state.best_val_loss)
        if improved:
            state.best_val_loss = result.loss
        self.events.write("eval", step=state.step, val_loss=result.loss, val_ppl=result.ppl)
        if not finite:
            what = f"non-finite held-out loss at step {state.step} (val_loss={result.loss})"
            if self.cfg.on_nonfinite == "stop":
                self._stop(state.step, "eval", what, val_loss=result.loss)
            self.events.write("nan_skipped", step=state.step, phase="eval", val_loss=result.loss)
            self.progress.note(f"warning: {what}; not a best checkpoint")
            return False
        self.progress.note(f"eval step {state.step} | val_loss {result.loss:.4f} | ppl {result.ppl:.2f}")
        return improved

    def _checkpoint(self, *, last: bool, best: bool) -> None:
        self.state.wall_time_s = self._wall0 + time.perf_counter() - self._t0
        payload = make_payload(self.state, self.model.raw, self.optimizer,
                               train_config=self.cfg.model_dump(mode="json"),
                               data_description=self.data_description, device=self.device, info=self.info)
        bad = first_nonfinite(payload)  # every rank: the weights agree, so does the decision
        if bad is not None:
            self._stop(self.state.step, "checkpoint",
                       f"non-finite values in {bad} at step {self.state.step}; checkpoint not written",
                       tensor=bad)
        if self.info.is_main:
            for name, wanted in ((LAST, last), (BEST, best)):
                if wanted:
                    save_checkpoint(self.run_dir / name, payload, check_finite=False)
        if last:
            self._saved_step = self.state.step

    def _finish(self) -> None:
        state = self.state
        tokens_per_s = state.tokens_seen / state.train_time_s if state.train_time_s > 0 else 0.0
        self.events.write("done", step=state.step, best_val_loss=state.best_val_loss,
                          val_loss=state.last_val_loss, train_tokens_per_s=tokens_per_s,
                          wall_time_s=state.wall_time_s)
        self.progress.note(f"done: {state.step} steps | best val_loss {state.best_val_loss or float('nan'):.4f}"
                           f" | {tokens_per_s:,.0f} tok/s")


def build_trainer(model_factory: Callable[[], nn.Module], cfg: TrainConfig, *, batches: BatchSource,
                  eval_set: Sequence[Batch], run_dir: Path, data_description: str,
                  info: DistInfo = DistInfo(), device: torch.device | None = None,
                  checkpoint: dict | None = None, meta_config: dict | None = None,
                  progress: Progress | None = None, objective: Callable | None = None,
                  trainable: Callable[[str], bool] | None = None) -> Trainer:
    """Seed, build the model (identical init on every rank: seeded with ``cfg.seed``), apply
    DDP/compile, build the optimizer, and restore ``checkpoint`` (a ``read_checkpoint`` payload
    already checked with ``check_compatible``) when given. ``objective``: the loss (default
    next-token cross-entropy); ``trainable(name)``: which parameters train (default all)."""
    device = device if device is not None else resolve_device(cfg.device, info)
    seed_everything(cfg.seed)
    model = model_factory()
    if trainable is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(trainable(name))
    seed_everything(cfg.seed + info.rank)  # per-rank randomness (dropout) from here on
    wrapped = apply_ddp(model, cfg, info, device)
    optimizer = build_optimizer(model, cfg)
    state = None
    if checkpoint is not None:
        state = restore(checkpoint, model, optimizer, device=device, info=info)
    evaluator = Evaluator(eval_set, device, info, autocast_factory(cfg.precision, device))
    trainer = Trainer(wrapped, optimizer, cfg, batches, evaluator, run_dir=run_dir, device=device, info=info,
                      data_description=data_description, state=state, resumed=checkpoint is not None,
                      meta_config=meta_config, progress=progress)
    if objective is not None:
        trainer.objective = objective
    trainer.notes = list(getattr(checkpoint, "notes", []) or [])
    return trainer
