"""Tokenize text into a ``.npy`` token file plus a JSON sidecar, atomically.

Inputs (text files, ``.jsonl`` files, folders) are read as documents by :mod:`attnlab.data.sources`.
Documents are joined with the tokenizer's end-of-text token when it has one (GPT-2: 50256), else
with the encoding of ``"\\n\\n"``. The token dtype is the smallest of uint8, uint16 and uint32 that holds the vocabulary.

The output is written to a temporary file in the same folder, fsynced and moved into place with
``os.replace``: a failure midway never leaves a partial token file. The sidecar ``<name>.json``
records the tokenizer, token count, dtype, sha256 of the token data and of the input bytes read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attnlab.config.data import TokenizerConfig
from attnlab.data.sources import InputFile, Piece, collect_inputs, iter_pieces
from attnlab.data.tokenizers import Tokenizer, build_tokenizer, encode_many
from attnlab.errors import DataError
from attnlab.fsutil import atomic_write_text, fsync_path

SIDECAR_FORMAT = "attnlab-tokens/1"
DOC_SEPARATOR_TEXT = "\n\n"  # used between documents when the tokenizer has no end-of-text token

_BATCH_CHARS = 8 << 20  # characters tokenized per batch
_HEADER_BYTES = 128  # fixed .npy v1.0 header size: room for any 1-D shape

ProgressFn = Callable[[int, int], None]


@dataclass
class PrepareStats:
    """What :func:`prepare` wrote."""

    num_tokens: int
    num_documents: int
    output: Path
    dtype: str
    seconds: float
    num_input_bytes: int = 0  # bytes read from the inputs
    num_skipped_files: int = 0  # binary / undecodable files skipped while walking folders
    max_token_id: int = -1
    truncated: bool = False  # the max_tokens cap was reached (reading stopped there)
    inputs_sha256: str = ""
    tokens_sha256: str = ""
    num_val_tokens: int | None = None  # size of the held-out tail for the given val_fraction
    skipped: list[Path] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("inf")


def sidecar_path(token_file: Path) -> Path:
    """``/x/name.npy`` -> ``/x/name.json``."""
    return Path(token_file).with_suffix(".json")


def output_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 1 << 8:  # byte-level vocabularies: half the bytes on disk and in memory
        return np.dtype(np.uint8)
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class _TokenWriter:
    """Streams a 1-D ``.npy`` to a temp file beside ``output``; ``commit`` moves it into place."""

    def __init__(self, output: Path, dtype: np.dtype):
        self.output = output
        self.dtype = dtype
        self.tmp = output.with_name(f".{output.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        self.file = open(self.tmp, "wb")
        self.file.write(b"\x00" * _HEADER_BYTES)
        self.count = 0
        self.max_id = -1
        self.sha = hashlib.sha256()

    def write(self, ids: np.ndarray) -> None:
        if ids.size == 0:
            return
        self.max_id = max(self.max_id, int(ids.max()))
        data = np.ascontiguousarray(ids, dtype=self.dtype.newbyteorder("<")).tobytes()
        self.sha.update(data)
        self.file.write(data)
        self.count += int(ids.size)

    def commit(self) -> None:
        descr = self.dtype.newbyteorder("<").str
        header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({self.count},), }}"
        pad = _HEADER_BYTES - 10 - len(header) - 1
        assert pad >= 0, "npy header does not fit"
        self.file.seek(0)
        self.file.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER_BYTES - 10)
                        + header.encode("latin1") + b" " * pad + b"\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.output)
        fsync_path(self.output.parent)

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass


def write_json_atomic(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _separator(tok: Tokenizer) -> np.ndarray:
    if tok.eot_id is not None:
        return np.array([tok.eot_id], dtype=np.int64)
    return np.asarray(tok.encode(DOC_SEPARATOR_TEXT), dtype=np.int64)


def _tokenize_into(writer: _TokenWriter, pieces: Iterator[Piece], tok: Tokenizer, max_tokens: int | None,
                   progress: ProgressFn | None, total_bytes: int) -> tuple[int, int, bool]:
    """Encode ``pieces`` in batches into ``writer``; returns (documents, bytes read, capped)."""
    separator = _separator(tok)
    num_docs = done_bytes = 0
    in_doc = truncated = exhausted = False
    while not exhausted and not truncated:
        # Batch several pieces (tiktoken encodes a batch on threads); stay small under a cap.
        limit = _BATCH_CHARS
        if max_tokens is not None:
            limit = min(limit, max(1 << 16, 8 * (max_tokens - writer.count)))
        buffer: list[tuple[bool, str]] = []
        buffered = 0
        for new_doc, text, nbytes in pieces:
            buffer.append((new_doc, text))
            buffered += len(text)
            done_bytes += nbytes
            if buffered >= limit:
                break
        else:
            exhausted = True
        encoded = iter(encode_many(tok, [t for _, t in buffer if t]))
        for new_doc, text in buffer:
            in_doc = in_doc and not new_doc
            if not text:
                continue
            ids = next(encoded)
            if not in_doc:  # first text of a document: separator, unless it is the first one
                if num_docs:
                    ids = np.concatenate([separator, ids])
                num_docs += 1
                in_doc = True
            if max_tokens is not None and writer.count + ids.size >= max_tokens:
                writer.write(ids[: max_tokens - writer.count])
                truncated = True
                break
            writer.write(ids)
        if progress is not None:
            progress(total_bytes if exhausted else min(done_bytes, total_bytes), total_bytes)
    return num_docs, done_bytes, truncated


def prepare(
    inputs: list[Path],
    output: Path,
    tokenizer: TokenizerConfig,
    text_field: str = "text",
    max_tokens: int | None = None,
    val_fraction: float | None = None,
    *,
    progress: ProgressFn | None = None,
    description: str | None = None,
    tokenizer_key: str = "tokenizer.path",
) -> PrepareStats:
    """Tokenize ``inputs`` (files and folders) into ``output`` (``.npy``) and ``<name>.json``.

    ``max_tokens`` caps the token count (reading stops there). ``val_fraction`` only records the
    size of the held-out tail in the stats and sidecar; splitting happens when loading.
    ``progress(done_bytes, total_bytes)`` is called after each tokenized batch.
    """
    files = collect_inputs(list(inputs))
    labels = [str(Path(p).expanduser().resolve()) for p in inputs]
    return prepare_files(files, output, tokenizer, text_field, max_tokens, val_fraction,
                         progress=progress, description=description, inputs_label=labels,
                         tokenizer_key=tokenizer_key)


def prepare_files(
    files: list[InputFile],
    output: Path,
    tokenizer: TokenizerConfig,
    text_field: str = "text",
    max_tokens: int | None = None,
    val_fraction: float | None = None,
    *,
    progress: ProgressFn | None = None,
    description: str | None = None,
    inputs_label: list[str] | None = None,
    extra: dict | None = None,
    tokenizer_key: str = "tokenizer.path",
) -> PrepareStats:
    """:func:`prepare` for already collected inputs; ``extra`` entries are merged into the sidecar
    (the loader stores its cache key there). Tokenizer errors name ``tokenizer_key``."""
    output = Path(output).expanduser()
    if output.suffix != ".npy":
        raise DataError(f"prepare writes a .npy token file; got output {output}")
    if max_tokens is not None and max_tokens <= 0:
        raise DataError(f"max_tokens must be positive, got {max_tokens}")
    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not files:
        raise DataError("empty corpus: no input files")
    labels = inputs_label if inputs_label is not None else [str(f.path) for f in files]
    tok = build_tokenizer(tokenizer, key=tokenizer_key)
    dtype = output_dtype(tok.vocab_size)
    total_bytes = sum(f.size for f in files)
    start = time.perf_counter()
    if output.is_dir():
        raise DataError(f"cannot write token file {output}: it is a folder")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        writer = _TokenWriter(output, dtype)
    except OSError as err:
        raise DataError(f"cannot write token file {output}: {_os_reason(err)}") from None

    in_hash = hashlib.sha256()
    skipped: list[Path] = []
    try:
        pieces = iter_pieces(files, text_field, in_hash, skipped)
        num_docs, done_bytes, truncated = _tokenize_into(
            writer, pieces, tok, max_tokens, progress, total_bytes)
        if writer.count == 0:
            raise DataError(f"empty corpus: no text in {', '.join(labels)}")
        if writer.max_id >= tok.vocab_size:  # internal invariant of the tokenizers
            raise AssertionError(f"tokenizer {tok.name} produced id {writer.max_id}")
        writer.commit()
    except OSError as err:  # disk full, output vanished, permissions changed midway
        writer.abort()
        raise DataError(f"cannot write token file {output}: {_os_reason(err)}") from None
    except BaseException:
        writer.abort()
        raise

    num_val = None
    if val_fraction is not None:
        num_val = max(1, int(writer.count * val_fraction))
    stats = PrepareStats(
        num_tokens=writer.count, num_documents=num_docs, output=output, dtype=dtype.name,
        seconds=time.perf_counter() - start, num_input_bytes=done_bytes,
        num_skipped_files=len(skipped), max_token_id=writer.max_id, truncated=truncated,
        inputs_sha256=in_hash.hexdigest(), tokens_sha256=writer.sha.hexdigest(),
        num_val_tokens=num_val, skipped=skipped,
    )
    tok_cfg = tokenizer.model_dump()
    if tok_cfg.get("path"):
        tok_cfg["path"] = str(Path(tok_cfg["path"]).expanduser().resolve())
    sidecar = {
        "format": SIDECAR_FORMAT,
        "num_tokens": stats.num_tokens,
        "dtype": stats.dtype,
        "tokenizer": tok_cfg,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "max_token_id": stats.max_token_id,
        "num_documents": num_docs,
        "num_input_bytes": done_bytes,
        "num_skipped_files": len(skipped),
        "inputs": labels,
        "inputs_sha256": stats.inputs_sha256,  # over the input bytes read (all, unless truncated)
        "tokens_sha256": stats.tokens_sha256,  # over the little-endian token data (no header)
        "truncated": truncated,
        "max_tokens": max_tokens,
        "text_field": text_field,
        "val_fraction": val_fraction,
        "description": description or ", ".join(labels),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    sidecar.update(extra or {})
    try:
        write_json_atomic(sidecar_path(output), sidecar)
    except OSError as err:
        raise DataError(f"cannot write sidecar {sidecar_path(output)}: {_os_reason(err)}") from None
    return stats


def _os_reason(err: OSError) -> str:
    """``err`` as one short line (``strerror`` without the temp-file name it may carry)."""
    return err.strerror or (str(err).splitlines() or [type(err).__name__])[0]
