"""Training data that teaches retrieval: fixed-length documents mixing synthetic retrieval tasks
with plain text (``data.source: retrieval_mix``).

Every document has exactly ``D = length + 1`` tokens, so training windows of ``length`` tokens
taken at multiples of ``D`` (``TrainBatches(..., align=D)``, the mechanism teacher-sampled data
uses) each hold one whole document. A document is either

- a **task**: ``make_task(tokenizer, kind, n, depth, seed=task_seed, ...)``'s prompt, then its
  answer, then ``encode(terminator)`` (so the language-model objective teaches answering), then,
  when the prompt is shorter than the document (``min_task_length``), a window of text; or
- a **text window**: ``D`` consecutive tokens of the text at ``data.path``.

Exactly ``round(task_fraction * documents)`` documents are tasks (at seeded random places). Each
document's kind, depth (uniform in [0, 1)), prompt length, haystack (the cycled
``FILLER_SENTENCES`` with probability ``sentence_filler``, else the text from a seeded offset) and
text offset are a pure function of ``(mix.seed, split, index)``: :func:`document_spec`.

**Held-out documents never share anything with training ones**: their task seeds are disjoint
(``task_seed``: ``(seed + 1) * 2**32 + split * 2**31 + index``, also disjoint from the small seeds
the retrieval benchmark uses) and their text (haystacks and windows) is the last ``val_fraction``
of the text, which training documents never read.

:func:`mix_file` writes train documents then held-out documents as one ``.npy`` plus a sidecar
(``train_documents``, ``heldout_documents``, ``document_length``), cached by a key over the
options, the tokenizer and the text tokens' checksum; ``load_splits`` splits it at the boundary.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attnlab.config.data import RetrievalMix, TokenizerConfig
from attnlab.data.prepare import SIDECAR_FORMAT, output_dtype, sidecar_path, write_json_atomic
from attnlab.data.retrieval_tasks import DEFAULT_NUM_KEYS, follow_up, make_task
from attnlab.errors import ConfigError, DataError
from attnlab.fsutil import atomic_write_bytes

SPLITS = ("train", "heldout")
MIX_FORMAT = "attnlab-retrieval-mix/1"
_KEY = "data.retrieval_mix"


@dataclass(frozen=True)
class DocumentSpec:
    """What document ``index`` of ``split`` holds (``kind`` None: a text window)."""

    split: str
    index: int
    kind: str | None
    depth: float = 0.0
    task_seed: int = 0
    task_length: int = 0      # prompt tokens (tasks)
    sentences: bool = False   # haystack: cycled FILLER_SENTENCES instead of text
    text_offset: int = 0      # where the text window / the text after the task starts


def task_seed(mix: RetrievalMix, split: str, index: int) -> int:
    """The ``make_task`` seed of document ``index`` of ``split``: disjoint across splits and from
    the benchmark's seeds (< 2**32)."""
    return (mix.seed + 1) * 2 ** 32 + SPLITS.index(split) * 2 ** 31 + index


def num_documents(mix: RetrievalMix, split: str) -> int:
    return mix.documents if split == "train" else mix.heldout_documents


def task_indices(mix: RetrievalMix, split: str) -> np.ndarray:
    """Sorted indices of the task documents of ``split``: exactly ``round(task_fraction * n)``."""
    n = num_documents(mix, split)
    rng = np.random.default_rng([mix.seed, SPLITS.index(split), 0x6D6978])  # tag: "mix"
    return np.sort(rng.permutation(n)[: int(round(mix.task_fraction * n))])


def _task(tokenizer, mix: RetrievalMix, kind: str, length: int, depth: float, seed: int, filler):
    """``make_task`` with the mix's options; a task that does not fit names the mix's key."""
    try:
        return make_task(tokenizer, kind, length, depth, seed=seed, num_keys=_keys(mix, kind),
                         num_digits=mix.num_digits, filler=filler, header=mix.header)
    except ConfigError as err:
        if err.path != "lengths":  # anything else was validated with the config
            raise
        key = "min_task_length" if mix.min_task_length is not None and length < mix.length else "length"
        raise ConfigError(f"{_KEY}.{key}", f"too short for a {kind} task ({str(err).split(': ', 1)[-1]})",
                          getattr(mix, key), show_value=False) from None


def _suffix_length(tokenizer, mix: RetrievalMix, kind: str, seed: int, filler) -> int:
    """Tokens after the prompt: the answer (which depends on the seed, not the length) plus the
    terminator, plus the follow-up questions with ``follow_up``. The needles depend on the
    filler's length (``make_task`` draws the filler offset first), so the probe takes the
    document's own filler when the follow-ups (whose key names vary in length) are counted."""
    probe = _task(tokenizer, mix, kind, mix.length + 1, 0.0, seed, filler if mix.follow_up else [0])
    extra = len(follow_up(tokenizer, probe, mix.terminator)) if mix.follow_up else 0
    return len(probe.answer) + len(tokenizer.encode(mix.terminator)) + extra


def _keys(mix: RetrievalMix, kind: str) -> int:
    return mix.num_keys if kind == "multikey" else DEFAULT_NUM_KEYS["passkey"]


def document_spec(tokenizer, mix: RetrievalMix, split: str, index: int, text_len: int,
                  tasks: set[int] | None = None, text: np.ndarray | None = None) -> DocumentSpec:
    """Document ``index`` of ``split`` (``text_len``: tokens of that split's text; ``tasks``:
    :func:`task_indices`, computed when not given)."""
    tasks = set(task_indices(mix, split).tolist()) if tasks is None else tasks
    size = mix.length + 1
    rng = np.random.default_rng([mix.seed, SPLITS.index(split), index])
    kind = mix.kinds[int(rng.integers(0, len(mix.kinds)))]
    depth = float(rng.random())
    sentences = bool(rng.random() < mix.sentence_filler)
    draw = rng.integers(0, 2 ** 62)  # prompt length, drawn before we know how many fit
    offset = int(rng.integers(0, text_len - size + 1))
    if index not in tasks:
        return DocumentSpec(split, index, None, text_offset=offset)
    seed = task_seed(mix, split, index)
    if mix.follow_up and not sentences and text is None:
        raise ValueError("document_spec: follow-up questions over text fillers need the split's text")
    longest = size - _suffix_length(tokenizer, mix, kind, seed, None if sentences else text)
    shortest = longest if mix.min_task_length is None else mix.min_task_length
    if shortest > longest:
        raise ConfigError(f"{_KEY}.min_task_length", f"leaves no room for the answer and terminator in documents of "
                          f"{size} tokens (at most {longest} prompt tokens fit)", mix.min_task_length)
    return DocumentSpec(split, index, kind, depth=depth, task_seed=seed,
                        task_length=shortest + int(draw % (longest - shortest + 1)),
                        sentences=sentences, text_offset=offset)


def build_document(tokenizer, mix: RetrievalMix, spec: DocumentSpec, text: np.ndarray) -> np.ndarray:
    """The ``length + 1`` tokens (int64) of ``spec`` over ``text`` (that split's text tokens)."""
    size = mix.length + 1
    if spec.kind is None:
        return np.asarray(text[spec.text_offset: spec.text_offset + size], dtype=np.int64)
    task = _task(tokenizer, mix, spec.kind, spec.task_length, spec.depth, spec.task_seed,
                 None if spec.sentences else text)
    extra = tuple(follow_up(tokenizer, task, mix.terminator)) if mix.follow_up else ()
    head = np.asarray(task.prompt + task.answer + tuple(tokenizer.encode(mix.terminator)) + extra, dtype=np.int64)
    rest = np.asarray(text[spec.text_offset: spec.text_offset + size - len(head)], dtype=np.int64)
    doc = np.concatenate([head, rest])
    assert len(doc) == size, (len(doc), size)
    return doc


def split_text(text: np.ndarray, mix: RetrievalMix, val_fraction: float) -> dict[str, np.ndarray]:
    """``{"train": ..., "heldout": ...}``: the last ``val_fraction`` of ``text`` (at least one
    document's worth) is held-out text; each part must hold one document."""
    size = mix.length + 1
    num_val = max(size, int(len(text) * val_fraction))
    if len(text) - num_val < size:
        raise DataError(f"{_KEY}: the text has {len(text)} tokens, too few for one train and one held-out window of "
                        f"{size} tokens (length + 1)")
    return {"train": np.asarray(text[: len(text) - num_val]), "heldout": np.asarray(text[len(text) - num_val:])}


#: documents per worker task when the build runs in parallel (below 4 such chunks: one process)
PARALLEL_CHUNK = 2000
_WORKER: dict = {}


def _build_range(bounds: tuple[int, int]) -> np.ndarray:
    tokenizer, mix, split, text, tasks = (_WORKER[k] for k in ("tokenizer", "mix", "split", "text", "tasks"))
    start, stop = bounds
    out = np.empty((stop - start, mix.length + 1), dtype=np.int64)
    for i in range(start, stop):
        out[i - start] = build_document(tokenizer, mix, document_spec(tokenizer, mix, split, i, len(text), tasks, text),
                                        text)
    return out


def default_workers() -> int:
    import os

    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def mix_documents(tokenizer, mix: RetrievalMix, text: np.ndarray, split: str, workers: int | None = None) -> np.ndarray:
    """All documents of ``split`` over that split's ``text``: int64 ``(n, length + 1)``. Each
    document is a pure function of its index, so large builds run in ``workers`` forked processes
    (default: the CPUs this process may use) with the same result as one."""
    tasks = set(task_indices(mix, split).tolist())
    n = num_documents(mix, split)
    ranges = [(a, min(n, a + PARALLEL_CHUNK)) for a in range(0, n, PARALLEL_CHUNK)]
    workers = default_workers() if workers is None else workers
    _WORKER.update(tokenizer=tokenizer, mix=mix, split=split, text=text, tasks=tasks)
    try:
        if workers <= 1 or len(ranges) < 4:
            parts = [_build_range(r) for r in ranges]
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # fork: the workers inherit the tokenizer, the text and the task set (no pickling)
            with ProcessPoolExecutor(min(workers, len(ranges)), mp_context=multiprocessing.get_context("fork")) as pool:
                parts = list(pool.map(_build_range, ranges))
    finally:
        _WORKER.clear()
    return np.concatenate(parts) if parts else np.empty((0, mix.length + 1), dtype=np.int64)


def mix_file(tokenizer, tok_cfg: TokenizerConfig, mix: RetrievalMix, text: np.ndarray, val_fraction: float,
             cache_dir: Path, text_label: str) -> Path:
    """Build (or reuse) the cached ``.npy`` of train then held-out documents, with its sidecar."""
    # in memory as int64 once: slicing a memory-mapped uint8 file per document is ~18x slower
    text = np.ascontiguousarray(text, dtype=np.int64)
    text_sha = hashlib.sha256(text.tobytes()).hexdigest()
    dump = mix.model_dump(mode="json")
    if not dump["follow_up"]:  # documents without follow-ups are what they were before the option existed
        del dump["follow_up"]
    key_src = {"format": MIX_FORMAT, "mix": dump, "tokenizer": tok_cfg.type,
               "val_fraction": val_fraction, "text_sha256": text_sha}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()
    output = Path(cache_dir).expanduser() / f"retrieval-mix-{tok_cfg.type}-{key[:16]}.npy"
    side = sidecar_path(output)
    if output.is_file() and side.is_file():
        try:
            cached = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cached = None  # a damaged cache entry is rebuilt, not fatal
        if isinstance(cached, dict) and cached.get("cache_key") == key:
            return output
    parts = split_text(text, mix, val_fraction)
    docs = np.concatenate([mix_documents(tokenizer, mix, parts[s], s).reshape(-1) for s in SPLITS])
    tokens = docs.astype(output_dtype(tokenizer.vocab_size))
    output.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, tokens)
    atomic_write_bytes(output, buffer.getvalue())
    tasks = {s: int(len(task_indices(mix, s))) for s in SPLITS}
    description = (f"retrieval_mix:{text_label} ({mix.documents} train + {mix.heldout_documents} held-out documents "
                   f"of {mix.length + 1} tokens, task fraction {mix.task_fraction:g}, {'/'.join(mix.kinds)})")
    write_json_atomic(side, {
        "format": SIDECAR_FORMAT, "num_tokens": int(len(tokens)), "dtype": tokens.dtype.name,
        "tokenizer": tok_cfg.model_dump(mode="json"), "vocab_size": int(tokenizer.vocab_size),
        "tokens_sha256": hashlib.sha256(memoryview(np.ascontiguousarray(tokens)).cast("B")).hexdigest(),
        "description": description, "cache_key": key, "mix_format": MIX_FORMAT,
        "document_length": mix.length + 1, "train_documents": mix.documents,
        "heldout_documents": mix.heldout_documents, "train_tasks": tasks["train"], "heldout_tasks": tasks["heldout"],
        "text_sha256": text_sha,
    })
    return output


__all__ = ["DocumentSpec", "build_document", "document_spec", "mix_documents", "mix_file", "num_documents",
           "split_text", "task_indices", "task_seed"]
