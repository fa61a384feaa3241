"""Model configs of model sources without loading their weights (for compile-time plans)."""

from __future__ import annotations

from pathlib import Path

from attnlab.config.base import validate_section
from attnlab.config.model import ModelConfig
from attnlab.errors import ConfigError


def source_model_config(path: str | Path, where: str = "teacher") -> ModelConfig:
    """The ModelConfig of a Hugging Face Llama folder, a llama2.c ``.bin``, an attnlab run folder
    or an attnlab ``.pt`` checkpoint."""
    path = Path(path)
    if path.is_dir() and (path / "resolved_config.json").is_file():
        from attnlab.runfolder import read_json_object

        resolved = path / "resolved_config.json"
        model = read_json_object(resolved, "resolved_config.json").get("model")
        if not isinstance(model, dict):
            raise ConfigError(where, f"{resolved} has no model section (a mapping)", type(model).__name__)
        return validate_section(ModelConfig, model, where)
    if path.is_dir() and (path / "config.json").is_file():
        from attnlab.convert.hf import hf_config_to_model_config, read_hf_config

        return hf_config_to_model_config(read_hf_config(path), str(path / "config.json"))
    if path.is_file() and path.suffix == ".bin":
        from attnlab.convert.llama2c import llama2c_model_config, read_header

        return llama2c_model_config(read_header(path))
    if path.is_file() and path.suffix == ".pt":
        from attnlab.train.checkpoint import read_checkpoint

        payload = read_checkpoint(path, required=("format", "version", "model_config", "model"))
        return validate_section(ModelConfig, payload["model_config"], where)
    raise ConfigError(where, "not a model source (Hugging Face Llama folder, llama2.c .bin, attnlab run "
                      "folder or .pt checkpoint)", str(path))
