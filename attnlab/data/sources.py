"""Reading corpus inputs as documents: text files, ``.jsonl`` files and folders.

Each file, and each JSONL line (text under ``text_field``), is one document. Folders are walked
recursively in sorted order of relative path, taking files with a suffix in :data:`TEXT_SUFFIXES` or
``.jsonl``; hidden entries are skipped, and so are binary (NUL bytes) and non-UTF-8 files found in
a folder. A file named explicitly must be UTF-8; a bad JSONL line is an error naming file and line.

Large text files are streamed in blocks cut only where GPT-2 pre-tokenization cannot cross (see
:func:`_safe_cut`), so tokenizing the pieces gives exactly the tokens of the whole text.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from attnlab.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst", ".py", ".tex")
JSONL_SUFFIX = ".jsonl"

_READ_BLOCK = 1 << 20  # bytes read per step from a text file
_MAX_CARRY = 64 << 20  # a text with no safe cut point is cut at any newline past this many chars

#: (starts a new document, text, input bytes consumed)
Piece = tuple[bool, str, int]


@dataclass(frozen=True)
class InputFile:
    path: Path
    kind: str  # "text" | "jsonl"
    from_folder: bool  # undecodable files found by walking a folder are skipped, not errors
    size: int


def collect_inputs(inputs: list[Path]) -> list[InputFile]:
    """Expand folders (recursive, sorted by relative path) and check that every input exists."""
    files: list[InputFile] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_file():
            kind = "jsonl" if path.suffix.lower() == JSONL_SUFFIX else "text"
            files.append(InputFile(path, kind, False, path.stat().st_size))
        elif path.is_dir():
            found = []
            for folder, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for name in names:
                    suffix = Path(name).suffix.lower()
                    if name.startswith(".") or suffix not in TEXT_SUFFIXES + (JSONL_SUFFIX,):
                        continue
                    full = Path(folder) / name
                    if full.is_file():
                        found.append((full.relative_to(path).as_posix(), full, suffix))
            if not found:
                raise DataError(
                    f"data folder {path} has no text files (looked for {', '.join(TEXT_SUFFIXES)}, {JSONL_SUFFIX})"
                )
            for _, full, suffix in sorted(found):
                kind = "jsonl" if suffix == JSONL_SUFFIX else "text"
                files.append(InputFile(full, kind, True, full.stat().st_size))
        elif path.exists():
            raise DataError(f"data path {path} is neither a file nor a folder")
        else:
            raise DataError(f"data path not found: {path}")
    return files


def _is_text(path: Path) -> bool:
    """True when the whole file decodes as UTF-8 and holds no NUL byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while block := f.read(_READ_BLOCK):
                if b"\x00" in block:
                    return False
                decoder.decode(block)
            decoder.decode(b"", final=True)
    except (UnicodeDecodeError, OSError):
        return False
    return True


def _safe_cut(text: str, start: int = 0) -> int:
    r"""Largest cut point i >= ``start`` where GPT-2 pre-tokenization of ``text[:i]`` and ``text[i:]``
    equals that of ``text`` (0 when there is none).

    A pre-token holding a newline holds only whitespace, and a whitespace run of one or two
    characters between non-space characters splits into single characters wherever the string
    ends. So a lone ``"\n"`` (cut after it) or a ``"\r\n"`` (cut between its characters) between
    non-space characters is a safe cut. Byte-level tokenizers are indifferent to the cut.
    """
    j = text.rfind("\n")
    while j >= max(start, 1):
        if j + 1 < len(text) and not text[j + 1].isspace():
            before = text[j - 1]
            if not before.isspace():
                return j + 1
            if before == "\r" and j >= 2 and not text[j - 2].isspace():
                return j
        j = text.rfind("\n", 0, j)
    if len(text) > _MAX_CARRY:  # no safe point in a huge run: bound memory, accept a tiny deviation
        return text.rfind("\n") + 1
    return 0


def _iter_text_file(path: Path, hasher) -> Iterator[Piece]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry = ""
    offset = 0
    first = True
    with open(path, "rb") as f:
        while True:
            raw = f.read(_READ_BLOCK)
            hasher.update(raw)
            try:
                fresh = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as err:
                raise DataError(f"{path} is not UTF-8 text (byte {offset + err.start})") from None
            text = carry + fresh
            offset += len(raw)
            if not raw:
                yield first, text, 0
                break
            cut = _safe_cut(text, start=len(carry) - 2)  # earlier points were already rejected
            yield first, text[:cut], len(raw)
            first = False
            carry = text[cut:]
    hasher.update(b"\x00")


def _iter_jsonl(path: Path, text_field: str, hasher) -> Iterator[Piece]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            hasher.update(line)
            where = f"{path} line {lineno}"
            try:
                stripped = line.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8 text") from None
            if not stripped:
                yield False, "", len(line)
                continue
            try:
                obj = json.loads(stripped)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            except RecursionError:
                raise DataError(f"{where}: invalid JSON (nested too deeply)") from None
            except ValueError as err:  # e.g. an integer literal over Python's 4300-digit limit
                raise DataError(f"{where}: invalid JSON ({str(err).splitlines()[0][:120]})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if text_field not in obj:
                raise DataError(f"{where}: no field {text_field!r} (text_field); keys: {sorted(obj)[:8]}")
            text = obj[text_field]
            if not isinstance(text, str):
                raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:  # a JSON escape of a lone surrogate ("\ud800")
                raise DataError(f"{where}: field {text_field!r} holds an unpaired surrogate "
                                f"{text[err.start]!r} (not valid Unicode text)") from None
            yield True, text, len(line)
    hasher.update(b"\x00")


def iter_pieces(files: list[InputFile], text_field: str, hasher, skipped: list[Path]) -> Iterator[Piece]:
    """(starts a new document, text, input bytes consumed) in corpus order."""
    for item in files:
        try:
            if item.kind == "jsonl":
                yield from _iter_jsonl(item.path, text_field, hasher)
            elif item.from_folder and not _is_text(item.path):
                skipped.append(item.path)
                yield False, "", item.size
            else:
                yield from _iter_text_file(item.path, hasher)
        except OSError as err:  # unreadable input (permissions, I/O error, vanished midway)
            reason = err.strerror or (str(err).splitlines() or [type(err).__name__])[0]
            raise DataError(f"cannot read {item.path}: {reason}") from None


def inputs_fingerprint(files: list[InputFile]) -> list[list]:
    """Cheap identity of the inputs for cache keys: resolved path, size and mtime of every file."""
    out = []
    for f in files:
        st = f.path.stat()
        out.append([str(f.path.resolve()), st.st_size, st.st_mtime_ns])
    return out
