"""Public Python API: ``build_model(config)`` and ``load(model source)``; the ``run_*`` readers
are shorthands for ``attnlab.runfolder.RunFolder`` (which owns what a run folder contains)."""

from __future__ import annotations

from pathlib import Path

from attnlab.config.base import validate_section
from attnlab.config.data import TokenizerConfig
from attnlab.config.model import ModelConfig
from attnlab.model.decoder import DecoderLM
from attnlab.model.decoder import build_model as _build_from_config
from attnlab.runfolder import RunFolder, load_checkpoint_model, read_json_object, resolve_checkpoint

__all__ = ["build_model", "load", "resolve_checkpoint", "read_json_object", "run_tokenizer",
           "run_cache_policy", "run_heldout_tokens"]


def build_model(config: ModelConfig | dict) -> DecoderLM:
    """A freshly initialized model from a ``ModelConfig`` or a plain dict (validated first)."""
    if not isinstance(config, ModelConfig):
        config = validate_section(ModelConfig, config, "model")
    return _build_from_config(config)


def load(path: str | Path, *, map_location: str = "cpu") -> DecoderLM:
    """Load a model (eval mode) from a run folder, a ``.pt`` checkpoint, a Hugging Face Llama
    folder (``config.json`` + safetensors; see ``attnlab.convert.hf``) or a llama2.c ``.bin``."""
    folder = Path(path)
    if folder.is_dir() and (folder / "config.json").is_file() and not RunFolder(folder).has_checkpoint():
        from attnlab.convert.hf import load_hf_llama  # local: imported on use (import cost)

        return load_hf_llama(folder).to(map_location)  # raises naming model_type if not Llama-family
    if folder.is_file() and folder.suffix == ".bin":
        from attnlab.convert.llama2c import load_llama2c

        return load_llama2c(folder).to(map_location)
    return load_checkpoint_model(resolve_checkpoint(path), map_location=map_location)


def run_tokenizer(path: str | Path) -> TokenizerConfig | None:
    """The tokenizer a run trained with, from its ``resolved_config.json`` (None if unknown)."""
    return RunFolder.of(path).tokenizer_config()


def run_cache_policy(path: str | Path) -> str | None:
    """The run's manifest ``cache`` section as a ``--cache-policy`` string (None if unset)."""
    return RunFolder.of(path).cache_policy()


def run_heldout_tokens(path: str | Path, *, with_align: bool = False):
    """The held-out split a run was evaluated on (see ``RunFolder.heldout_tokens``)."""
    return RunFolder.of(path).heldout_tokens(with_align=with_align)
