"""Public Python API: ``build_model(config)`` and ``load(run_dir_or_checkpoint)``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

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
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    resolved = run_dir / "resolved_config.json"
    if not resolved.is_file():
        return None
    data = json.loads(resolved.read_text()).get("data", {})
    if "tokenizer" not in data:
        return None
    return TokenizerConfig.model_validate(data["tokenizer"])


def _resolved_config(path: str | Path) -> dict | None:
    path = Path(path)
    resolved = (path if path.is_dir() else path.parent) / "resolved_config.json"
    return json.loads(resolved.read_text()) if resolved.is_file() else None


def run_cache_policy(path: str | Path) -> str | None:
    """The run's manifest ``cache`` section as a ``--cache-policy`` string (None if unset)."""
    from attnlab.config.cache import CacheConfig

    section = (_resolved_config(path) or {}).get("cache") or {}
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
        info = json.loads(pointer.read_text())
        tokens = np.load(info["path"], mmap_mode="r")[info["val_start"]:]
        return (tokens, info["align"]) if with_align else tokens
    data = validate_section(DataConfig, cfg["data"], "data")
    tokens = load_splits(data, cfg["model"]["vocab_size"], data_cache_dir(data, run_dir)).val
    return (tokens, 1) if with_align else tokens
