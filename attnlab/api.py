"""Public Python API: ``build_model(config)`` and ``load(run_dir_or_checkpoint)``."""

from __future__ import annotations

import json
from pathlib import Path

from attnlab.config.base import validate_section
from attnlab.config.data import TokenizerConfig
from attnlab.config.model import ModelConfig
from attnlab.errors import AttnlabError, CheckpointError
from attnlab.model.decoder import DecoderLM
from attnlab.model.decoder import build_model as _build_from_config


def build_model(config: ModelConfig | dict) -> DecoderLM:
    """A freshly initialized model from a ``ModelConfig`` or a plain dict (validated first)."""
    if not isinstance(config, ModelConfig):
        config = validate_section(ModelConfig, config, "model")
    return _build_from_config(config)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's ``best.pt`` (else ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: run folder holds no best.pt or last.pt")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    return path


def load(path: str | Path, *, map_location: str = "cpu") -> DecoderLM:
    """Load a model (eval mode) from a run folder, a ``.pt`` checkpoint, a Hugging Face Llama
    folder (``config.json`` + safetensors; see ``attnlab.convert.hf``) or a llama2.c ``.bin``."""
    from attnlab.train.checkpoint import read_checkpoint  # local: keep `import attnlab` light

    folder = Path(path)
    if (folder.is_dir() and (folder / "config.json").is_file()
            and not any((folder / name).is_file() for name in ("best.pt", "last.pt"))):
        from attnlab.convert.hf import load_hf_llama  # raises naming model_type if not Llama-family

        return load_hf_llama(folder).to(map_location)
    if folder.is_file() and folder.suffix == ".bin":
        from attnlab.convert.llama2c import load_llama2c

        return load_llama2c(folder).to(map_location)
    ckpt = resolve_checkpoint(path)
    payload = read_checkpoint(ckpt, required=("format", "version", "model_config", "model"),
                              map_location=map_location)
    try:
        cfg = validate_section(ModelConfig, payload["model_config"], "model_config")
    except AttnlabError as err:
        raise CheckpointError(f"checkpoint {ckpt}: invalid model config: {err}") from None
    model = _build_from_config(cfg)
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {ckpt}: weights do not fit the model config ({first})") from None
    return model.eval()


def run_tokenizer(path: str | Path) -> TokenizerConfig | None:
    """The tokenizer a run trained with, from its ``resolved_config.json`` (None if unknown)."""
    cfg = _resolved_config(path)
    if cfg is None:
        return None
    data = _section(cfg, "data", _resolved_path(path))
    if "tokenizer" not in data:
        return None
    return validate_section(TokenizerConfig, data["tokenizer"], "data.tokenizer")


def _resolved_path(path: str | Path) -> Path:
    path = Path(path)
    return (path if path.is_dir() else path.parent) / "resolved_config.json"


def read_json_object(path: Path, what: str) -> dict:
    """``path`` parsed as a JSON object; a one-line ``CheckpointError`` naming the file when it is
    unreadable, not JSON or not an object."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as err:
        reason = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: unreadable {what} ({reason})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def _section(cfg: dict, key: str, where: Path) -> dict:
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: {key} must be a mapping, got {type(value).__name__}")
    return value


def _resolved_config(path: str | Path) -> dict | None:
    resolved = _resolved_path(path)
    return read_json_object(resolved, "resolved_config.json") if resolved.is_file() else None


def run_cache_policy(path: str | Path) -> str | None:
    """The run's manifest ``cache`` section as a ``--cache-policy`` string (None if unset)."""
    from attnlab.config.cache import CacheConfig

    section = _section(_resolved_config(path) or {}, "cache", _resolved_path(path))
    return validate_section(CacheConfig, section, "cache").policy_text() or None


def run_heldout_tokens(path: str | Path, *, with_align: bool = False):
    """The held-out split a run was evaluated on (from its ``resolved_config.json``; for data
    sampled from a teacher, from the token file the run recorded in ``heldout.json``). With
    ``with_align``: ``(tokens, align)`` where align > 1 means fixed-length documents."""
    from attnlab.config.data import DataConfig
    from attnlab.data import load_splits
    from attnlab.run import data_cache_dir

    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    cfg = _resolved_config(run_dir)
    if cfg is None:
        raise AttnlabError(f"{run_dir}: no resolved_config.json, so the run's data is unknown")
    pointer = run_dir / "heldout.json"
    if pointer.is_file():  # recorded by runs whose data was prepared at run time
        return _heldout_from_pointer(pointer, with_align)
    data = validate_section(DataConfig, _section(cfg, "data", _resolved_path(run_dir)), "data")
    model = _section(cfg, "model", _resolved_path(run_dir))
    vocab = model.get("vocab_size")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab <= 0:
        raise CheckpointError(f"{_resolved_path(run_dir)}: model.vocab_size must be a positive integer "
                              f"(got {vocab!r})")
    tokens = load_splits(data, vocab, data_cache_dir(data, run_dir)).val
    return (tokens, 1) if with_align else tokens


def _heldout_from_pointer(pointer: Path, with_align: bool):
    """The held-out tokens ``heldout.json`` points at: ``{"path", "val_start", "align"}``, checked."""
    from attnlab.data.tokens import open_tokens
    from attnlab.errors import DataError

    info = read_json_object(pointer, "heldout.json")
    path, start, align = info.get("path"), info.get("val_start"), info.get("align", 1)
    if not isinstance(path, str) or not path:
        raise DataError(f"{pointer}: path must be a token file path (got {path!r})")
    for key, value, low in (("val_start", start, 0), ("align", align, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DataError(f"{pointer}: {key} must be an integer >= {low} (got {value!r})")
    if not path.endswith(".npy"):
        raise DataError(f"{pointer}: path must name a .npy token file (got {path!r})")
    tokens = open_tokens(Path(path))  # one-line DataError for missing/object/2-D/truncated arrays
    if start > len(tokens):
        raise DataError(f"{pointer}: val_start={start} is past the end of {path} ({len(tokens)} tokens)")
    tokens = tokens[start:]
    return (tokens, align) if with_align else tokens
