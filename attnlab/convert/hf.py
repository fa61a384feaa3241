"""Hugging Face checkpoints <-> attnlab models.

``load_hf_llama(folder)`` reads a Llama-family ``config.json`` plus ``model.safetensors`` (or the
shards a ``model.safetensors.index.json`` lists) with the ``safetensors`` package; ``transformers``
is not needed. ``export_hf(model, out_dir)`` writes the same layout as a ``LlamaForCausalLM``
(standard/bottleneck attention) or, for DBA, a partial-rotary ``Phi3ForCausalLM``
(``attnlab.convert.hf_phi3``), which ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)``
loads.

Both sides use the half-split RoPE layout, so q/k weights pass through unchanged; a model with
``rope.style: interleaved`` (e.g. imported from llama2.c) has its q/k rows permuted to half-split
on export (see ``attnlab.convert.common``), and loads back from that folder as a half-split model
that computes the same logits.

Hugging Face names (``q_proj``, ``num_key_value_heads`` ...) stay inside this module.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from pathlib import Path

import torch

from attnlab.config.attention import (
    BottleneckAttentionConfig,
    DecoupledAttentionConfig,
    StandardAttentionConfig,
    attention_dims,
)
from attnlab.config.base import validate_section
from attnlab.config.model import MLPConfig, ModelConfig
from attnlab.convert.common import (
    hf_decoder_config,
    interleaved_to_half,
    model_from_state,
    names_list,
    parse_dtype,
)
from attnlab.errors import AttnlabError, CheckpointError
from attnlab.model.decoder import DecoderLM
from attnlab.nn.rope import rope_inv_freq
from attnlab.fsutil import fsync_path, make_public, write_error

# model_type -> architecture; both use Llama's tensor names and forward
LLAMA_FAMILY = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # a buffer some old checkpoints saved
_ATTN = (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "o_proj"))
_MLP = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))


def tensor_names(num_layers: int, *, attention_bias: bool, mlp_bias: bool, tied: bool) -> dict[str, str]:
    """attnlab parameter name -> Hugging Face tensor name, for a Llama stack."""
    names = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}
    if not tied:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(num_layers):
        ours, theirs = f"body.layers.{i}.", f"model.layers.{i}."
        names[ours + "attention_norm.weight"] = theirs + "input_layernorm.weight"
        names[ours + "mlp_norm.weight"] = theirs + "post_attention_layernorm.weight"
        for group, pairs, bias in (("attention", _ATTN, attention_bias), ("mlp", _MLP, mlp_bias)):
            hf_group = "self_attn" if group == "attention" else "mlp"
            for a, h in pairs:
                for kind in ("weight", "bias") if bias else ("weight",):
                    names[f"{ours}{group}.{a}.{kind}"] = f"{theirs}{hf_group}.{h}.{kind}"
    return names


# ---------------------------------------------------------------- config.json
def read_hf_config(folder: str | Path) -> dict:
    """``folder/config.json`` as a dict; ``CheckpointError`` when missing or not a JSON object."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None
    except (OSError, ValueError) as err:  # unreadable; an integer over Python's 4300-digit limit
        reason = getattr(err, "strerror", None) or _one_line(err)
        raise CheckpointError(f"{path}: not valid JSON ({reason[:160]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def is_llama_family(hf: dict) -> bool:
    """Whether ``model_type`` or ``architectures`` names a Llama-family model (values of the wrong
    type count as no match; :func:`hf_config_to_model_config` reports them)."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if not isinstance(archs, list):
        archs = []
    return ((isinstance(model_type, str) and model_type in LLAMA_FAMILY)
            or any(isinstance(a, str) and a in LLAMA_FAMILY.values() for a in archs))


MAX_HF_INT = 2**31 - 1  # any larger size is a corrupt config (and would overflow torch's int64 maths)


def _short(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, on one line."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _int(hf: dict, key: str, where: str, default=None) -> int:
    value = hf.get(key, default)
    if value is None and default is None:
        raise CheckpointError(f"{where}: required key {key} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_HF_INT:
        raise CheckpointError(f"{where}: {key} must be a positive integer <= {MAX_HF_INT} (got {_short(value)})")
    return value


def _float(value, key: str, where: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value <= 0):
        raise CheckpointError(f"{where}: {key} must be a positive finite number (got {_short(value)})")
    return float(value)


# key -> (allowed JSON types, description) for the keys read here; checked before anything else
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "model_type": ((str,), "a string"),
    "architectures": ((list,), "a list of strings"),
    "hidden_act": ((str,), "a string"),
    "sliding_window": ((int,), "an integer or null"),
    "use_sliding_window": ((bool,), "true or false"),
    "partial_rotary_factor": ((int, float), "a number"),
    "rope_theta": ((int, float), "a number"),
    "rope_scaling": ((dict,), "a mapping or null"),
    "rope_parameters": ((dict,), "a mapping or null"),
    "head_dim": ((int,), "an integer or null"),
}


def _check_types(hf: dict, where: str) -> None:
    """One-line ``CheckpointError`` for a key of the wrong JSON type (``model_type`` a list,
    ``architectures: 5``, ``sliding_window: "abc"`` ...); null means "absent" for all of them."""
    for key, (types, what) in _TYPES.items():
        value = hf.get(key)
        if value is None:
            continue
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise CheckpointError(f"{where}: {key} must be {what} (got {_short(value)})")
    archs = hf.get("architectures")
    if isinstance(archs, list) and not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f"{where}: architectures must be a list of strings (got {_short(archs)})")


def _bool(hf: dict, key: str, where: str, default: bool) -> bool:
    value = hf.get(key, default)
    if not isinstance(value, bool):
        raise CheckpointError(f"{where}: {key} must be true or false (got {value!r})")
    return value


def _rope_from_hf(hf: dict, where: str) -> dict:
    """attnlab ``rope`` section from ``rope_parameters`` (transformers 5) or the older
    ``rope_theta`` + ``rope_scaling``."""
    params = hf.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or not {"rope_type", "type", "rope_theta"} & set(params):
            raise CheckpointError(f"{where}: rope_parameters must be one mapping with rope_type/rope_theta "
                                  f"(per-layer-type RoPE is unsupported), got {_short(params)}")
        key, scaling, theta = "rope_parameters", params, params.get("rope_theta", hf.get("rope_theta", 10000.0))
    else:
        key, scaling, theta = "rope_scaling", hf.get("rope_scaling"), hf.get("rope_theta", 10000.0)
    rope: dict = {"theta": _float(theta, "rope_theta", where), "style": "half"}
    if scaling is None:
        return rope
    if not isinstance(scaling, dict):
        raise CheckpointError(f"{where}: {key} must be a mapping or null (got {_short(scaling)})")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type is None or rope_type == "default":
        return rope
    if rope_type != "llama3":
        raise CheckpointError(f"{where}: {key}.rope_type={_short(rope_type)} is unsupported "
                              f"(attnlab imports 'default' and 'llama3' RoPE)")
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    for name in fields:
        if scaling.get(name) is None:
            raise CheckpointError(f"{where}: {key}.{name} is missing (llama3 RoPE scaling needs it)")
    out: dict = {"type": "llama3"}
    for name in fields[:3]:
        out[name] = _float(scaling[name], f"{key}.{name}", where)
    out["original_max_position"] = _int(scaling, "original_max_position_embeddings", f"{where}: {key}")
    rope["scaling"] = out
    return rope


def hf_config_to_model_config(hf: dict, where: str = "config.json") -> ModelConfig:
    """Translate a Llama-family ``config.json`` into an attnlab ``ModelConfig``; anything attnlab
    cannot express raises ``CheckpointError`` naming the key."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    _check_types(hf, where)
    if not is_llama_family(hf):
        raise CheckpointError(f"{where}: model_type={_short(hf.get('model_type'))} / architectures="
                              f"{_short(hf.get('architectures'))} is not a Llama-family model (supported: "
                              f"{', '.join(LLAMA_FAMILY)})")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"{where}: hidden_act={_short(act)} is unsupported (Llama's SwiGLU needs 'silu')")
    if hf.get("quantization_config") is not None:
        raise CheckpointError(f"{where}: quantization_config is set; quantized checkpoints are unsupported")
    if hf.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise CheckpointError(f"{where}: partial_rotary_factor={_short(hf['partial_rotary_factor'])} is unsupported (needs 1.0)")
    d_model = _int(hf, "hidden_size", where)
    num_heads = _int(hf, "num_attention_heads", where)
    max_pos = _int(hf, "max_position_embeddings", where, 2048)
    window = hf.get("sliding_window")
    if window is not None and hf.get("use_sliding_window") is not False and window < max_pos:
        raise CheckpointError(f"{where}: sliding_window={_short(window)} is unsupported (attnlab attends to the full context)")
    attention: dict = {
        "type": "standard",
        "num_heads": num_heads,
        "num_kv_heads": _int(hf, "num_key_value_heads", where, num_heads),
        "bias": _bool(hf, "attention_bias", where, False),
        "rope": _rope_from_hf(hf, where),
    }
    if hf.get("head_dim") is not None:
        head_dim = _int(hf, "head_dim", where)
        if d_model % num_heads or head_dim != d_model // num_heads:
            attention["head_dim"] = head_dim
    data = {
        "vocab_size": _int(hf, "vocab_size", where),
        "d_model": d_model,
        "block_size": max_pos,
        "num_layers": _int(hf, "num_hidden_layers", where),
        "attention": attention,
        "mlp": {"type": "swiglu", "d_ff": _int(hf, "intermediate_size", where),
                "bias": _bool(hf, "mlp_bias", where, False)},
        "norm": "rmsnorm",
        "norm_eps": _float(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps", where),
        "tie_embeddings": _bool(hf, "tie_word_embeddings", where, False),
        "init_std": _float(hf.get("initializer_range", 0.02), "initializer_range", where),
    }
    try:
        return validate_section(ModelConfig, data, "model")
    except AttnlabError as err:
        raise CheckpointError(f"{where}: does not describe a valid model ({_one_line(err)})") from None


def _one_line(err: BaseException) -> str:
    lines = str(err).splitlines()
    return lines[0] if lines else type(err).__name__


# ---------------------------------------------------------------- safetensors
def _read_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Add every tensor of one safetensors file to ``tensors``."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise CheckpointError("reading Hugging Face checkpoints needs the safetensors package "
                              "(pip install safetensors)") from None
    key = None
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:  # bad header, truncated data
        what = "unreadable safetensors file" if key is None else f"tensor {key} unreadable"
        raise CheckpointError(f"{path}: {what} ({str(err).splitlines()[0]})") from None


def read_safetensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors`` or of the shards ``model.safetensors.index.json`` lists."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (ValueError, UnicodeDecodeError, AttributeError, RecursionError, OSError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' of tensor -> file)")
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                              f"(only safetensors checkpoints are supported)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{index}: shard {name} is missing")
        _read_file(path, tensors)
    if weight_map is not None:
        absent = [k for k, shard in weight_map.items() if k not in tensors]
        if absent:
            raise CheckpointError(f"{index}: tensor(s) {names_list(absent)} not found in their shard(s)")
    return tensors


def load_hf_llama(path: str | Path, *, dtype: str | torch.dtype | None = None) -> DecoderLM:
    """A Llama-family Hugging Face model folder as an attnlab ``DecoderLM`` (eval mode).

    ``dtype`` (``fp32``/``fp16``/``bf16`` or a torch dtype) casts the weights; by default they
    keep the checkpoint's dtype (float32 when the checkpoint mixes dtypes).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (a Hugging Face model is a folder with config.json)")
    want = parse_dtype(dtype)
    cfg = hf_config_to_model_config(read_hf_config(folder), f"{folder / 'config.json'}")
    tensors = {k: v for k, v in read_safetensors(folder).items() if not _IGNORED.search(k)}
    check_weights_against_config(cfg, tensors, str(folder))
    spec = cfg.attention
    names = tensor_names(cfg.num_layers, attention_bias=spec.bias, mlp_bias=cfg.mlp.bias,
                         tied=cfg.tie_embeddings)
    if cfg.tie_embeddings and "lm_head.weight" in tensors:  # some tied checkpoints store the copy
        head = tensors.pop("lm_head.weight")
        embed = tensors.get("model.embed_tokens.weight")
        if embed is not None and not torch.equal(head, embed):
            raise CheckpointError(f"{folder}: tie_word_embeddings is true but lm_head.weight differs "
                                  f"from model.embed_tokens.weight")
    ours = {theirs: mine for mine, theirs in names.items()}
    unexpected = [k for k in tensors if k not in ours]
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected tensor(s) {names_list(unexpected)}")
    state = {ours[k]: v for k, v in tensors.items()}
    dtypes = {v.dtype for v in state.values()}
    target = want or (dtypes.pop() if len(dtypes) == 1 else torch.float32)
    if not target.is_floating_point:
        raise CheckpointError(f"{folder}: weights are {target}, not floating point")
    state = {k: v.to(target) for k, v in state.items()}
    return model_from_state(cfg, state, str(folder), source_names=names)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _expected_shapes(cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(shapes of the non-layer tensors, shapes of one layer's tensors by their name inside the
    layer) that ``cfg`` implies, in Hugging Face names, computed without building a model."""
    spec = cfg.attention
    dims = attention_dims(spec, cfg.d_model)
    d, d_ff = cfg.d_model, cfg.mlp.hidden_dim(cfg.d_model)
    q_out, k_out = dims.num_heads * dims.qk_head_dim, dims.num_kv_heads * dims.qk_head_dim
    v_out, o_in = dims.num_kv_heads * dims.v_head_dim, dims.num_heads * dims.v_head_dim
    top = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,),
           "lm_head.weight": (cfg.vocab_size, d)}
    layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
    for name, w, b in (("q_proj", (q_out, d), (q_out,)), ("k_proj", (k_out, d), (k_out,)),
                       ("v_proj", (v_out, d), (v_out,)), ("o_proj", (d, o_in), (d,))):
        layer[f"self_attn.{name}.weight"], layer[f"self_attn.{name}.bias"] = w, b
    for name, w, b in (("gate_proj", (d_ff, d), (d_ff,)), ("up_proj", (d_ff, d), (d_ff,)),
                       ("down_proj", (d, d_ff), (d,))):
        layer[f"mlp.{name}.weight"], layer[f"mlp.{name}.bias"] = w, b
    return top, layer


def check_weights_against_config(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Layer count and tensor shapes of ``tensors`` (Hugging Face names) against ``cfg``, before any
    model is built: a ``config.json`` claiming a million layers for a file holding two fails here
    at once instead of building a million-layer skeleton. Names the config does not know are left
    to the exact name check that follows."""
    layers = {int(m.group(1)) for k in tensors if (m := _LAYER.match(k))}
    if len(layers) < cfg.num_layers:
        raise CheckpointError(f"{source}: config.json has num_hidden_layers={cfg.num_layers} but the weights "
                              f"hold tensors for {len(layers)} layer(s)")
    top, per_layer = _expected_shapes(cfg)
    for name, tensor in tensors.items():
        m = _LAYER.match(name)
        want = per_layer.get(m.group(2)) if m else top.get(name)
        if m and int(m.group(1)) >= cfg.num_layers:
            continue  # an unexpected layer: reported by name later
        if want is not None and tuple(tensor.shape) != want:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the config needs {want}")


# ---------------------------------------------------------------- export
def _uniform_specs(cfg: ModelConfig, target: str) -> tuple[list[str], object, MLPConfig | None]:
    """(problems, the attention spec and the MLP spec every layer shares) for an export to
    ``target``: what neither Hugging Face architecture expresses (a topology tree, layernorm, mixed
    layers, a non-SwiGLU MLP, attention without RoPE, RoPE frequencies no formula gives)."""
    problems: list[str] = []
    if cfg.topology is not None:
        problems.append("an explicit topology tree (model.topology)")
    if cfg.norm != "rmsnorm":
        problems.append(f"norm {cfg.norm!r} ({target} uses rmsnorm)")
    specs = cfg.attention_specs()
    mlps = [cfg.mlp_for_layer(i) for i in range(len(specs))] if cfg.topology is None else [cfg.mlp]
    for i, spec in enumerate(specs):
        if getattr(spec, "rope", None) is None:
            problems.append(f"attention without RoPE in layer {i}")
            break
        if spec != specs[0]:
            problems.append(f"layer {i} has a different attention config than layer 0 (layer_overrides)")
            break
    for i, mlp in enumerate(mlps):
        if mlp.type != "swiglu":
            problems.append(f"mlp type {mlp.type!r} ({target} uses swiglu)")
            break
        if mlp != mlps[0]:
            problems.append(f"layer {i} has a different mlp config than layer 0 (layer_overrides)")
            break
    spec = specs[0] if specs else None
    if not problems and spec.rope.inv_freq is not None:
        head_dim = next(f.head_dim for f in attention_dims(spec, cfg.d_model).key_fields if f.rotary)
        formula = rope_inv_freq(spec.rope.model_copy(update={"inv_freq": None}), head_dim)
        if not torch.allclose(rope_inv_freq(spec.rope, head_dim), formula, rtol=1e-6, atol=0.0):
            problems.append("explicit rope.inv_freq that theta/scaling do not reproduce")
    return problems, spec, mlps[0] if mlps else None


def _exportable(cfg: ModelConfig) -> tuple[StandardAttentionConfig | BottleneckAttentionConfig, MLPConfig]:
    """The one attention and MLP spec every layer shares; ``CheckpointError`` listing everything a
    Hugging Face Llama cannot express."""
    specs = cfg.attention_specs()
    problems: list[str] = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, StandardAttentionConfig | BottleneckAttentionConfig):
            extra = " with null tokens" if getattr(spec, "null_token", False) else ""
            name = "decoupled (DBA)" if isinstance(spec, DecoupledAttentionConfig) else repr(spec.type)
            problems.append(f"{name} attention{extra} in layer {i}")
            break
    if not problems:
        problems, spec, mlp = _uniform_specs(cfg, "Llama")
    if problems:
        raise CheckpointError("cannot export to a Hugging Face Llama: unsupported " + "; ".join(problems))
    return spec, mlp


def hf_llama_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """``config.json`` of the ``LlamaForCausalLM`` equivalent to ``cfg`` (checked exportable)."""
    spec, mlp = _exportable(cfg)
    dims = attention_dims(spec, cfg.d_model)
    rope = spec.rope
    scaling = None
    if rope.scaling is not None:
        s = rope.scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position}
    return hf_decoder_config(
        "LlamaForCausalLM", "llama", cfg, intermediate_size=mlp.hidden_dim(cfg.d_model), num_heads=dims.num_heads,
        num_kv_heads=dims.num_kv_heads, head_dim=dims.qk_head_dim, dtype=dtype,
        # transformers < 5 reads rope_theta + rope_scaling, transformers >= 5 rope_parameters
        rope_theta=rope.theta, rope_scaling=scaling,
        rope_parameters={"rope_type": "default", "rope_theta": rope.theta} if scaling is None
        else {**scaling, "rope_theta": rope.theta},
        attention_bias=spec.bias, attention_dropout=spec.dropout, mlp_bias=mlp.bias, pretraining_tp=1)


def _llama_tensors(model: DecoderLM, spec, hf_config: dict, target: torch.dtype) -> dict[str, torch.Tensor]:
    """Hugging Face Llama tensor name -> tensor (interleaved-RoPE q/k rows permuted to half-split)."""
    cfg = model.config
    names = tensor_names(hf_config["num_hidden_layers"], attention_bias=spec.bias,
                         mlp_bias=hf_config["mlp_bias"], tied=cfg.tie_embeddings)
    state = model.state_dict()
    extra = [k for k in state if k not in names and not (cfg.tie_embeddings and k == "lm_head.weight")]
    assert not extra, f"exportable model has tensors without a Hugging Face name: {extra}"
    tensors: dict[str, torch.Tensor] = {}
    for ours, theirs in names.items():
        t = state[ours].detach().to("cpu", target)
        if spec.rope.style == "interleaved" and re.search(r"\.attention\.(query|key)\.", ours):
            heads = hf_config["num_attention_heads"] if ".query." in ours else hf_config["num_key_value_heads"]
            t = interleaved_to_half(t, heads)
        tensors[theirs] = t.contiguous()
    return tensors


def hf_export_plan(model: DecoderLM, dtype: torch.dtype) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, tensors) of the stock Hugging Face architecture that computes ``model``'s
    logits: ``LlamaForCausalLM`` for standard/bottleneck attention, ``Phi3ForCausalLM`` (partial
    rotary, ``attnlab.convert.hf_phi3``) for DBA. ``CheckpointError`` naming every feature the
    architecture cannot express, before any tensor is converted."""
    from attnlab.convert import hf_phi3

    cfg = model.config
    specs = cfg.attention_specs()
    if specs and all(isinstance(s, DecoupledAttentionConfig) for s in specs):
        problems, spec, mlp = _uniform_specs(cfg, "Phi3")
        if problems:
            raise CheckpointError("cannot export DBA as a Hugging Face Phi3 (partial-rotary) model: unsupported "
                                  + "; ".join(problems))
        hf_phi3.check_phi3_exportable(spec, mlp, cfg)
        return hf_phi3.phi3_config(cfg, spec, mlp, dtype), hf_phi3.phi3_tensors(model, spec, dtype)
    hf_config = hf_llama_config(cfg, dtype)  # raises for unsupported models
    return hf_config, _llama_tensors(model, specs[0], hf_config, dtype)


def export_hf(model: DecoderLM, out_dir: str | Path, dtype: str | torch.dtype | None = None,
              tokenizer=None) -> Path:
    """Write ``model`` as a Hugging Face folder (config.json + model.safetensors) that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads with the same logits: a
    ``LlamaForCausalLM`` for standard/bottleneck attention, a ``Phi3ForCausalLM`` with partial
    rotary embeddings for DBA (``hf_export_plan``).

    ``tokenizer``: the run's ``TokenizerConfig``; with it the folder also gets the tokenizer
    (``tokenizer.json`` and its configs, ``convert.hf_tokenizer``), the bos/eos/pad ids in
    ``config.json`` and a ``generation_config.json``, so ``AutoTokenizer``/lm-eval's ``hf`` model load it.

    ``dtype`` (``fp32``/``fp16``/``bf16``) defaults to the model's own. The folder is written under a
    temporary name and renamed into place, so a failure leaves nothing behind; an existing non-empty
    ``out_dir`` is refused. Models neither architecture can express raise ``CheckpointError`` before
    anything is written.
    """
    target = parse_dtype(dtype) or model.embed.weight.dtype
    hf_config, tensors = hf_export_plan(model, target)
    return _write_export(model, out_dir, hf_config, tensors, tokenizer)


def export_hf_llama(model: DecoderLM, out_dir: str | Path, dtype: str | torch.dtype | None = None,
                    tokenizer=None) -> Path:
    """``export_hf`` restricted to ``LlamaForCausalLM`` (standard/bottleneck attention; DBA is refused)."""
    _exportable(model.config)  # raises for what a Llama cannot express, DBA included
    return export_hf(model, out_dir, dtype=dtype, tokenizer=tokenizer)


def _write_export(model: DecoderLM, out_dir: str | Path, hf_config: dict, tensors: dict[str, torch.Tensor],
                  tokenizer) -> Path:
    from safetensors.torch import save_file

    cfg = model.config
    if tokenizer is not None:
        from attnlab.convert.hf_tokenizer import hf_tokenizer, special_ids

        hf_tok = hf_tokenizer(tokenizer)  # before anything is written: a missing transformers fails here
        if len(hf_tok) > cfg.vocab_size:
            raise CheckpointError(f"the run's tokenizer has {len(hf_tok)} tokens but the model's vocab_size is "
                                  f"{cfg.vocab_size}")
        hf_config.update(special_ids(tokenizer))
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists and is not empty; remove it or choose another folder")
    storages: set[int] = set()
    for name, t in tensors.items():
        if t.untyped_storage().data_ptr() in storages:  # safetensors refuses shared storage
            tensors[name] = t = t.clone()
        storages.add(t.untyped_storage().data_ptr())

    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as err:
        raise write_error(out, err, "cannot create export folder") from None
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        names_written = ["config.json", "model.safetensors"]
        if tokenizer is not None:
            hf_tok.save_pretrained(str(tmp))
            generation = {k: v for k, v in special_ids(tokenizer).items()} | {"_from_model_config": True}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
            names_written += [p.name for p in tmp.iterdir() if p.name not in names_written]
        for name in names_written:
            make_public(tmp / name)  # safetensors creates its file 0600: give both the umask's mode
            fsync_path(tmp / name)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except OSError as err:  # a full disk, a read-only folder: one line, nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(out, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(out.parent)
    return out
