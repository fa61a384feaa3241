"""Synthetic long-context retrieval: passkey and multi-key needle-in-a-haystack.

**Tasks** (``make_task``, defined in :mod:`attnlab.data.retrieval_tasks` so that training data can
build them too, and re-exported here) are a pure function of ``(tokenizer, kind, length, depth, seed,
num_keys, num_digits, filler, header)``. A prompt is built from separately encoded pieces (the
filler is cut at token, not word, boundaries), so its length in tokens is exactly ``length`` for
any tokenizer (byte, GPT-2 BPE, anything with ``encode``)::

    [header] | filler[:a] | needle | filler[a:H] | question        answer = encode(" <digits>")

``H`` (the haystack budget) is what the header, needles and question leave of ``length``; the
queried needle goes after ``a = round(depth * H)`` filler tokens (``depth`` is the needle's
position as a fraction of the haystack; ``task.depth_actual = a / H``). Kinds:

- ``passkey``: one needle ``" The pass key is 48213. Remember it."``, question
  ``" What is the pass key? The pass key is"``.
- ``multikey``: ``num_keys`` needles ``" The value of key <name> is <digits>."`` with distinct
  names and values; the question asks for one of them (``" What is the value of key <name>? The
  value of key <name> is"``); the others (distractors) sit at seeded random haystack positions.

The filler is the cycled neutral sentences of ``FILLER_SENTENCES`` or a given token stream (e.g.
held-out text) read from a seeded offset, wrapping around. The needle contents and the
filler offset depend on ``(seed, kind, num_keys, num_digits)`` and the filler's length only, not on
the length or depth, so a
depth/length sweep of one trial index moves the same needle through the haystack (paired
comparisons); the distractor positions also depend on the length.

**Scoring** of one task: greedy decoding of ``len(answer)`` tokens through
``attnlab.infer.generate`` (the decode runtime) under the cache policy; ``exact_match`` is true
when the first ``len(answer)`` generated tokens are the answer (a shorter or partly different
output is wrong; anything after the answer is ignored: a batch decodes as many tokens as its
longest answer). ``answer_loglik`` is the mean per-token
log-probability of the answer teacher-forced after the prompt through a decode runtime under the
same policy (prefill the prompt, then append ``answer[:-1]``): graded where exact match is 0/1.

**Runner**: ``run_retrieval`` sweeps kinds x lengths x depths with ``trials`` tasks each (trial
``t`` uses seed ``seed + t``) and returns one row per cell with the accuracy, its fixed-seed
bootstrap 95% interval over trials, and the mean answer log-likelihood; ``format_retrieval_table``
renders rows as Markdown, ``plot_retrieval`` writes accuracy vs depth per length as a PNG.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from attnlab.bench.context import bench_tokenizer
from attnlab.cache import CachePolicy
from attnlab.data.retrieval_tasks import (  # re-exported: the task generator lives below the data layer
    DEFAULT_NUM_KEYS,
    FILLER_SENTENCES,
    HEADERS,
    KEY_NAMES,
    KIND_INDEX,
    KINDS,
    RetrievalTask,
    _check_depth,
    _check_int,
    _check_kind,
    _digits,
    _filler_stream,
    _num_keys,
    make_task,
)
from attnlab.errors import ConfigError
from attnlab.infer.generate import generate
from attnlab.infer.runtime import DecodeRuntime

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0

#: decode(model, prompts, max_new_tokens, policy) -> generated ids per prompt
DecodeFn = Callable[[object, list[list[int]], int, CachePolicy], list[list[int]]]


# ---------------------------------------------------------------- pure scoring
def exact_match(generated: Sequence[int], answer: Sequence[int]) -> bool:
    """The first ``len(answer)`` generated tokens are exactly ``answer`` (later tokens ignored;
    a shorter generation or any differing token is wrong). An empty answer never matches."""
    n = len(answer)
    return n > 0 and len(generated) >= n and [int(t) for t in generated[:n]] == [int(t) for t in answer]


def answer_loglik(logits: torch.Tensor, answer: Sequence[int]) -> float:
    """Mean log-probability (nats per token) of ``answer`` given ``logits`` (n, V), row i being the
    prediction of ``answer[i]`` (teacher forcing)."""
    n = len(answer)
    if logits.dim() != 2 or logits.shape[0] != n or n == 0:
        raise ValueError(f"answer_loglik: logits of shape {tuple(logits.shape)} for an answer of {n} tokens")
    logp = torch.log_softmax(logits.double(), dim=-1)
    return logp.gather(1, torch.as_tensor(list(answer), dtype=torch.long, device=logits.device)[:, None]).mean().item()


def bootstrap_interval(values: Sequence[float], *, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (fixed-seed resampling)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_interval: no values")
    idx = np.random.default_rng(seed).integers(0, x.size, (resamples, x.size))
    means = x[idx].mean(axis=1)
    alpha = (1.0 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


# ---------------------------------------------------------------- model calls
def greedy_decode(model, prompts: list[list[int]], max_new_tokens: int, policy: CachePolicy) -> list[list[int]]:
    """Greedy continuation of each prompt through ``attnlab.infer.generate`` (the decode runtime)."""
    return generate(model, prompts, max_new_tokens, cache_policy=policy).tokens


@torch.no_grad()
def teacher_forced_logits(model, policy: CachePolicy, prompts: list[list[int]],
                          answers: list[list[int]]) -> list[torch.Tensor]:
    """Per prompt, the logits (len(answer), V) predicting each answer token after the prompt and
    the answer's earlier tokens, through a decode runtime under ``policy`` (prompts prefilled,
    then ``answer[:-1]`` appended as one right-padded chunk)."""
    n_max = max(len(a) for a in answers)
    runtime = DecodeRuntime(model, policy, batch=len(prompts), max_length=max(len(p) for p in prompts) + n_max)
    first = runtime.prefill(prompts).float()                    # (B, V)
    rows = [[f] for f in first]
    if n_max > 1:
        rest = torch.zeros(len(prompts), n_max - 1, dtype=torch.long)
        for b, a in enumerate(answers):
            rest[b, : len(a) - 1] = torch.tensor(a[:-1], dtype=torch.long)
        logits = runtime.forward(rest, [len(a) - 1 for a in answers]).float()  # (B, n_max - 1, V)
        for b, a in enumerate(answers):
            rows[b].extend(logits[b, : len(a) - 1])
    return [torch.stack(r) for r in rows]


# ---------------------------------------------------------------- runner
def _check_list(values, key: str) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ConfigError(key, "must be a non-empty list", values)
    return list(values)


def score_tasks(model, tasks: list[RetrievalTask], policy: CachePolicy, *, decode: DecodeFn | None = None,
                batch_size: int = 8) -> list[dict]:
    """Per task: ``generated`` ids, ``correct`` (exact match) and ``answer_loglik``."""
    decode = decode or greedy_decode
    out = []
    for i in range(0, len(tasks), batch_size):
        chunk = tasks[i: i + batch_size]
        prompts = [list(t.prompt) for t in chunk]
        answers = [list(t.answer) for t in chunk]
        generated = decode(model, prompts, max(len(a) for a in answers), policy)
        logits = teacher_forced_logits(model, policy, prompts, answers)
        for task, gen, lg in zip(chunk, generated, logits):
            out.append({"generated": [int(t) for t in gen], "correct": exact_match(gen, task.answer),
                        "answer_loglik": answer_loglik(lg, task.answer)})
    return out


def run_retrieval(model, tokenizer, *, kinds: Sequence[str] = KINDS, lengths: Sequence[int],
                  depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), trials: int = 10,
                  policy: CachePolicy | str | dict | None = None, seed: int = 0, device=None,
                  progress: Callable[[str], None] | None = None, num_keys: int | None = None,
                  num_digits: int = 5, filler: Sequence[int] | np.ndarray | None = None,
                  header: bool = True, decode: DecodeFn | None = None, batch_size: int = 8) -> list[dict]:
    """One row per (kind, length, depth): ``kind, length, depth, depth_actual (mean), trials,
    num_keys, policy, accuracy, accuracy_lo, accuracy_hi`` (bootstrap 95% over trials),
    ``answer_loglik`` (mean over trials of the per-token mean, nats), ``answer_tokens`` (mean).
    ``num_keys`` is multikey's number of key/value pairs (default 4; passkey always has one).

    Every input is checked (and every task built) before the model runs; a prompt whose
    ``length + len(answer) - 1`` positions exceed ``model.config.block_size`` is a ConfigError.
    ``device``: move the model there first (default: where it is). ``decode``: replaces greedy
    decoding (``decode(model, prompts, max_new_tokens, policy) -> ids per prompt``), for tests
    and oracles; the log-likelihood always comes from the model."""
    kinds = [_check_kind(k) for k in _check_list(kinds, "kinds")]
    lengths = [_check_int(n, "lengths", 1) for n in _check_list(lengths, "lengths")]
    depths = [_check_depth(d) for d in _check_list(depths, "depths")]
    trials = _check_int(trials, "trials", 1)
    seed = _check_int(seed, "seed", 0)
    batch_size = _check_int(batch_size, "batch_size", 1)
    policy = CachePolicy.parse(policy)
    if device is not None:
        model = model.to(device)
    model.eval()
    block, vocab = model.config.block_size, model.config.vocab_size
    cells = []
    for kind in kinds:
        for length in lengths:
            for depth in depths:
                tasks = [make_task(tokenizer, kind, length, depth, seed=seed + t,
                                   num_keys=num_keys if kind == "multikey" else None,
                                   num_digits=num_digits, filler=filler, header=header) for t in range(trials)]
                need = max(length + len(t.answer) - 1 for t in tasks)
                if need > block:
                    raise ConfigError("lengths", f"length {length} plus its answer needs {need} positions, more than "
                                      f"the model's block_size {block}", length)
                top = max(max(t.prompt + t.answer) for t in tasks)
                if top >= vocab:
                    raise ConfigError("tokenizer", f"token id {top} is outside the model's vocab (size {vocab})",
                                      getattr(tokenizer, "name", tokenizer))
                cells.append((kind, length, depth, tasks))
    rows = []
    for i, (kind, length, depth, tasks) in enumerate(cells):
        scores = score_tasks(model, tasks, policy, decode=decode, batch_size=batch_size)
        correct = [float(s["correct"]) for s in scores]
        lo, hi = bootstrap_interval(correct)
        row = {"kind": kind, "length": length, "depth": depth,
               "depth_actual": float(np.mean([t.depth_actual for t in tasks])), "trials": trials,
               "num_keys": tasks[0].num_keys, "policy": policy.label, "accuracy": float(np.mean(correct)),
               "accuracy_lo": lo, "accuracy_hi": hi,
               "answer_loglik": float(np.mean([s["answer_loglik"] for s in scores])),
               "answer_tokens": float(np.mean([len(t.answer) for t in tasks]))}
        rows.append(row)
        if progress is not None:
            progress(f"retrieval {i + 1}/{len(cells)}: {kind} length {length} depth {depth:g}: accuracy "
                     f"{row['accuracy']:.2f} [{lo:.2f}, {hi:.2f}], answer loglik {row['answer_loglik']:.3f}")
    return rows


# ---------------------------------------------------------------- as a suite benchmark
def run_retrieval_bench(cfg, ctx) -> list[dict]:
    """``run_retrieval`` as a suite benchmark: ``cfg`` is a ``RetrievalBench`` spec (``kinds,
    lengths, depths, trials, policy, seed, num_keys, num_digits, filler`` ("sentences" |
    "heldout"), ``header, tokenizer_path, batch_size``), ``ctx`` a ``BenchContext``; the policy
    falls back to the run's cache policy, then the model's native dtype."""
    from attnlab.bench.latency import resolve_policy

    filler = None
    if cfg.filler == "heldout":
        if ctx.heldout is None or len(ctx.heldout) == 0:
            raise ConfigError("filler", "'heldout' needs the run's held-out tokens, and this run has none (use "
                              "filler: sentences)", cfg.filler)
        filler = np.asarray(ctx.heldout)
    return run_retrieval(ctx.model, bench_tokenizer(cfg, ctx), kinds=cfg.kinds, lengths=cfg.lengths,
                         depths=cfg.depths, trials=cfg.trials, policy=resolve_policy(cfg.policy, ctx), seed=cfg.seed,
                         num_keys=cfg.num_keys, num_digits=cfg.num_digits, filler=filler, header=cfg.header,
                         batch_size=cfg.batch_size)


# ---------------------------------------------------------------- output
def format_retrieval_table(rows: list[dict]) -> str:
    """Markdown table of ``run_retrieval`` rows."""
    lines = ["| kind | keys | policy | length | depth | trials | accuracy | 95% interval | answer loglik |",
             "|---|---:|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['num_keys']} | {r['policy']} | {r['length']} | {r['depth']:g} | {r['trials']} | "
                     f"{r['accuracy']:.3f} | [{r['accuracy_lo']:.3f}, {r['accuracy_hi']:.3f}] | "
                     f"{r['answer_loglik']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_retrieval(rows: list[dict], path: str | Path, *, title: str | None = None) -> Path:
    """Accuracy vs depth, one line (with its bootstrap interval) per length, one panel per
    (kind, policy); written as a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("plot_retrieval: no rows")
    panels = sorted({(r["kind"], r["policy"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (kind, pol) in zip(axes[0], panels):
        sub = [r for r in rows if r["kind"] == kind and r["policy"] == pol]
        for length in sorted({r["length"] for r in sub}):
            pts = sorted((r for r in sub if r["length"] == length), key=lambda r: r["depth"])
            x = [r["depth"] for r in pts]
            y = [r["accuracy"] for r in pts]
            err = [[r["accuracy"] - r["accuracy_lo"] for r in pts], [r["accuracy_hi"] - r["accuracy"] for r in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{length} tokens")
        ax.set(xlabel="needle depth", ylabel="accuracy", ylim=(-0.05, 1.05), title=f"{kind} ({pol})")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["DEFAULT_NUM_KEYS", "FILLER_SENTENCES", "HEADERS", "KEY_NAMES", "KINDS", "KIND_INDEX",
           "RetrievalTask", "make_task", "exact_match", "answer_loglik", "bootstrap_interval",
           "greedy_decode", "teacher_forced_logits", "score_tasks", "run_retrieval", "run_retrieval_bench",
           "format_retrieval_table", "plot_retrieval"]
