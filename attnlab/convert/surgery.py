"""Standard -> DBA attention surgery ("upcycling"), head-aware and RoPE-aware, with a report of
how much of the teacher's attention-logit energy the initialization reproduces.

Per layer and kv head g (math in ``attnlab.convert.factorize``):

* geometric path: ``geo_pairs`` of the teacher's rotary pairs are copied EXACTLY (query rows of
  every head of the group, key rows of kv head g, laid out in the teacher's RoPE style) and the
  student's RoPE gets their teacher frequencies per kv head. A rotation acts per pair, so these
  pairs reproduce their part of the teacher's logit at every relative distance. Pairs are ranked
  by their logit energy E_i = sum_{h in g} E[|q_h,i|^2] E[|k_g,i|^2] (``pair_score="energy"``),
  or by default by the part of it no position-free term can carry, E_i (1 - |E[e^{i w_i D}]|^2)
  over the causal distances D of a ``context``-token window (``"positional"``: a pair that barely
  rotates within the context is left to the semantic path).
* semantic path: the remaining pairs' bilinear forms are made position free and factored at
  rank ``sem_head_dim`` with one key factor per kv group, weighted by the calibration input
  moment. ``sem_target="zero_rotation"`` takes them at distance 0 (B_h = W_Q,h,rest^T W_K,g,rest);
  the default ``"mean_rotation"`` takes their average over the causal distances of the window,
  B_h = W_Q,h,rest^T Rbar W_K,g,rest, the best position-free approximation in mean square (both
  agree for frequency 0).
* values/output: copied exactly (or, with ``v_rank``, the same shared factorization of
  ``O_h W_V,g``).

The teacher scale 1/sqrt(head_dim) is folded into the student's query weights against its
1/sqrt(sem_head_dim) and 1/sqrt(geo_head_dim), so student logits equal the teacher's wherever the
factorization is exact. ``method="independent_svd"`` is the seed's recipe for comparison: truncated
SVDs of W_Q and W_K over all heads, split into semantic/geometric bands, RoPE and heads ignored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from attnlab.config.attention import (
    DecoupledAttentionConfig,
    RopeConfig,
    StandardAttentionConfig,
    attention_dims,
)
from attnlab.config.model import ModelConfig
from attnlab.convert.common import model_from_state
from attnlab.convert.factorize import (
    mean_rotation,
    pair_rows,
    pair_scores,
    rotate_key_pairs,
    shared_right_factor,
    svd_band,
    top_pairs,
)
from attnlab.errors import ConfigError, InputError
from attnlab.model.decoder import DecoderLM
from attnlab.model.stats import PAPER_DBA_POLICY, kv_bytes_per_token_layer, policy_label
from attnlab.nn.attention import AttentionLayer, DecoupledAttention
from attnlab.nn.attention.functional import field_scores
from attnlab.nn.rope import rope_inv_freq

Tensor = torch.Tensor
TEACHER_MIXED_POLICY = StandardAttentionConfig.mixed_policy  # the teacher's analogue of the paper policy
FORMATS = ("fp16", "q8_0", "q4_0")


@dataclass(frozen=True)
class SurgeryPlan:
    """What the student looks like: per-head semantic dim, rotary pairs kept per kv head
    (geometric head dim = 2 * geo_pairs), optional per-head value rank (None: V/O copied).
    ``pair_score``/``sem_target``: see the module docstring (``energy``/``zero_rotation`` is the
    plain recipe); ``context``: the window (tokens) both average over; None: the length of the
    calibration (or energy) sequences."""

    sem_head_dim: int
    geo_pairs: int
    v_rank: int | None = None
    method: Literal["rope_aware", "independent_svd"] = "rope_aware"
    pair_score: Literal["positional", "energy"] = "positional"
    sem_target: Literal["mean_rotation", "zero_rotation"] = "mean_rotation"
    context: int | None = None


@dataclass
class LayerSurgery:
    """One layer's outcome. ``energy_captured`` = clip(logit_energy, 0, 1); ``logit_energy`` may
    be negative (an init whose logits are further from the teacher's than all-zero logits)."""

    layer: int
    energy_captured: float = 0.0
    logit_energy: float = 0.0
    geo_energy_share: float | None = None        # kept pairs' share of the pair-energy scores
    kept_pairs: list[list[int]] = field(default_factory=list)      # per kv head, teacher pair ids
    kept_freqs: list[list[float]] = field(default_factory=list)    # per kv head, rad / position
    sem_energy_kept: list[float] = field(default_factory=list)     # per kv head, singular values
    v_energy_kept: list[float] | None = None


@dataclass
class SurgeryReport:
    method: str
    plan: SurgeryPlan
    layers: list[LayerSurgery]
    teacher_kv_bytes: dict[str, int]   # per token, all layers, per cache policy label
    student_kv_bytes: dict[str, int]
    calibration_tokens: int            # 0: weights only (identity input moment)
    energy_tokens: int                 # tokens the energies were measured on
    output_kl: float                   # mean KL(teacher || student) of next-token distributions

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        head = (f"{self.method}: sem_head_dim={self.plan.sem_head_dim} geo_pairs={self.plan.geo_pairs} "
                f"KV bytes/token fp16 {self.teacher_kv_bytes['fp16']} -> {self.student_kv_bytes['fp16']}, "
                f"output KL {self.output_kl:.4f}")
        lines = [head]
        for rep in self.layers:
            geo = "" if rep.geo_energy_share is None else f" geo_share={rep.geo_energy_share:.3f} pairs={rep.kept_pairs}"
            lines.append(f"  layer {rep.layer}: energy={rep.energy_captured:.4f}{geo}")
        return "\n".join(lines)


# ---------------------------------------------------------------- configs
def _teacher_specs(cfg: ModelConfig) -> list[StandardAttentionConfig]:
    specs = cfg.attention_specs()
    for i, spec in enumerate(specs):
        if not isinstance(spec, StandardAttentionConfig) or spec.rope is None:
            raise ConfigError(f"attention[{i}]", "surgery needs standard attention with RoPE in every layer",
                              getattr(spec, "type", spec))
    return specs


def _check_plan(plan: SurgeryPlan, head_dim: int) -> None:
    if plan.method not in ("rope_aware", "independent_svd"):
        raise ConfigError("plan.method", "must be rope_aware or independent_svd", plan.method)
    if plan.sem_head_dim < 1:
        raise ConfigError("plan.sem_head_dim", "must be >= 1", plan.sem_head_dim)
    if not 1 <= plan.geo_pairs <= head_dim // 2:
        raise ConfigError("plan.geo_pairs", f"must be in 1..{head_dim // 2} (teacher head_dim {head_dim})",
                          plan.geo_pairs)
    if plan.v_rank is not None and plan.v_rank < 1:
        raise ConfigError("plan.v_rank", "must be >= 1 (or null: values copied exactly)", plan.v_rank)
    if plan.pair_score not in ("positional", "energy"):
        raise ConfigError("plan.pair_score", "must be positional or energy", plan.pair_score)
    if plan.sem_target not in ("mean_rotation", "zero_rotation"):
        raise ConfigError("plan.sem_target", "must be mean_rotation or zero_rotation", plan.sem_target)
    if plan.context is not None and plan.context < 1:
        raise ConfigError("plan.context", "must be >= 1 (tokens)", plan.context)


def student_attention_config(teacher: StandardAttentionConfig, d_model: int, plan: SurgeryPlan,
                             freqs: list[list[float]] | None = None) -> DecoupledAttentionConfig:
    """The DBA spec replacing one teacher layer; ``freqs``: kept frequencies per kv head (None:
    the teacher's theta/scaling evaluated at the geometric head dim)."""
    head_dim = attention_dims(teacher, d_model).key_fields[0].head_dim
    _check_plan(plan, head_dim)
    h = teacher.num_heads
    rope = teacher.rope
    if freqs is None and rope.inv_freq is not None:  # explicit teacher list: its first pairs
        lists = rope.inv_freq if isinstance(rope.inv_freq[0], list) else [rope.inv_freq]
        freqs = [list(f[: plan.geo_pairs]) for f in lists]
    student_rope = RopeConfig(theta=rope.theta, style=rope.style, scaling=rope.scaling,
                              inv_freq=[list(map(float, f)) for f in freqs] if freqs is not None else None)
    return DecoupledAttentionConfig(
        num_heads=h, num_kv_heads=teacher.kv_heads, bias=teacher.bias, dropout=teacher.dropout,
        sem_dim=plan.sem_head_dim * h, geo_dim=2 * plan.geo_pairs * h,
        v_dim=(plan.v_rank or head_dim) * h, rope=student_rope, null_token=False, tie_qk=False, gate=False)


def student_config(teacher_cfg: ModelConfig, plan: SurgeryPlan, *,
                   per_layer_freqs: list | None = None) -> ModelConfig:
    """The teacher's config with every attention layer replaced by its DBA student
    (``per_layer_freqs[i]``: layer i's kept frequencies per kv head). Embeddings, norms, MLPs
    (with their per-layer overrides) and the LM head are unchanged."""
    if teacher_cfg.topology is not None:
        raise ConfigError("topology", "surgery supports num_layers stacks, not topology trees",
                          teacher_cfg.topology.type)
    specs = _teacher_specs(teacher_cfg)
    if per_layer_freqs is not None and len(per_layer_freqs) != len(specs):
        raise ConfigError("per_layer_freqs", f"needs one entry per attention layer ({len(specs)})",
                          len(per_layer_freqs))
    student = [student_attention_config(s, teacher_cfg.d_model, plan,
                                        None if per_layer_freqs is None else per_layer_freqs[i])
               for i, s in enumerate(specs)]
    data = teacher_cfg.model_dump()
    data["attention"] = student[0].model_dump()
    overrides = []
    for ov in teacher_cfg.layer_overrides:  # keep MLP overrides; attention is set per layer below
        if ov.mlp is not None:
            overrides.append({**ov.model_dump(), "attention": None})
    if any(s != student[0] for s in student):
        overrides += [{"layers": [i], "attention": s.model_dump()} for i, s in enumerate(student)]
    data["layer_overrides"] = overrides
    return ModelConfig.model_validate(data)


def kv_bytes(cfg: ModelConfig, policies: list) -> dict[str, int]:
    """KV-cache bytes per token summed over layers, per policy label."""
    dims = [attention_dims(s, cfg.d_model) for s in cfg.attention_specs()]
    return {policy_label(p): sum(kv_bytes_per_token_layer(d, p) for d in dims) for p in policies}


# ---------------------------------------------------------------- one layer
def _aug(linear: torch.nn.Linear) -> Tensor:
    """[W | b] in float64 (W alone without bias)."""
    w = linear.weight.detach().double()
    return w if linear.bias is None else torch.cat([w, linear.bias.detach().double()[:, None]], 1)


def _split(name: str, w: Tensor, has_bias: bool) -> dict[str, Tensor]:
    if has_bias:
        return {f"{name}.weight": w[:, :-1].contiguous(), f"{name}.bias": w[:, -1].contiguous()}
    return {f"{name}.weight": w}


def _context(plan: SurgeryPlan, fallback: int | None) -> int | None:
    needs = plan.method == "rope_aware" and (plan.sem_target == "mean_rotation" or plan.pair_score == "positional")
    context = plan.context if plan.context is not None else fallback
    if needs and context is None:
        raise ConfigError("plan.context", "needed by sem_target=mean_rotation / pair_score=positional", None)
    return context


def convert_attention(teacher: AttentionLayer, spec: StandardAttentionConfig, plan: SurgeryPlan, *,
                      sigma: Tensor | None = None, context: int | None = None
                      ) -> tuple[dict[str, Tensor], LayerSurgery, list[list[float]] | None]:
    """Student attention weights (float64, DBA parameter names), the layer's report (energies
    not yet measured) and the kept frequencies per kv head (None for independent_svd).
    ``sigma``: second moment of the layer input, augmented by a constant 1 when the layer has
    biases ((D+1) x (D+1)); None: identity. ``context``: window length when ``plan.context`` is
    unset."""
    d = teacher.dims.key_fields[0].head_dim
    _check_plan(plan, d)
    context = _context(plan, context)
    bias = teacher.query.bias is not None
    rep = LayerSurgery(layer=teacher.layer_index)
    if plan.method == "independent_svd":
        state, freqs = _independent_svd(teacher, plan), None
    else:
        state = _rope_aware(teacher, spec, plan, sigma, context, rep)
        freqs = rep.kept_freqs
    state |= _values(teacher, plan, sigma, rep)
    return {k: v for name, w in state.items() for k, v in _split(name, w, bias).items()}, rep, freqs


def _independent_svd(teacher: AttentionLayer, plan: SurgeryPlan) -> dict[str, Tensor]:
    """The seed's split: the first rows of the rank-(H*sem) and next-band SVD reconstructions
    of W_Q and W_K over all heads; no pairs, no heads, no scale folding, biases dropped."""
    h, kv = teacher.dims.num_heads, teacher.dims.num_kv_heads
    s, geo = plan.sem_head_dim, 2 * plan.geo_pairs
    wq, wk = _aug(teacher.query), _aug(teacher.key)
    state = {"query_sem": svd_band(wq, 0, h * s, h * s), "key_sem": svd_band(wk, 0, kv * s, kv * s),
             "query_geo": svd_band(wq, h * s, h * geo, h * geo), "key_geo": svd_band(wk, kv * s, kv * geo, kv * geo)}
    if teacher.query.bias is not None:  # the seed copied no biases
        for w in state.values():
            w[:, -1] = 0
    return state


def _rope_aware(teacher: AttentionLayer, spec: StandardAttentionConfig, plan: SurgeryPlan,
                sigma: Tensor | None, context: int | None, rep: LayerSurgery) -> dict[str, Tensor]:
    h, kv = teacher.dims.num_heads, teacher.dims.num_kv_heads
    d = teacher.dims.key_fields[0].head_dim
    group, style = h // kv, spec.rope.style
    wq, wk = _aug(teacher.query), _aug(teacher.key)
    scores = pair_scores(wq, wk, h, kv, style, sigma)  # (KV, d/2)
    freqs = rope_inv_freq(spec.rope, d).to(wq.device)
    freqs = freqs if freqs.dim() == 2 else freqs.expand(kv, -1)  # (KV, d/2)
    if context is not None:
        mean_cos, mean_sin = mean_rotation(freqs, context)
    ranking = scores * (1 - mean_cos ** 2 - mean_sin ** 2) if plan.pair_score == "positional" else scores
    kept = top_pairs(ranking, plan.geo_pairs)
    geo_scale, sem_scale = math.sqrt(2 * plan.geo_pairs / d), math.sqrt(plan.sem_head_dim / d)
    parts: dict[str, list[Tensor]] = {"query_sem": [], "key_sem": [], "query_geo": [], "key_geo": []}
    for g in range(kv):
        rest = [i for i in range(d // 2) if i not in kept[g]]
        rows = torch.tensor(pair_rows(style, d, kept[g]), device=wq.device)
        rest_rows = torch.tensor(pair_rows(style, d, rest), dtype=torch.long, device=wq.device)
        queries = [wq[hh * d:(hh + 1) * d] for hh in range(g * group, (g + 1) * group)]
        key = wk[g * d:(g + 1) * d]
        parts["key_geo"].append(key[rows])
        parts["query_geo"] += [geo_scale * q[rows] for q in queries]
        key_rest = key[rest_rows]
        if plan.sem_target == "mean_rotation" and rest:
            key_rest = rotate_key_pairs(key_rest, style, mean_cos[g, rest], mean_sin[g, rest])
        fac = shared_right_factor([q[rest_rows] for q in queries], key_rest, plan.sem_head_dim,
                                  sigma_right=sigma, sigma_left=sigma)
        parts["key_sem"].append(fac.C)
        parts["query_sem"] += [sem_scale * a for a in fac.A]
        rep.sem_energy_kept.append(fac.energy_kept)
    total = float(scores.sum())
    kept_energy = sum(float(scores[g, kept[g]].sum()) for g in range(kv))
    rep.geo_energy_share = kept_energy / total if total > 0 else 1.0
    rep.kept_pairs = kept
    rep.kept_freqs = [[float(freqs[g, i]) for i in kept[g]] for g in range(kv)]
    return {name: torch.cat(ws) for name, ws in parts.items()}


def _values(teacher: AttentionLayer, plan: SurgeryPlan, sigma: Tensor | None, rep: LayerSurgery) -> dict[str, Tensor]:
    """V/O copied, or factored: O_h W_V,g ~= A_h^T C_g with C_g the new value rows of kv head g
    (shared by its query heads) and A_h^T head h's output columns; output space unweighted."""
    h, kv = teacher.dims.num_heads, teacher.dims.num_kv_heads
    d = teacher.dims.v_head_dim
    wv, wo = _aug(teacher.value), _aug(teacher.out)
    if plan.v_rank is None:
        return {"value": wv, "out": wo}
    group, values, outs = h // kv, [], []
    rep.v_energy_kept = []
    for g in range(kv):
        lefts = [wo[:, hh * d:(hh + 1) * d].T for hh in range(g * group, (g + 1) * group)]
        fac = shared_right_factor(lefts, wv[g * d:(g + 1) * d], plan.v_rank, sigma_right=sigma)
        values.append(fac.C)
        outs += [a.T for a in fac.A]
        rep.v_energy_kept.append(fac.energy_kept)
    if teacher.out.bias is not None:
        outs.append(wo[:, -1:])
    return {"value": torch.cat(values), "out": torch.cat(outs, 1)}


def upcycle_attention(teacher: AttentionLayer, spec: StandardAttentionConfig, plan: SurgeryPlan, *,
                      sigma: Tensor | None = None, context: int | None = None
                      ) -> tuple[DecoupledAttention, LayerSurgery]:
    """One teacher attention layer -> its DBA student layer (teacher dtype/device; no KV-size
    check, so plans that keep every pair can be used to test exactness)."""
    state, rep, freqs = convert_attention(teacher, spec, plan, sigma=sigma, context=context)
    d_model = teacher.query.in_features
    ref = teacher.query.weight
    student = DecoupledAttention(student_attention_config(spec, d_model, plan, freqs), d_model, teacher.layer_index)
    student = student.to(ref.device, ref.dtype)
    student.load_state_dict(state, strict=True)  # copies, casting to the teacher's dtype
    return student.train(teacher.training), rep


# ---------------------------------------------------------------- measuring
def attention_logits(layer: AttentionLayer, hidden: Tensor, positions: Tensor) -> Tensor:
    """Pre-softmax scores sum_f scale_f q_f . k_f, float64, (B, H, T, T), unmasked."""
    p = layer.project(hidden, positions)
    return field_scores(p.q, p.k, layer.scales, dtype=torch.float64)


@torch.no_grad()
def logit_energy(teacher_layer: AttentionLayer, student_layer: AttentionLayer, hidden: Tensor,
                 positions: Tensor | None = None) -> float:
    """1 - ||S_t - S_s||^2 / ||S_t||^2 over causal (query, key) pairs of all heads and sequences:
    the fraction of the teacher's attention-logit energy the student reproduces (1: identical;
    may be negative). ``hidden``: the layer's (normed) input (B, T, D)."""
    t_len = hidden.shape[1]
    if positions is None:
        positions = torch.arange(t_len, device=hidden.device)
    causal = torch.ones(t_len, t_len, dtype=torch.bool, device=hidden.device).tril()
    err = ref = 0.0
    for b in range(hidden.shape[0]):  # one sequence at a time: (H, T, T) float64 scores
        pos = positions if positions.dim() == 1 else positions[b:b + 1]
        st = attention_logits(teacher_layer, hidden[b:b + 1], pos)[..., causal]
        ss = attention_logits(student_layer, hidden[b:b + 1], pos)[..., causal]
        err += float(((st - ss) ** 2).sum())
        ref += float((st ** 2).sum())
    return 1.0 - err / ref if ref > 0 else float(err == 0)


@torch.no_grad()
def capture_attention_inputs(model: DecoderLM, ids: Tensor) -> list[tuple[Tensor, Tensor]]:
    """(input, positions) of every attention layer (forward order) when ``model`` reads ``ids``."""
    seen: list[tuple[int, Tensor, Tensor]] = []
    hooks = [layer.register_forward_pre_hook(
        lambda mod, args: seen.append((mod.layer_index, args[0].detach(), args[1].positions)))
        for layer in model.attention_layers()]
    was_training = model.training
    try:
        model.eval()
        model(ids)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return [(x, pos) for _, x, pos in sorted(seen, key=lambda item: item[0])]


def input_moment(x: Tensor, bias: bool) -> Tensor:
    """E[x x^T] over all tokens of x (B, T, D), float64; augmented with a constant 1 for biases."""
    flat = x.reshape(-1, x.shape[-1]).double()
    if bias:
        flat = torch.cat([flat, torch.ones_like(flat[:, :1])], 1)
    return flat.T @ flat / flat.shape[0]


def _check_ids(ids: Tensor, cfg: ModelConfig, what: str) -> None:
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"{what} must be token ids shaped (batch, time), got {tuple(ids.shape)} {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
        raise InputError(f"{what} holds token ids outside 0..{cfg.vocab_size - 1}")


# ---------------------------------------------------------------- whole model
@torch.no_grad()
def upcycle(teacher: DecoderLM, plan: SurgeryPlan, calibration: Tensor | None = None,
            *, energy_tokens: Tensor | None = None) -> tuple[DecoderLM, SurgeryReport]:
    """A DBA student initialized from ``teacher`` by ``plan`` (eval mode, teacher dtype/device)
    and its report. ``calibration`` (B, T) token ids weight the factorizations by the real input
    moments and are where energies are measured; without it the weights alone decide (identity
    moment) and energies are measured on ``energy_tokens`` (default: 2 x min(128, block_size)
    seeded random ids). Raises ``ConfigError`` when the plan would not shrink the fp16 KV cache
    of every layer. Every layer's input is held during the call: keep calibration modest."""
    cfg = teacher.config
    specs = _teacher_specs(cfg)
    student_config(cfg, plan)  # validates the plan and the teacher's shape before any work
    for i, spec in enumerate(specs):
        dims = attention_dims(spec, cfg.d_model)
        new = attention_dims(student_attention_config(spec, cfg.d_model, plan), cfg.d_model)
        t_bytes, s_bytes = kv_bytes_per_token_layer(dims, "fp16"), kv_bytes_per_token_layer(new, "fp16")
        if s_bytes >= t_bytes:
            raise ConfigError("plan", f"layer {i}: student KV cache {s_bytes} B/token (fp16) is not below the "
                              f"teacher's {t_bytes}; need sem_head_dim + 2*geo_pairs + v_head_dim < "
                              f"2*head_dim = {2 * dims.key_fields[0].head_dim}", plan)
    device = teacher.embed.weight.device
    if calibration is not None:
        _check_ids(calibration, cfg, "calibration")
        eval_ids = calibration.to(device)
    elif energy_tokens is not None:
        _check_ids(energy_tokens, cfg, "energy_tokens")
        eval_ids = energy_tokens.to(device)
    else:
        gen = torch.Generator().manual_seed(0)
        eval_ids = torch.randint(0, cfg.vocab_size, (2, min(128, cfg.block_size)), generator=gen).to(device)
    inputs = capture_attention_inputs(teacher, eval_ids)
    layers = teacher.attention_layers()
    state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    prefixes = {id(m): name for name, m in teacher.named_modules()}
    reports, freqs = [], []
    for layer, spec, (x, _) in zip(layers, specs, inputs):
        bias = layer.query.bias is not None
        sigma = input_moment(x, bias) if calibration is not None else None
        layer_state, rep, layer_freqs = convert_attention(layer, spec, plan, sigma=sigma, context=eval_ids.shape[1])
        prefix = prefixes[id(layer)]
        state = {k: v for k, v in state.items() if not k.startswith(prefix + ".")}
        dtype = layer.query.weight.dtype
        state |= {f"{prefix}.{k}": v.to(device, dtype) for k, v in layer_state.items()}
        reports.append(rep)
        freqs.append(layer_freqs)
    scfg = student_config(cfg, plan, per_layer_freqs=None if plan.method == "independent_svd" else freqs)
    student = model_from_state(scfg, state, "upcycle").to(device)  # eval mode
    for rep, t_layer, s_layer, (x, pos) in zip(reports, layers, student.attention_layers(), inputs):
        rep.logit_energy = logit_energy(t_layer, s_layer, x, pos)
        rep.energy_captured = min(1.0, max(0.0, rep.logit_energy))
    was_training = teacher.training
    t_logp = torch.log_softmax(teacher.eval()(eval_ids).double(), -1)
    teacher.train(was_training)
    s_logp = torch.log_softmax(student(eval_ids).double(), -1)
    kl = float((t_logp.exp() * (t_logp - s_logp)).sum(-1).mean())
    report = SurgeryReport(
        method=plan.method, plan=plan, layers=reports,
        teacher_kv_bytes=kv_bytes(cfg, [*FORMATS, TEACHER_MIXED_POLICY]),
        student_kv_bytes=kv_bytes(scfg, [*FORMATS, PAPER_DBA_POLICY]),
        calibration_tokens=0 if calibration is None else calibration.numel(),
        energy_tokens=eval_ids.numel(), output_kl=kl)
    return student, report
