"""Zero-training Butterfly retrofit of a loaded model: selected standard-attention layers become
``butterfly`` layers with the same weights (``attnlab.nn.attention.butterfly``), nothing trained.

``retrofit_butterfly(model, layers=..., window=..., block_size=..., partner=..., stage_by=...)``
returns a new ``DecoderLM`` whose config carries one ``layer_overrides`` entry per swapped
layer, with the source's state dict loaded strictly (a butterfly layer's parameters are a
standard layer's). ``layers``: ``"all"``, ``"every:K"`` (layers 0, K, 2K, ...) or a list of
indices. ``stage_by``: ``layer`` (stage = layer index mod num_stages, the seed's rule) or
``swapped`` (stage = index among the swapped layers mod num_stages, written into each layer's
config). Works for anything ``attnlab.api.load`` reads: run folders, checkpoints, Hugging Face
Llama folders, llama2.c files.
"""

from __future__ import annotations

from collections.abc import Sequence

from attnlab.config.attention import StandardAttentionConfig
from attnlab.config.base import validate_section
from attnlab.config.model import LayerOverride, ModelConfig
from attnlab.errors import ConfigError
from attnlab.nn.attention.butterfly import PARTNER_RULES, ButterflyAttentionConfig, default_num_stages

STAGE_RULES = ("layer", "swapped")


def parse_layers(text: str | Sequence[int], num_layers: int) -> list[int]:
    """``all`` | ``every:K`` | ``0,3,5`` (or a list of ints) -> sorted layer indices."""
    if not isinstance(text, str):
        chosen = list(text)
    elif text == "all":
        chosen = list(range(num_layers))
    elif text.startswith("every:"):
        try:
            every = int(text.removeprefix("every:"))
        except ValueError:
            raise ConfigError("layers", "every:K needs an integer K >= 1", text) from None
        if every < 1:
            raise ConfigError("layers", "every:K needs an integer K >= 1", text)
        chosen = list(range(0, num_layers, every))
    else:
        try:
            chosen = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ConfigError("layers", "expected all, every:K or a comma-separated list of layer indices",
                              text) from None
    bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers]
    if bad or not chosen:
        raise ConfigError("layers", f"layer indices must lie in 0..{num_layers - 1}", text)
    return sorted(set(chosen))


def _check_size(value, key: str, context: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, "must be a positive integer", value)
    if value > context:
        raise ConfigError(key, f"must not exceed the model's context ({context})", value)
    return value


def retrofit_config(cfg: ModelConfig, *, layers: str | Sequence[int] = "all", window: int = 64,
                    block_size: int = 128, partner: str = "causal_shift", stage_by: str = "layer",
                    num_stages: int | None = None) -> ModelConfig:
    """``cfg`` with the selected standard-attention layers turned into butterfly layers."""
    if cfg.topology is not None:
        raise ConfigError("model", "butterfly retrofit works on num_layers stacks; this model has a topology tree",
                          show_value=False)
    context = cfg.block_size
    window, block_size = _check_size(window, "window", context), _check_size(block_size, "block_size", context)
    if partner not in PARTNER_RULES:
        raise ConfigError("partner", f"unknown partner rule (rules: {', '.join(PARTNER_RULES)})", partner)
    if stage_by not in STAGE_RULES:
        raise ConfigError("stage_by", f"expected one of {', '.join(STAGE_RULES)}", stage_by)
    stages = num_stages if num_stages is not None else default_num_stages(context, block_size)
    specs = cfg.attention_specs()
    chosen = parse_layers(layers, len(specs))
    supported = [i for i, s in enumerate(specs) if type(s) is StandardAttentionConfig]
    if not supported:
        kinds = sorted({s.type for s in specs})
        raise ConfigError("model", f"no attention layer of a kind butterfly retrofits (standard); this model has "
                          f"{', '.join(kinds)}", show_value=False)
    wrong = [i for i in chosen if i not in supported]
    if wrong:
        raise ConfigError("layers", f"layer(s) {wrong} are not standard attention ({specs[wrong[0]].type}); "
                          "butterfly retrofits standard layers", show_value=False)
    overrides = list(cfg.layer_overrides)
    for rank, i in enumerate(chosen):
        base = specs[i].model_dump(exclude={"type"})
        spec = ButterflyAttentionConfig(**base, window=window, block_size=block_size, partner=partner,
                                        num_stages=stages, stage=rank % stages if stage_by == "swapped" else None)
        overrides.append(LayerOverride(layers=[i], attention=spec))
    data = cfg.model_dump(mode="json")
    data["layer_overrides"] = [o.model_dump(mode="json") for o in overrides]
    return validate_section(ModelConfig, data, "model")


def retrofit_butterfly(model, **options):
    """A new model: ``model`` with butterfly layers (``retrofit_config`` options), same weights,
    same dtype and device, eval mode."""
    from attnlab.model.decoder import build_model  # local: convert sits above model, import on use

    cfg = retrofit_config(model.config, **options)
    param = next(model.parameters())
    new = build_model(cfg).to(device=param.device, dtype=param.dtype)
    new.load_state_dict(model.state_dict(), strict=True)
    return new.eval()


__all__ = ["STAGE_RULES", "parse_layers", "retrofit_butterfly", "retrofit_config"]
