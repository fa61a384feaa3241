"""Tokenizers: ``byte`` (UTF-8 bytes, vocab 256) and ``gpt2`` (tiktoken's GPT-2 BPE, vocab 50257).

Every tokenizer satisfies the small :class:`Tokenizer` protocol. ``gpt2`` loads offline from a local
``.tiktoken`` file when ``TokenizerConfig.path`` is set (e.g. ``../shared/data/tokenizers/gpt2.tiktoken``);
without a path it asks tiktoken, which reads its cache or downloads, and a failure becomes a
one-line :class:`~attnlab.errors.DataError` that says how to work offline, naming the setting to
use (``key``: ``tokenizer.path`` in a manifest, ``--tokenizer-path`` on ``attnlab prepare``).

Text is encoded as plain text: ``"<|endoftext|>"`` inside a document is *not* the special token.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from attnlab.config.data import TokenizerConfig
from attnlab.errors import DataError

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257
BYTE_VOCAB_SIZE = 256
OFFLINE_HINT = "../shared/data/tokenizers/gpt2.tiktoken"

#: Vocabulary size per tokenizer type, known without loading anything.
VOCAB_SIZES: dict[str, int] = {"byte": BYTE_VOCAB_SIZE, "gpt2": GPT2_VOCAB_SIZE}


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of attnlab needs from a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int | None  # document separator token, when the vocabulary has one

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def tokenizer_vocab_size(cfg: TokenizerConfig) -> int:
    """Vocabulary size of ``cfg`` without building the tokenizer."""
    return VOCAB_SIZES[cfg.type]


class ByteTokenizer:
    """UTF-8 bytes; ids 0..255; no end-of-text token. Decoding replaces invalid byte sequences."""

    name = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    eot_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path for bulk tokenization: the ids as a uint8 array (no Python int list)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class TiktokenTokenizer:
    """A ``tiktoken.Encoding`` behind the :class:`Tokenizer` protocol (GPT-2 BPE here)."""

    def __init__(self, encoding, name: str, eot_id: int | None):
        self.encoding = encoding
        self.name = name
        self.vocab_size = int(encoding.n_vocab)
        self.eot_id = eot_id

    def encode(self, text: str) -> list[int]:
        # disallowed_special=() with no allowed specials: "<|endoftext|>" in text is plain text.
        return self.encoding.encode(text, disallowed_special=())

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode several texts on tiktoken's thread pool (the Rust core releases the GIL)."""
        return self.encoding.encode_ordinary_batch(texts)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode([int(i) for i in ids], errors="replace")

    def __repr__(self) -> str:
        return f"TiktokenTokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


def _clip(text: str, limit: int = 160) -> str:
    """The first line of ``text``, cut at a word boundary to at most ``limit`` characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    if len(line) <= limit:
        return line
    cut = line[:limit - 3]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:") + "..."


def _gpt2_from_file(path: str, key: str = "tokenizer.path"):
    import tiktoken
    import tiktoken.load

    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"tokenizer file not found: {file} ({key} of type gpt2)")
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(str(file))
    except Exception as err:  # malformed lines, undecodable base64, ...
        raise DataError(f"cannot read GPT-2 BPE ranks from {file}: {type(err).__name__}: {err}") from None
    if len(ranks) != GPT2_EOT_ID or max(ranks.values(), default=-1) != GPT2_EOT_ID - 1:
        raise DataError(
            f"{file} is not the GPT-2 BPE file: it has {len(ranks)} ranks, GPT-2 has {GPT2_EOT_ID}"
        )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={GPT2_EOT: GPT2_EOT_ID},
    )


def _gpt2_from_tiktoken(key: str = "tokenizer.path"):
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # requests.ConnectionError, timeouts, blocked downloads, ...
        reason = f"{type(err).__name__}: {_clip(str(err))}" if str(err).strip() else type(err).__name__
        setting = f"{key} FILE" if key.startswith("-") else f"{key} to a local .tiktoken file"
        raise DataError(
            f"cannot load the GPT-2 tokenizer through tiktoken (no network or cache? {reason}); "
            f"set {setting}, e.g. {OFFLINE_HINT}"
        ) from None


@functools.lru_cache(maxsize=8)
def _build(kind: str, path: str | None, key: str = "tokenizer.path") -> Tokenizer:
    if kind == "byte":
        if path is not None:
            raise DataError(f"{key} is only used by type gpt2, not byte (got {path!r})")
        return ByteTokenizer()
    if kind == "gpt2":
        encoding = _gpt2_from_file(path, key) if path is not None else _gpt2_from_tiktoken(key)
        tok = TiktokenTokenizer(encoding, name="gpt2", eot_id=GPT2_EOT_ID)
        if tok.vocab_size != GPT2_VOCAB_SIZE or tok.encode("Hello world") != [15496, 995]:
            raise DataError(f"tokenizer from {path or 'tiktoken'} does not behave like GPT-2's BPE")
        return tok
    raise AssertionError(f"unhandled tokenizer type {kind!r}")  # the config's Literal forbids this


def build_tokenizer(cfg: TokenizerConfig, *, key: str = "tokenizer.path") -> Tokenizer:
    """Build (and memoize per process) the tokenizer described by ``cfg``; errors name the path
    setting as ``key`` (``--tokenizer-path`` from the CLI)."""
    return _build(cfg.type, cfg.path, key)


def encode_many(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Encode ``texts`` to integer arrays, using a tokenizer's bulk paths when it has them."""
    if isinstance(tok, ByteTokenizer):
        return [tok.encode_array(t) for t in texts]
    batch = getattr(tok, "encode_batch", None)
    ids = batch(texts) if batch is not None and len(texts) > 1 else [tok.encode(t) for t in texts]
    return [np.asarray(x, dtype=np.int64) for x in ids]
