"""Synthetic retrieval tasks (passkey, multi-key needle-in-a-haystack) as pure token sequences.

``make_task`` is a pure function of ``(tokenizer, kind, length, depth, seed, num_keys, num_digits,
filler, header)``: no model, no torch. It lives in the data layer so that training data
(:mod:`attnlab.data.retrieval_mix`) and the benchmark (:mod:`attnlab.bench.retrieval`, which
re-exports everything here and documents the task layout and scoring) build exactly the same
tasks. A prompt is built from separately encoded pieces, so its length in tokens is exactly
``length`` for any tokenizer::

    [header] | filler[:a] | needle | filler[a:H] | question        answer = encode(" <digits>")

The needle contents and the filler offset depend on ``(seed, kind, num_keys, num_digits)`` and the
filler's length only, not on the task's length or depth; the distractor positions also depend on the length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attnlab.errors import ConfigError

KINDS = ("passkey", "multikey")
DEFAULT_NUM_KEYS = {"passkey": 1, "multikey": 4}
FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again.")
KEY_NAMES = ("apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "piano", "comet", "harbor",
             "velvet", "canyon", "falcon", "garnet", "meadow", "pepper", "quartz", "saddle", "tundra",
             "walnut", "anchor", "bishop", "copper", "dragon", "ember", "forest", "glacier", "island",
             "jasmine", "kettle", "lantern", "marble")
HEADERS = {"passkey": "Find and remember the pass key hidden in this text.",
           "multikey": "Find and remember the values of the keys hidden in this text."}
KIND_INDEX = {k: i for i, k in enumerate(KINDS)}


@dataclass(frozen=True)
class RetrievalTask:
    kind: str
    length: int                  # requested = actual prompt length in tokens
    depth: float                 # requested depth fraction
    depth_actual: float          # filler tokens before the queried needle / haystack tokens
    seed: int
    num_keys: int
    prompt: tuple[int, ...]
    answer: tuple[int, ...]      # encode(" <digits>"): the leading space is part of the answer
    answer_text: str             # the digits
    needle_start: int            # token index of the queried needle in the prompt
    key: str | None = None       # multikey: the queried key's name
    pairs: tuple[tuple[str, str], ...] = ()  # multikey: every (name, value) in the haystack, needle order


def follow_up(tokenizer, task: RetrievalTask, terminator: str) -> list[int]:
    """Further question/answer pairs about a multikey task's other keys (a training document's
    denser signal; the benchmark asks one question): ``" What is the value of key <name>? The
    value of key <name> is <digits><terminator>"`` for each key but the queried one, in needle
    order. Empty for passkey."""
    out: list[int] = []
    for name, value in task.pairs:
        if name != task.key:
            out += tokenizer.encode(f" What is the value of key {name}? The value of key {name} is {value}{terminator}")
    return out


def _check_kind(kind) -> str:
    if kind not in KINDS:
        raise ConfigError("kinds", f"unknown retrieval kind; known: {', '.join(KINDS)}", kind)
    return kind


def _check_int(value, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(key, f"must be an integer >= {minimum}", value)
    return int(value)


def _check_depth(depth) -> float:
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= float(depth) <= 1.0:
        raise ConfigError("depths", "a depth is a fraction of the haystack in [0, 1]", depth)
    return float(depth)


def _num_keys(kind: str, num_keys) -> int:
    if num_keys is None:
        return DEFAULT_NUM_KEYS[kind]
    n = _check_int(num_keys, "num_keys", 1)
    if kind == "passkey" and n != 1:
        raise ConfigError("num_keys", "passkey has exactly one needle (use kind multikey for distractors)", n)
    if n > len(KEY_NAMES):
        raise ConfigError("num_keys", f"at most {len(KEY_NAMES)} keys", n)
    return n


def _filler_stream(tokenizer, filler) -> np.ndarray:
    if filler is None:
        return np.asarray(tokenizer.encode("".join(" " + s for s in FILLER_SENTENCES)), dtype=np.int64)
    stream = np.asarray(filler, dtype=np.int64).reshape(-1)
    if stream.size == 0:
        raise ConfigError("filler", "the filler token stream is empty", show_value=False)
    return stream


def _digits(rng: np.random.Generator, num_digits: int) -> str:
    first = str(rng.integers(1, 10))
    return first + "".join(str(d) for d in rng.integers(0, 10, num_digits - 1))


def make_task(tokenizer, kind: str, length: int, depth: float, *, seed: int = 0, num_keys: int | None = None,
              num_digits: int = 5, filler: Sequence[int] | np.ndarray | None = None,
              header: bool = True) -> RetrievalTask:
    """One task; the prompt has exactly ``length`` tokens (a ConfigError naming ``lengths`` when
    the header, needles and question do not fit). ``header=False`` leaves out the one-sentence
    instruction at the start (for very short contexts)."""
    kind = _check_kind(kind)
    length = _check_int(length, "lengths", 1)
    depth = _check_depth(depth)
    seed = _check_int(seed, "seed", 0)
    num_keys = _num_keys(kind, num_keys)
    num_digits = _check_int(num_digits, "num_digits", 1)
    rng = np.random.default_rng([seed, KIND_INDEX[kind], num_keys, num_digits])
    stream = _filler_stream(tokenizer, filler)
    offset = int(rng.integers(0, len(stream)))
    if kind == "passkey":
        values, names, query = [_digits(rng, num_digits)], [None], 0
        needles = [f" The pass key is {values[0]}. Remember it."]
        question = " What is the pass key? The pass key is"
    else:
        if 9 * 10 ** (num_digits - 1) < num_keys:
            raise ConfigError("num_digits", f"too few digits for {num_keys} distinct values", num_digits)
        names = [KEY_NAMES[i] for i in rng.permutation(len(KEY_NAMES))[:num_keys]]
        values = []
        while len(values) < num_keys:
            v = _digits(rng, num_digits)
            if v not in values:
                values.append(v)
        query = int(rng.integers(0, num_keys))
        needles = [f" The value of key {n} is {v}." for n, v in zip(names, values)]
        question = f" What is the value of key {names[query]}? The value of key {names[query]} is"
    header_ids = tokenizer.encode(HEADERS[kind]) if header else []
    needle_ids = [tokenizer.encode(n) for n in needles]
    question_ids = tokenizer.encode(question)
    answer = tokenizer.encode(" " + values[query])
    fixed = len(header_ids) + sum(len(n) for n in needle_ids) + len(question_ids)
    haystack = length - fixed
    if haystack < 0:
        raise ConfigError("lengths", f"{length} tokens cannot hold the {kind} task's header, needles and question "
                          f"({fixed} tokens with this tokenizer)", length)
    # insertion points (filler tokens before each needle): the queried one at the depth, the
    # distractors at positions seeded by (seed, kind, num_keys, num_digits, length)
    spots = np.random.default_rng([seed, KIND_INDEX[kind], num_keys, num_digits, length]).integers(
        0, haystack + 1, num_keys)
    spots[query] = round(depth * haystack)
    fill = np.take(stream, np.arange(offset, offset + haystack) % len(stream))
    prompt: list[int] = list(header_ids)
    cursor, needle_start = 0, -1
    for i in sorted(range(num_keys), key=lambda i: (int(spots[i]), i)):
        prompt += fill[cursor: spots[i]].tolist()
        cursor = int(spots[i])
        if i == query:
            needle_start = len(prompt)
        prompt += needle_ids[i]
    prompt += fill[cursor:].tolist() + question_ids
    assert len(prompt) == length and needle_start >= 0
    return RetrievalTask(kind=kind, length=length, depth=depth,
                         depth_actual=float(spots[query]) / haystack if haystack else 0.0, seed=seed, num_keys=num_keys,
                         prompt=tuple(int(t) for t in prompt), answer=tuple(int(t) for t in answer),
                         answer_text=values[query], needle_start=needle_start, key=names[query],
                         pairs=tuple(zip(names, values)) if kind == "multikey" else ())


__all__ = ["DEFAULT_NUM_KEYS", "FILLER_SENTENCES", "HEADERS", "KEY_NAMES", "KINDS", "KIND_INDEX", "RetrievalTask",
           "make_task"]
