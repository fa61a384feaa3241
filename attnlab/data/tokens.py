"""Token files and train/val splits: memory-mapped, validated, never loaded whole into RAM.

``load_splits`` turns a :class:`~attnlab.config.data.DataConfig` into a :class:`TokenSplits`:

- ``tokens``: memory-map a ``.npy`` (uint8/uint16/uint32/int32/int64) or a raw ``.bin`` (read as
  ``bin_dtype``); a ``<name>.json`` sidecar from :func:`~attnlab.data.prepare.prepare`, when
  present, names the tokenizer and is checked against the file;
- ``text``: a text file, a folder or a ``.jsonl`` file, tokenized once into ``cache_dir``;
- ``embedded``: the interpreter's standard library (:mod:`attnlab.data.corpus`), likewise cached;
- ``retrieval_mix``: the text at ``path`` (tokenized and cached as for ``text``) mixed with
  synthetic retrieval tasks into fixed-length documents (:mod:`attnlab.data.retrieval_mix`),
  cached; the splits are its train and held-out documents and ``align`` their length.

The cache key hashes the inputs (resolved path, size, mtime of every file), the tokenizer type,
``max_tokens`` and ``text_field``; a re-run with the same inputs reuses the token file.
``max_tokens`` also caps a ``tokens`` source (its first ``max_tokens`` tokens).

The last ``val_fraction`` of the tokens (at least one) is the validation split; the rest is train
(``retrieval_mix``: the separately built held-out documents).
Token ids are checked against the model's vocabulary with a chunked, vectorised scan.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from attnlab.config.data import DataConfig, TokenizerConfig
from attnlab.data.corpus import embedded_corpus_files, embedded_description, stdlib_root
from attnlab.data.prepare import SIDECAR_FORMAT, ProgressFn, prepare_files, sidecar_path
from attnlab.data.retrieval_mix import mix_file
from attnlab.data.sources import InputFile, collect_inputs, inputs_fingerprint
from attnlab.data.tokenizers import VOCAB_SIZES, build_tokenizer
from attnlab.errors import DataError

NPY_DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")
_SCAN_CHUNK = 1 << 24  # elements per step of the vocabulary / checksum scan


@dataclass(frozen=True)
class TokenSplits:
    train: np.ndarray  # 1-D integer array (np.memmap when read from a file)
    val: np.ndarray  # the last val_fraction of the tokens, never trained on
    vocab_size: int  # of the tokenizer that produced the tokens (max id + 1 when unknown)
    tokenizer: TokenizerConfig | None  # None for a raw token file without sidecar
    description: str  # human-readable provenance
    path: Path | None = None  # the token file behind the splits
    align: int = 1  # > 1: fixed-length documents of this many tokens; windows start at their starts


def open_tokens(path: Path, bin_dtype: str = "uint16") -> np.ndarray:
    """Memory-map a 1-D token file (``.npy`` or raw ``.bin``), read-only."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"token file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _open_npy(path)
    if suffix == ".bin":
        dtype = np.dtype(bin_dtype)
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise DataError(f"{path}: size {size} bytes is not a multiple of {dtype.name} ({dtype.itemsize} bytes)")
        if size == 0:
            raise DataError(f"token file {path} is empty")
        return np.memmap(path, dtype=dtype, mode="r")
    raise DataError(f"token file {path} must end in .npy or .bin")


def _open_npy(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _fortran, dtype = read_header(f)
            offset = f.tell()
    except OSError as err:
        raise DataError(f"cannot read token file {path}: {err.strerror or err}") from None
    except Exception as err:  # noqa: BLE001 -- numpy's header parser raises ValueError, SyntaxError, TokenError ...
        reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise DataError(f"{path} is not a valid .npy file ({reason})") from None
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise DataError(f"{path} is not a valid .npy file (shape {shape!r})")
    if len(shape) != 1:
        raise DataError(f"{path} holds an array of shape {shape}; token files are 1-D")
    if dtype.name not in NPY_DTYPES:
        raise DataError(f"{path} has dtype {dtype}; token files are {'/'.join(NPY_DTYPES)}")
    if shape[0] == 0:
        raise DataError(f"token file {path} is empty")
    expected = offset + shape[0] * dtype.itemsize
    if path.stat().st_size < expected:
        raise DataError(f"{path} is truncated: {path.stat().st_size} bytes, header promises {expected}")
    return np.load(path, mmap_mode="r")


def read_sidecar(token_file: Path) -> dict | None:
    """The JSON sidecar written by ``prepare`` next to ``token_file``, or None when absent."""
    side = sidecar_path(token_file)
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"sidecar {side} is not valid JSON ({err})") from None
    except RecursionError:
        raise DataError(f"sidecar {side} is not valid JSON (nested too deeply)") from None
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise DataError(f"sidecar {side} is unreadable ({reason})") from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise DataError(f"sidecar {side} is not an attnlab token sidecar (format {SIDECAR_FORMAT})")
    return data


def scan_tokens(tokens: np.ndarray, chunk: int = _SCAN_CHUNK) -> tuple[int, int, str]:
    """(min id, max id, sha256 of the raw token bytes) in chunks: one pass over the memmap."""
    lo, hi = None, None
    sha = hashlib.sha256()
    for start in range(0, len(tokens), chunk):
        part = np.ascontiguousarray(tokens[start:start + chunk])
        cmin, cmax = int(part.min()), int(part.max())
        lo = cmin if lo is None else min(lo, cmin)
        hi = cmax if hi is None else max(hi, cmax)
        sha.update(memoryview(part).cast("B"))
    assert lo is not None and hi is not None, "scan of an empty token array"
    return lo, hi, sha.hexdigest()


def split_tokens(tokens: np.ndarray, val_fraction: float, where: str = "tokens") -> tuple[np.ndarray, np.ndarray]:
    """(train, val): val is the last ``val_fraction`` of ``tokens`` (at least one token)."""
    n = len(tokens)
    num_val = max(1, int(n * val_fraction))
    if n - num_val < 1:
        raise DataError(f"{where} has only {n} tokens: too few to split into non-empty train and val")
    return tokens[: n - num_val], tokens[n - num_val:]


def _format_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e4)):
        if n >= scale:
            scale = 1e3 if unit == "K" else scale
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _tokenizer_for_file(cfg: DataConfig, path: Path, sidecar: dict | None) -> TokenizerConfig | None:
    """Tokenizer of a ``tokens`` source: the sidecar's, checked against an explicit config."""
    explicit = "tokenizer" in cfg.model_fields_set
    if sidecar is None:
        return cfg.tokenizer if explicit else None
    side = sidecar_path(path)
    try:
        recorded = TokenizerConfig.model_validate(sidecar.get("tokenizer"))
    except ValidationError:
        raise DataError(f"sidecar {side}: invalid tokenizer entry {sidecar.get('tokenizer')!r}") from None
    if sidecar.get("vocab_size") != VOCAB_SIZES[recorded.type]:
        raise DataError(f"sidecar {side}: vocab_size {sidecar.get('vocab_size')} does not match "
                        f"tokenizer {recorded.type} ({VOCAB_SIZES[recorded.type]})")
    if explicit and cfg.tokenizer.type != recorded.type:
        raise DataError(f"{path} was tokenized with {recorded.type} (sidecar {side}) but "
                        f"data.tokenizer.type is {cfg.tokenizer.type}")
    return cfg.tokenizer if explicit else recorded


def _prepared_file(kind: str, files: list[InputFile], labels: list[str], cfg: DataConfig,
                   cache_dir: Path, description: str, progress: ProgressFn | None) -> Path:
    """Tokenize ``files`` into ``cache_dir`` unless an up-to-date cached token file exists."""
    key_src = {
        "format": SIDECAR_FORMAT, "kind": kind, "tokenizer": cfg.tokenizer.type,
        "max_tokens": cfg.max_tokens, "text_field": cfg.text_field, "files": inputs_fingerprint(files),
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()
    output = Path(cache_dir).expanduser() / f"{kind}-{cfg.tokenizer.type}-{key[:16]}.npy"
    if output.is_file():
        try:
            cached = read_sidecar(output)
        except DataError:
            cached = None  # a damaged cache entry is rebuilt, not fatal
        if cached is not None and cached.get("cache_key") == key:
            return output
    # val_fraction is not part of the key: the split happens at load time, so it is not recorded.
    prepare_files(files, output, cfg.tokenizer, cfg.text_field, cfg.max_tokens, None,
                  progress=progress, description=description, inputs_label=labels,
                  extra={"cache_key": key})
    return output


def load_splits(cfg: DataConfig, model_vocab_size: int, cache_dir: Path, *,
                progress: ProgressFn | None = None) -> TokenSplits:
    """Resolve ``cfg`` to validated train/val token arrays (see the module docstring).

    ``cfg.cache_dir``, when set, overrides ``cache_dir``. ``progress(done_bytes, total_bytes)``
    reports tokenization when a ``text``/``embedded`` source is not cached yet.
    """
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path(cache_dir)
    capped, split_at, align = False, None, 1
    if cfg.source == "tokens":
        path = Path(cfg.path).expanduser()
        tokens = open_tokens(path, cfg.bin_dtype)
        sidecar = read_sidecar(path)
        tok_cfg = _tokenizer_for_file(cfg, path, sidecar)
        if sidecar is not None and sidecar.get("num_tokens") != len(tokens):
            raise DataError(f"{path} has {len(tokens)} tokens but its sidecar {sidecar_path(path)} "
                            f"records {sidecar.get('num_tokens')}")
        if cfg.max_tokens is not None and cfg.max_tokens < len(tokens):
            tokens, capped = tokens[: cfg.max_tokens], True
        label = f"tokens:{path}"
    else:
        if cfg.source in ("text", "retrieval_mix"):
            source = Path(cfg.path).expanduser()
            files = collect_inputs([source])
            label = f"text:{source}"
            path = _prepared_file("text", files, [str(source.resolve())], cfg, cache, label, progress)
            if cfg.source == "retrieval_mix":
                mix = cfg.retrieval_mix
                path = mix_file(build_tokenizer(cfg.tokenizer, key="data.tokenizer.path"), cfg.tokenizer, mix,
                                open_tokens(path), cfg.val_fraction, cache, str(source))
                align, split_at = mix.length + 1, (mix.length + 1) * mix.documents
        else:
            found = embedded_corpus_files()
            if not found:
                raise DataError(f"empty corpus: no .py files under {stdlib_root()} (use source: text)")
            files = [InputFile(p, "text", True, p.stat().st_size) for p in found]
            label = embedded_description()
            path = _prepared_file("embedded", files, [str(stdlib_root())], cfg, cache, label, progress)
        tokens = open_tokens(path)
        sidecar = read_sidecar(path)
        assert sidecar is not None, f"prepared {path} without sidecar"
        tok_cfg = cfg.tokenizer
        if cfg.source == "embedded":
            label = embedded_description(sidecar["num_documents"])
        if cfg.source == "retrieval_mix":
            label = sidecar["description"]

    lo, hi, sha = scan_tokens(tokens)
    if sidecar is not None and not capped and sidecar.get("tokens_sha256") not in (None, sha):
        raise DataError(f"{path} does not match the checksum in its sidecar {sidecar_path(path)}: "
                        "the file changed after it was prepared")
    if lo < 0:
        raise DataError(f"negative token id {lo} in {path}")
    vocab = VOCAB_SIZES[tok_cfg.type] if tok_cfg is not None else hi + 1
    if hi >= model_vocab_size:
        which = f"tokenizer {tok_cfg.type} has {vocab}" if tok_cfg is not None else "no tokenizer sidecar"
        raise DataError(f"token id {hi} in {path} reaches the model's vocab_size {model_vocab_size} ({which})")
    if hi >= vocab:
        raise DataError(f"token id {hi} in {path} is outside tokenizer {tok_cfg.type}'s vocabulary ({vocab})")

    if split_at is None:
        train, val = split_tokens(tokens, cfg.val_fraction, where=str(path))
    else:  # retrieval_mix: train documents, then the held-out ones
        if len(tokens) != split_at + align * cfg.retrieval_mix.heldout_documents:
            raise DataError(f"{path} has {len(tokens)} tokens, not the {split_at} + {len(tokens) - split_at} "
                            "its documents need")
        train, val = tokens[:split_at], tokens[split_at:]
    parts = [f"{_format_count(len(tokens))} tokens"]
    if tok_cfg is not None:
        parts.append(tok_cfg.type)
    parts.append(f"sha256 {sha[:12]}")
    if cfg.source != "tokens" or sidecar is None:
        description = f"{label} ({', '.join(parts)})"
    else:
        description = f"{label} ({', '.join(parts)}; from {sidecar.get('description', '?')})"
    return TokenSplits(train=train, val=val, vocab_size=vocab, tokenizer=tok_cfg,
                       description=description, path=path, align=align)


class TrainBatches:
    """Random training windows, a pure function of (seed, step, micro, rank).

    Rank ``r`` of ``world_size`` reads only its contiguous shard ``r`` of ``tokens`` (equal
    lengths; the remainder at the end is unused). Each batch holds ``batch_size`` windows of
    ``seq_len + 1`` tokens at uniformly random offsets inside the shard, drawn from a generator
    seeded with a hash of (seed, step, micro, rank): resuming at step k draws exactly what an
    uninterrupted run would have drawn. Only the windows are read from the memmap.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1, align: int = 1):
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        if align < 1:
            raise ValueError(f"align must be >= 1, got {align}")
        self.align = align  # window starts are multiples of align (documents of fixed length)
        self.shard_len = len(tokens) // world_size // align * align
        self.shard_start = rank * self.shard_len
        if self.shard_len < seq_len + 1:
            raise DataError(
                f"train shard {rank} of {world_size} has {self.shard_len} tokens "
                f"({len(tokens)} train tokens in all), fewer than seq_len + 1 = {seq_len + 1}"
            )
        self.shard = tokens[self.shard_start: self.shard_start + self.shard_len]
        self._window = np.arange(seq_len + 1, dtype=np.int64)

    def offsets(self, step: int, micro: int) -> np.ndarray:
        """Window start offsets (inside the shard) of batch (step, micro): int64 [B]."""
        if step < 0 or micro < 0:
            raise ValueError(f"step and micro must be >= 0, got {step}, {micro}")
        entropy = [self.seed & 0xFFFFFFFFFFFFFFFF, step, micro, self.rank, 0x617474]  # tag: "att"
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
        if self.align == 1:
            return rng.integers(0, self.shard_len - self.seq_len, size=self.batch_size, dtype=np.int64)
        slots = (self.shard_len - self.seq_len - 1) // self.align + 1
        return rng.integers(0, slots, size=self.batch_size, dtype=np.int64) * self.align

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 [B, T]; y is x shifted left by one token."""
        index = self.offsets(step, micro)[:, None] + self._window  # (B, T+1)
        windows = torch.from_numpy(np.asarray(self.shard[index], dtype=np.int64))  # (B, T+1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                 num_batches: int, align: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of (x, y) int64 [B, T] batches over ``tokens`` (identical on every call).

    Windows of ``seq_len + 1`` tokens sit at evenly spaced offsets spanning the whole split; their
    targets never overlap. ``align`` > 1 rounds each start down to a multiple of it (for corpora
    of fixed-length documents, whose windows should not straddle two). ``num_batches`` is capped by what fits; when fewer than ``batch_size``
    windows fit, the result is a single smaller batch.
    """
    if batch_size < 1 or seq_len < 1 or num_batches < 1:
        raise ValueError(f"batch_size, seq_len and num_batches must be positive, "
                         f"got {batch_size}, {seq_len}, {num_batches}")
    n = len(tokens)
    if n < seq_len + 1:
        raise DataError(f"validation split has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    fit = (n - 1) // seq_len  # windows whose targets do not overlap
    if fit >= batch_size:
        count, per_batch = min(num_batches, fit // batch_size) * batch_size, batch_size
    else:
        count, per_batch = fit, fit
    span = n - seq_len - 1
    starts = np.arange(count, dtype=np.int64) * span // max(count - 1, 1)  # spacing >= seq_len
    if align > 1:  # documents of fixed length: start each window at a document start
        starts = np.unique(starts // align * align)
    index = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)  # (N, T+1)
    windows = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))
    return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows.split(per_batch)]
