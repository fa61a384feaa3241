"""Shared pieces of the importers and exporters: building a model around foreign weights without
a throw-away random init, and the RoPE row permutation between interleaved and half-split layouts.

RoPE layouts. Within one head of width d, ``half`` (Hugging Face/NeoX) rotates the pairs
(x[i], x[i + d/2]) and ``interleaved`` (Meta's original Llama, llama2.c) rotates (x[2i], x[2i+1]),
pair i at the same frequency in both. Reordering the q and k projection rows of every head so that
row 2i moves to i and row 2i+1 to i + d/2 turns an interleaved model into the identical half-split
model: q.k is a sum over all head dims, so a permutation applied to both q and k leaves the scores
unchanged, and the rotation acts on the same pairs at the same frequencies.
"""

from __future__ import annotations

import torch

from attnlab.config.model import ModelConfig
from attnlab.errors import CheckpointError
from attnlab.model.decoder import DecoderLM
from attnlab.nn.rope import rope_inv_freq


def interleaved_to_half(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of a q/k projection weight (heads * d, in) or bias (heads * d,) from the interleaved
    RoPE layout to the half-split one (Meta -> Hugging Face, as HF's convert script's ``permute``)."""
    head_dim = w.shape[0] // num_heads
    rest = w.shape[1:]
    return w.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape).contiguous()


def half_to_interleaved(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`interleaved_to_half`."""
    head_dim = w.shape[0] // num_heads
    rest = w.shape[1:]
    return w.reshape(num_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape).contiguous()


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None``, a floating torch dtype, or one of ``fp32 fp16 bf16`` (``float32`` ... too)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in DTYPES.values():
            raise CheckpointError(f"dtype {dtype} is unsupported; use one of fp32, fp16, bf16")
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is unsupported; use one of fp32, fp16, bf16")
    return DTYPES[dtype]


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str,
                     source_names: dict[str, str] | None = None) -> DecoderLM:
    """A ``DecoderLM`` for ``cfg`` holding exactly the tensors of ``state`` (attnlab names, any
    dtype, tied ``lm_head.weight`` may be left out), in eval mode.

    The model is built on the meta device and the tensors are assigned, not copied, so a large
    checkpoint is neither randomly initialized first nor held twice in memory. Missing, unexpected
    or misshapen tensors raise ``CheckpointError`` naming them (``source`` prefixes the message;
    ``source_names`` maps attnlab names to the checkpoint's own names for those messages).
    """
    source_names = source_names or {}
    with torch.device("meta"):
        model = DecoderLM(cfg)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {names_list([source_names.get(k, k) for k in missing])}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {names_list([source_names.get(k, k) for k in unexpected])}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{source}: tensor {source_names.get(name, name)} has shape "
                                  f"{tuple(state[name].shape)}, the config needs {shape}")
    if cfg.tie_embeddings:
        state = {**state, "lm_head.weight": state["embed.weight"]}
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:  # assign=True wrapped the shared tensor in two Parameters: tie them again
        model.lm_head.weight = model.embed.weight
    # non-persistent buffers (RoPE frequencies) are not in any checkpoint: compute them for real
    for layer, spec in zip(model.attention_layers(), cfg.attention_specs()):
        rope = getattr(layer, "rope", None)
        if rope is not None:
            rope.inv_freq = rope_inv_freq(spec.rope, rope.head_dim)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"tensors left on the meta device: {left}"
    return model.eval()


def hf_decoder_config(architecture: str, model_type: str, cfg: ModelConfig, *, intermediate_size: int,
                      num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, **extra) -> dict:
    """The ``config.json`` fields every exported decoder shares (sizes, norm, embeddings, special
    ids left unset, dtype under both of transformers' names), plus the architecture's ``extra``."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": [architecture], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": intermediate_size,
        "num_hidden_layers": len(cfg.attention_specs()), "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads, "head_dim": head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size, "initializer_range": cfg.init_std, "rms_norm_eps": cfg.norm_eps,
        **extra,
        "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,  # attnlab models do not record them
        "torch_dtype": dtype_name, "dtype": dtype_name,
    }


def names_list(names: list[str], limit: int = 5) -> str:
    """At most ``limit`` names, comma separated, with a count of the rest."""
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")
