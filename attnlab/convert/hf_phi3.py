"""DBA models as a stock partial-rotary architecture: Hugging Face ``Phi3ForCausalLM``.

Decoupled Bottleneck Attention scores ``s_sem * q_sem.k_sem + s_geo * q_geo.k_geo`` (RoPE on the
geometric path only) with values of width ``sem + geo`` per head. Without a null token or gate,
that is exactly an attention whose heads have width ``hd = sem + geo``, RoPE on the first ``geo``
dims only (Phi-3's ``partial_rotary_factor``, as Phi-4-mini uses it) and the usual scale
``1 / sqrt(hd)``:

* each query head is ordered ``[geo | sem]`` (the rotary dims first, as Phi3's
  ``apply_rotary_pos_emb`` rotates ``x[..., :rotary_dim]``), keys the same way;
* the two path scales are folded into the query rows: ``q_f *= s_f * sqrt(hd)``, so
  ``(q . k) / sqrt(hd)`` is the DBA score;
* the geometric rows use the half-split RoPE layout (interleaved models are permuted) and the
  rotary dims' frequencies are ``theta^(-2i / geo)``, which is what Phi3 computes from
  ``int(head_dim * partial_rotary_factor)``;
* q, k, v go into Phi3's fused ``qkv_proj`` (rows ``[q | k | v]``) and the SwiGLU's gate and up into
  ``gate_up_proj`` (rows ``[gate | up]``).

Not expressible (refused with the feature named): the null token (a learned key/value every query
sees), the gate (a per-token trade-off of the paths), value heads of another width than
``sem + geo``, biases (Phi3 has none), Llama-3 RoPE scaling (Phi3 knows only ``default`` and
``longrope``). Phi3 needs transformers >= 4.49 for ``partial_rotary_factor`` and an explicit
``head_dim``.
"""

from __future__ import annotations

import math

import torch

from attnlab.config.attention import DecoupledAttentionConfig, attention_dims
from attnlab.config.model import MLPConfig, ModelConfig
from attnlab.convert.common import hf_decoder_config, interleaved_to_half
from attnlab.errors import CheckpointError
from attnlab.model.decoder import DecoderLM
from attnlab.nn.attention.functional import default_scales

ARCHITECTURE = "Phi3ForCausalLM"


def rotary_factor(rotary_dim: int, head_dim: int) -> float:
    """``partial_rotary_factor`` such that ``int(head_dim * factor) == rotary_dim`` (what
    transformers and vLLM compute), nudged up by one ulp where ``rotary_dim / head_dim`` rounds
    below."""
    factor = rotary_dim / head_dim
    while int(head_dim * factor) < rotary_dim:
        factor = math.nextafter(factor, 2.0)
    return factor


def phi3_problems(spec: DecoupledAttentionConfig, mlp: MLPConfig, d_model: int) -> list[str]:
    """What of a (uniform) DBA model a Phi3 partial-rotary attention cannot express."""
    dims = attention_dims(spec, d_model)
    sem, geo = dims.key_fields
    problems = []
    if spec.null_token:
        problems.append("null_token (a learned null key/value every query sees)")
    if spec.gate:
        problems.append("gate (a per-token weighting of the semantic and geometric paths)")
    if dims.v_head_dim != sem.head_dim + geo.head_dim:
        problems.append(f"v_dim={spec.v_dim} (the value head must be sem + geo = "
                        f"{sem.head_dim + geo.head_dim} wide, got {dims.v_head_dim})")
    if spec.bias:
        problems.append("attention bias (Phi3 has none)")
    if mlp.bias:
        problems.append("mlp bias (Phi3 has none)")
    if spec.rope.scaling is not None:
        problems.append("rope.scaling llama3 (Phi3 supports default and longrope RoPE only)")
    return problems


def phi3_config(cfg: ModelConfig, spec: DecoupledAttentionConfig, mlp: MLPConfig, dtype: torch.dtype) -> dict:
    """``config.json`` of the ``Phi3ForCausalLM`` equivalent to the DBA model ``cfg``."""
    dims = attention_dims(spec, cfg.d_model)
    sem, geo = dims.key_fields
    head_dim = sem.head_dim + geo.head_dim
    factor = rotary_factor(geo.head_dim, head_dim)
    return hf_decoder_config(
        ARCHITECTURE, "phi3", cfg, intermediate_size=mlp.hidden_dim(cfg.d_model), num_heads=dims.num_heads,
        num_kv_heads=dims.num_kv_heads, head_dim=head_dim, dtype=dtype,
        original_max_position_embeddings=cfg.block_size,
        # transformers < 5 reads rope_theta + partial_rotary_factor, transformers >= 5 rope_parameters
        rope_theta=spec.rope.theta, rope_scaling=None, partial_rotary_factor=factor,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope.theta, "partial_rotary_factor": factor},
        attention_dropout=spec.dropout, resid_pdrop=0.0, embd_pdrop=0.0, sliding_window=None)


def _heads(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(heads * d, in) -> (heads, d, in)."""
    return w.reshape(num_heads, -1, w.shape[-1])


def phi3_tensors(model: DecoderLM, spec: DecoupledAttentionConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Hugging Face Phi3 tensor name -> tensor, the scales folded into the query rows in float64."""
    cfg = model.config
    dims = attention_dims(spec, cfg.d_model)
    sem, geo = dims.key_fields
    h, kv = dims.num_heads, dims.num_kv_heads
    head_dim = sem.head_dim + geo.head_dim
    s_sem, s_geo = default_scales([sem.head_dim, geo.head_dim])
    fold_sem, fold_geo = s_sem * math.sqrt(head_dim), s_geo * math.sqrt(head_dim)
    interleaved = spec.rope.style == "interleaved"

    def out(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", dtype).contiguous()

    def geo_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
        w = w.detach().to("cpu", torch.float64)
        return interleaved_to_half(w, heads) if interleaved else w

    tensors = {"model.embed_tokens.weight": out(model.embed.weight), "model.norm.weight": out(model.final_norm.weight)}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = out(model.lm_head.weight)
    for i, block in enumerate(model.body.layers):
        att, mlp, name = block.attention, block.mlp, f"model.layers.{i}."
        q_sem = att.query_sem.weight.detach().to("cpu", torch.float64)
        k_sem = q_sem if att.key_sem is None else att.key_sem.weight.detach().to("cpu", torch.float64)
        q = torch.cat([_heads(geo_rows(att.query_geo.weight, h), h) * fold_geo, _heads(q_sem, h) * fold_sem], dim=1)
        k = torch.cat([_heads(geo_rows(att.key_geo.weight, kv), kv), _heads(k_sem, kv)], dim=1)
        v = att.value.weight.detach().to("cpu", torch.float64)
        qkv = torch.cat([q.reshape(h * head_dim, -1), k.reshape(kv * head_dim, -1), v])
        tensors[name + "self_attn.qkv_proj.weight"] = out(qkv)
        tensors[name + "self_attn.o_proj.weight"] = out(att.out.weight)
        tensors[name + "mlp.gate_up_proj.weight"] = out(torch.cat([mlp.gate.weight, mlp.up.weight]))
        tensors[name + "mlp.down_proj.weight"] = out(mlp.down.weight)
        tensors[name + "input_layernorm.weight"] = out(block.attention_norm.weight)
        tensors[name + "post_attention_layernorm.weight"] = out(block.mlp_norm.weight)
    return tensors


def check_phi3_exportable(spec, mlp, cfg: ModelConfig) -> None:
    problems = phi3_problems(spec, mlp, cfg.d_model)
    if problems:
        raise CheckpointError("cannot export DBA as a Hugging Face Phi3 (partial-rotary) model: unsupported "
                              + "; ".join(problems))
