"""Zero-shot downstream tasks from local JSONL, scored by log-likelihood as
lm-evaluation-harness scores ``multiple_choice`` tasks.

Formats (one JSON object per line; ``format: auto`` detects from the first line's keys):

- ``choice``     ``{"query", "choices", "gold"}`` (ARC, PIQA, COPA, OpenBookQA): each choice is a
  continuation of the query.
- ``winogrande`` ``{"context_options": [a, b], "continuation", "gold"}``: the shared
  continuation is scored after each context.
- ``hellaswag``  ``{"ctx", "endings", "label"}`` or the HF dataset's ``{"activity_label", "ctx_a", "ctx_b",
  "endings", "label"}`` (query ``activity_label: ctx_a + " " + ctx_b.capitalize()``, as lm-eval builds it):
  each ending continues the query (text cleaned as the harness's HellaSwag preprocessing does:
  `` [title]`` -> ``. ``, ``[...]`` removed).
- ``lambada``    ``{"context", "continuation"}``: last-word accuracy (greedy decoding reproduces
  every continuation token), ``perplexity`` per item as lm-eval reports it, and ``ppl_per_token``.

Scoring: ``loglik = sum_i log p(cont_i | context, cont_<i)`` over the continuation tokens, each
predicted from at most ``block_size`` preceding tokens (the context is cut from the left; a
continuation longer than ``block_size`` is scored in rolling pieces). Context and continuation are joined with one space unless
the context ends or the continuation starts with whitespace; the separator belongs to the scored
continuation. Tokens: as lm-evaluation-harness splits them (``encode_pair``): trailing whitespace of the
context moves to the continuation, then ``encode(context + continuation)`` is split after
``encode(context)``.

- ``acc``: argmax of the summed log-likelihood is the gold choice.
- ``acc_norm``: argmax of ``loglik / len(choice)``, the answer text's length in characters (without the
  separator), as lm-evaluation-harness; a task's ``acc_norm_by: bytes`` divides by its UTF-8 bytes instead.
  WinoGrande's continuation is shared, so its acc_norm equals acc.
- ``*_stderr``: sample standard error of the mean, sqrt(p (1 - p) / (n - 1)), as the harness.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from attnlab.bench.context import BenchContext, bench_tokenizer
from attnlab.config.bench import DownstreamBench, DownstreamTask
from attnlab.errors import DataError, InputError

FORMATS = ("choice", "winogrande", "lambada", "hellaswag")
TOKEN_BUDGET = 16384  # tokens per scoring forward (batch x padded length)


# ---------------------------------------------------------------- examples and parsing
@dataclass
class ChoiceExample:
    """Score ``continuations[i]`` after ``contexts[i]``; ``answers[i]`` is the answer text whose
    UTF-8 length normalizes ``acc_norm``."""

    contexts: list[str]
    continuations: list[str]
    answers: list[str]
    gold: int


@dataclass
class LambadaExample:
    context: str
    continuation: str


def join(context: str, continuation: str) -> str:
    """The scored continuation: ``continuation`` with a leading space unless the context ends
    with or the continuation starts with whitespace (or the context is empty)."""
    if not context or context[-1:].isspace() or continuation[:1].isspace():
        return continuation
    return " " + continuation


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def detect_format(record: dict) -> str | None:
    keys = set(record)
    if "context_options" in keys:
        return "winogrande"
    if {"ctx", "endings"} <= keys or {"ctx_a", "endings"} <= keys:
        return "hellaswag"
    if {"query", "choices"} <= keys:
        return "choice"
    if {"context", "continuation"} <= keys:
        return "lambada"
    return None


def _need(record: dict, key: str, kind: type, where: str):
    if key not in record:
        raise DataError(f"{where}: missing key {key!r}")
    value = record[key]
    if kind is int and isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # HellaSwag labels often come as strings
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _strings(record: dict, key: str, where: str, count: int | None = None) -> list[str]:
    values = _need(record, key, list, where)
    if not values or not all(isinstance(v, str) for v in values):
        raise DataError(f"{where}: {key!r} must be a non-empty list of strings")
    if count is not None and len(values) != count:
        raise DataError(f"{where}: {key!r} must hold {count} strings, got {len(values)}")
    return values


def _gold(record: dict, key: str, count: int, where: str) -> int:
    gold = _need(record, key, int, where)
    if not 0 <= gold < count:
        raise DataError(f"{where}: {key!r}={gold} is outside 0..{count - 1}")
    return gold


def parse_example(record: dict, fmt: str, where: str) -> ChoiceExample | LambadaExample:
    """One JSONL record of format ``fmt``; errors name ``where`` (file:line)."""
    if fmt == "choice":
        query = _need(record, "query", str, where)
        choices = _strings(record, "choices", where)
        conts = [join(query, c) for c in choices]
        return ChoiceExample([query] * len(choices), conts, choices, _gold(record, "gold", len(choices), where))
    if fmt == "hellaswag":
        if "ctx_a" in record:  # the HF dataset's fields: lm-eval's preprocessing
            ctx = _need(record, "ctx_a", str, where) + " " + _need(record, "ctx_b", str, where).capitalize()
            label = record.get("activity_label")
            query = _hellaswag_clean(f"{label}: {ctx}" if isinstance(label, str) and label else ctx)
        else:
            query = _hellaswag_clean(_need(record, "ctx", str, where))
        endings = [_hellaswag_clean(e) for e in _strings(record, "endings", where)]
        conts = [join(query, e) for e in endings]
        return ChoiceExample([query] * len(endings), conts, endings, _gold(record, "label", len(endings), where))
    if fmt == "winogrande":
        options = _strings(record, "context_options", where, count=2)
        cont = _need(record, "continuation", str, where)
        return ChoiceExample(options, [join(o, cont) for o in options], [cont, cont],
                             _gold(record, "gold", 2, where))
    if fmt == "lambada":
        context = _need(record, "context", str, where)
        cont = _need(record, "continuation", str, where)
        if not cont.strip():
            raise DataError(f"{where}: 'continuation' is empty")
        return LambadaExample(context, join(context, cont))
    raise AssertionError(f"unhandled format {fmt!r}")  # the config's Literal forbids this


def load_task(path: str | Path, fmt: str = "auto", limit: int | None = None) -> tuple[str, list]:
    """(format, examples) of a local JSONL task; the first ``limit`` examples when given. A
    missing file or a malformed line is a :class:`DataError` naming the file and line."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"downstream task file not found: {file}")
    examples: list = []
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if fmt == "auto":
                fmt = detect_format(record) or ""
                if not fmt:
                    raise DataError(f"{where}: cannot detect the task format from keys {sorted(record)} "
                                    f"(formats: {', '.join(FORMATS)}); set the task's format")
            examples.append(parse_example(record, fmt, where))
    if not examples:
        raise DataError(f"{file}: no examples")
    return fmt, examples


# ---------------------------------------------------------------- scoring
@dataclass
class Score:
    logprob: float        # sum over the continuation tokens, nats
    is_greedy: bool       # greedy decoding reproduces every continuation token
    tokens: int           # continuation tokens
    truncated: bool       # the context was cut from the left to fit block_size


def encode_pair(tokenizer, context: str, continuation: str,
                prefix_id: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` as they appear in the joint encoding
    (BPE merges across the boundary stay in the continuation), as lm-evaluation-harness's
    ``_encode_pair`` splits them: trailing whitespace of the context first moves to the front of
    the continuation (``"Answer: "`` + ``"Planetary"`` scores ``" Planetary"`` after ``"Answer:"``,
    not a lone space token then ``"Planetary"``). An empty context (also one of whitespace only)
    becomes ``[prefix_id]`` (default: the tokenizer's end-of-text id), as in the harness. Where the
    joint encoding does not start with the context's (a merge across the boundary), the
    continuation is encoded on its own (the harness would score an empty or shifted slice)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        prefix = tokenizer.eot_id if prefix_id is None else prefix_id
        if prefix is None:
            raise InputError(f"empty context before {continuation[:40]!r} and the tokenizer has no end-of-text "
                             f"token to condition on")
        return [prefix], list(tokenizer.encode(continuation))
    whole = list(tokenizer.encode(context + continuation))
    ctx_ids = list(tokenizer.encode(context))
    if whole[: len(ctx_ids)] == ctx_ids and len(whole) > len(ctx_ids):
        return ctx_ids, whole[len(ctx_ids):]
    return ctx_ids, list(tokenizer.encode(continuation))


@torch.no_grad()
def score_requests(model, requests: list[tuple[list[int], list[int]]], *,
                   token_budget: int = TOKEN_BUDGET) -> list[Score]:
    """Log-likelihood of each continuation given its context: ``requests`` are (context ids,
    continuation ids) with a non-empty context (use a prefix token for an empty one).

    Each continuation token is predicted from up to ``block_size`` preceding tokens: the context
    is cut from the left, and a continuation longer than ``block_size`` is scored in pieces of
    ``block_size`` tokens, each with a full window of preceding context (lm-evaluation-harness's
    rolling windows). Pieces are batched longest first, right padded; only the scored
    positions go through the LM head."""
    block = model.config.block_size
    device = next(model.parameters()).device
    pieces = []  # (request, inputs, number of scored targets)
    for i, (ctx_ids, cont_ids) in enumerate(requests):
        if not ctx_ids:
            raise InputError(f"request {i}: empty context (prepend a prefix token such as end-of-text)")
        if not cont_ids:
            raise InputError(f"request {i}: empty continuation")
        whole = list(ctx_ids) + list(cont_ids)
        for s in range(len(ctx_ids), len(whole), block):  # targets whole[s:e]
            e = min(s + block, len(whole))
            pieces.append((i, whole[max(0, e - 1 - block): e - 1], whole[s:e]))
    order = sorted(range(len(pieces)), key=lambda p: -len(pieces[p][1]))
    totals = [0.0] * len(requests)
    greedy = [True] * len(requests)
    truncated = [len(c) + len(k) - 1 > block for c, k in requests]
    start = 0
    while start < len(order):
        width = len(pieces[order[start]][1])
        batch = order[start: start + max(1, token_budget // width)]
        start += len(batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, : len(pieces[p][1])] = torch.tensor(pieces[p][1])
        hidden = _hidden(model, ids.to(device))  # (B, width, d_model), or logits for other models
        for row, p in enumerate(batch):
            i, inputs, targets = pieces[p]
            n, c = len(inputs), len(targets)
            logprobs = torch.log_softmax(_head(model, hidden[row, n - c: n]).float(), dim=-1)  # (c, V)
            target = torch.tensor(targets, device=logprobs.device)
            totals[i] += logprobs.gather(-1, target[:, None]).sum().item()
            greedy[i] = greedy[i] and bool((logprobs.argmax(-1) == target).all())
    return [Score(totals[i], greedy[i], len(requests[i][1]), truncated[i]) for i in range(len(requests))]


def _hidden(model, ids: torch.Tensor) -> torch.Tensor:
    return model.hidden_states(ids) if hasattr(model, "hidden_states") else model(ids)


def _head(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(hidden) if hasattr(model, "hidden_states") else hidden


def _stderr(values: list[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    p = sum(values) / n
    return math.sqrt(p * (1 - p) / (n - 1))


def evaluate_choice(model, tokenizer, examples: list[ChoiceExample], acc_norm_by: str = "chars") -> dict:
    """acc / acc_norm (with stderr), n, truncated; ``scores`` holds each example's summed
    log-likelihoods per choice."""
    requests, spans = [], []
    for ex in examples:
        spans.append((len(requests), len(ex.contexts)))
        requests += [encode_pair(tokenizer, c, k) for c, k in zip(ex.contexts, ex.continuations)]
    scores = score_requests(model, requests)
    acc, acc_norm, per_example, truncated = [], [], [], 0
    for ex, (first, count) in zip(examples, spans):
        lls = [s.logprob for s in scores[first: first + count]]
        truncated += any(s.truncated for s in scores[first: first + count])
        normed = [ll / max(1, len(a) if acc_norm_by == "chars" else len(a.encode("utf-8")))
                  for ll, a in zip(lls, ex.answers)]
        acc.append(float(max(range(count), key=lambda i: lls[i]) == ex.gold))
        acc_norm.append(float(max(range(count), key=lambda i: normed[i]) == ex.gold))
        per_example.append(lls)
    n = len(examples)
    return {"n": n, "acc": sum(acc) / n, "acc_stderr": _stderr(acc), "acc_norm": sum(acc_norm) / n,
            "acc_norm_stderr": _stderr(acc_norm), "perplexity": None, "ppl_per_token": None, "nll_per_token": None,
            "continuation_tokens": sum(s.tokens for s in scores), "truncated": truncated,
            "scores": per_example}


def evaluate_lambada(model, tokenizer, examples: list[LambadaExample]) -> dict:
    """Last-word accuracy (every continuation token is the greedy choice); ``perplexity`` as
    lm-evaluation-harness's LAMBADA reports it, per item: exp(-mean over examples of the
    continuation's summed log-likelihood); ``ppl_per_token`` and ``nll_per_token`` per
    continuation token."""
    scores = score_requests(model, [encode_pair(tokenizer, ex.context, ex.continuation) for ex in examples])
    n, tokens = len(scores), sum(s.tokens for s in scores)
    hits = [float(s.is_greedy) for s in scores]
    nll = -sum(s.logprob for s in scores) / tokens
    per_item = -sum(s.logprob for s in scores) / n
    return {"n": n, "acc": sum(hits) / n, "acc_stderr": _stderr(hits), "acc_norm": None,
            "acc_norm_stderr": None, "perplexity": math.exp(min(per_item, 700.0)),
            "ppl_per_token": math.exp(min(nll, 700.0)), "nll_per_token": nll,
            "continuation_tokens": tokens, "truncated": sum(s.truncated for s in scores),
            "scores": [s.logprob for s in scores]}


def evaluate_task(model, tokenizer, task: DownstreamTask) -> dict:
    fmt, examples = load_task(task.path, task.format, task.limit)
    if fmt == "lambada":
        result = evaluate_lambada(model, tokenizer, examples)
    else:
        result = evaluate_choice(model, tokenizer, examples, task.acc_norm_by)
    return {"format": fmt, **result}


@torch.no_grad()
def run_downstream(cfg: DownstreamBench, ctx: BenchContext) -> list[dict]:
    """One row per task: ``task, format, n, acc, acc_stderr, acc_norm, acc_norm_stderr`` (None for
    LAMBADA), ``perplexity`` (LAMBADA, per item as lm-eval), ``ppl_per_token, nll_per_token`` (LAMBADA
    continuation tokens; None for choice tasks),
    ``continuation_tokens``, ``truncated`` (examples whose context was cut to fit block_size)."""
    tokenizer = bench_tokenizer(cfg, ctx)
    rows = []
    for task in cfg.tasks:
        result = evaluate_task(ctx.model, tokenizer, task)
        result.pop("scores")
        rows.append({"task": task.name, **result})
    return rows
