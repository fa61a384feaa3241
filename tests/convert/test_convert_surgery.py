"""Standard -> DBA surgery (attnlab.convert.surgery / factorize), float64 on tiny models:
the shared-key factorization against a brute-force stacked SVD, exact reproduction of the
teacher where the construction allows it (all pairs geometric; zero-frequency low-rank rest
pairs), pair selection, GQA sharing, V/O, energy ordering against the seed's independent SVD,
KV-cache accounting and the calibration path."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch

from attnlab import build_model
from attnlab.config.model import ModelConfig
from attnlab.convert.common import interleaved_to_half
from attnlab.convert.factorize import pair_rows, shared_right_factor, svd_band
from attnlab.convert.surgery import (
    SurgeryPlan,
    attention_logits,
    logit_energy,
    student_config,
    upcycle,
    upcycle_attention,
)
from attnlab.errors import ConfigError, InputError
from attnlab.nn.context import ForwardContext
from attnlab.nn.rope import rope_inv_freq

VOCAB = 61
LLAMA3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position": 16}


def _cfg(style="half", kv=2, *, heads=4, d_model=32, head_dim=None, bias=False, inv_freq=None, scaling=None,
         layers=2) -> ModelConfig:
    rope = {"style": style}
    if inv_freq is not None:
        rope["inv_freq"] = inv_freq
    if scaling is not None:
        rope["scaling"] = scaling
    attn = {"type": "standard", "num_heads": heads, "num_kv_heads": kv, "bias": bias, "rope": rope}
    if head_dim is not None:
        attn["head_dim"] = head_dim
    return ModelConfig.model_validate({"vocab_size": VOCAB, "d_model": d_model, "block_size": 64,
                                       "num_layers": layers, "attention": attn, "tie_embeddings": False})


def _teacher(cfg: ModelConfig, seed: int = 0):
    """float64 model with weights large enough that wiring mistakes show; norm gains off 1."""
    model = build_model(cfg).double().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _ids(seed=0, batch=2, length=24):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hidden(seed=0, batch=2, length=12, d_model=32):
    return torch.randn(batch, length, d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _boost_pairs(model, layer: int, pairs_per_kv: list[list[int]], factor: float = 8.0) -> None:
    """Scale the q rows (every head of the group) and k rows of the given pairs: they dominate."""
    attn = model.body.layers[layer].attention
    h, kv = attn.dims.num_heads, attn.dims.num_kv_heads
    d = attn.dims.key_fields[0].head_dim
    style = model.config.attention_specs()[layer].rope.style
    with torch.no_grad():
        for g, pairs in enumerate(pairs_per_kv):
            rows = pair_rows(style, d, pairs)
            attn.key.weight[[g * d + r for r in rows]] *= factor
            for hh in range(g * (h // kv), (g + 1) * (h // kv)):
                attn.query.weight[[hh * d + r for r in rows]] *= factor


# ---------------------------------------------------------------- the factorization
@pytest.mark.parametrize("rank", [1, 3, 6])
@pytest.mark.parametrize("weighted", [False, True])
def test_shared_factor_is_the_stacked_svd_optimum(rank, weighted):
    """sum_h ||Sl^1/2 (Q_h^T K - A_h^T C) Sr^1/2||^2 of the cheap m x m solution equals the
    brute-force optimum (tail of the stacked [M_h] singular values), C Sr^1/2 spans the top
    right singular subspace, and the reported eigenvalues are the squared singular values."""
    gen = torch.Generator().manual_seed(rank)
    m, d_l, d_r, heads = 6, 9, 8, 3
    qs = [torch.randn(m, d_l, generator=gen, dtype=torch.float64) for _ in range(heads)]
    k = torch.randn(m, d_r, generator=gen, dtype=torch.float64)

    def spd(n):
        a = torch.randn(n, n + 3, generator=gen, dtype=torch.float64)
        return a @ a.T / n

    sl, sr = (spd(d_l), spd(d_r)) if weighted else (torch.eye(d_l, dtype=torch.float64), torch.eye(d_r, dtype=torch.float64))
    fac = shared_right_factor(qs, k, rank, sigma_right=sr if weighted else None, sigma_left=sl if weighted else None)

    def sqrtm(s):
        w, v = torch.linalg.eigh(s)
        return (v * w.clamp_min(0).sqrt()) @ v.T

    hl, hr = sqrtm(sl), sqrtm(sr)
    stacked = torch.cat([hl @ q.T @ k @ hr for q in qs])
    _, sv, vh = torch.linalg.svd(stacked)
    residual = sum(float((hl @ (q.T @ k - a.T @ fac.C) @ hr).pow(2).sum()) for q, a in zip(qs, fac.A))
    assert residual == pytest.approx(float(sv[rank:].pow(2).sum()), rel=1e-9, abs=1e-9)
    assert torch.allclose(fac.eigvals[: sv.numel()], sv.pow(2)[: fac.eigvals.numel()], rtol=1e-9, atol=1e-9)
    basis = torch.linalg.qr((fac.C @ hr).T).Q  # (d_r, rank)
    top = vh[:rank].T
    assert torch.allclose(basis @ basis.T, top @ top.T, atol=1e-9)
    assert 0 < fac.energy_kept <= 1


def test_shared_factor_is_exact_at_the_key_rank():
    """A rank-2 key block is reproduced exactly at rank 2; extra rank rows stay zero."""
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(6, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 7, generator=gen, dtype=torch.float64)
    qs = [torch.randn(6, 7, generator=gen, dtype=torch.float64) for _ in range(2)]
    fac = shared_right_factor(qs, k, 4)
    for q, a in zip(qs, fac.A):
        assert torch.allclose(a.T @ fac.C, q.T @ k, atol=1e-10)
    assert fac.C[2:].abs().max() == 0 and fac.energy_kept == pytest.approx(1.0)


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("kv,bias", [(4, False), (2, False), (1, True)])
def test_all_pairs_geometric_reproduces_the_layer(style, kv, bias):
    """geo_pairs = head_dim/2 (semantic path empty): logits equal the teacher's at far-off
    positions, and so do the attention outputs (V/O copied, GQA intact)."""
    teacher = _teacher(_cfg(style, kv, bias=bias))
    layer, spec = teacher.body.layers[1].attention, teacher.config.attention_specs()[1]
    student, rep = upcycle_attention(layer, spec, SurgeryPlan(sem_head_dim=1, geo_pairs=4), context=16)
    x = _hidden()
    pos = torch.arange(5000, 5012)
    assert torch.allclose(attention_logits(student, x, pos), attention_logits(layer, x, pos), atol=1e-10)
    ctx = ForwardContext(positions=pos, attention_impl="eager")
    assert torch.allclose(student(x, ctx), layer(x, ctx), atol=1e-10)
    assert logit_energy(layer, student, x, pos) == pytest.approx(1.0, abs=1e-12)
    assert rep.kept_pairs == [[0, 1, 2, 3]] * kv


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_kept_pairs_reproduce_their_part_of_the_logit_exactly(style):
    """With the semantic path zeroed, the student's logits equal those of a teacher whose
    non-kept pair rows are zeroed, at every position: right rows, layout, frequency, scale."""
    cfg = _cfg(style, 2, head_dim=16, scaling=LLAMA3)
    teacher = _teacher(cfg)
    _boost_pairs(teacher, 0, [[1, 6], [3, 7]])
    layer, spec = teacher.body.layers[0].attention, cfg.attention_specs()[0]
    plan = SurgeryPlan(sem_head_dim=2, geo_pairs=2, pair_score="energy", sem_target="zero_rotation")
    student, rep = upcycle_attention(layer, spec, plan)
    assert rep.kept_pairs == [[1, 6], [3, 7]]
    with torch.no_grad():
        student.query_sem.weight.zero_()
        partial = copy.deepcopy(layer)
        for g, kept in enumerate(rep.kept_pairs):
            drop = [r for r in range(16) if r not in pair_rows(style, 16, kept)]
            partial.key.weight[[g * 16 + r for r in drop]] = 0
            for hh in (2 * g, 2 * g + 1):
                partial.query.weight[[hh * 16 + r for r in drop]] = 0
    x, pos = _hidden(1), torch.arange(37, 37 * 13, 37)
    assert torch.allclose(attention_logits(student, x, pos), attention_logits(partial, x, pos), atol=1e-10)


def _zero_freq_low_rank_teacher(style, kv, bias, seed=0):
    """Pairs 2, 3 of each head rotate at frequency 0 (exactly position independent) and their
    key rows are rank 1 per kv head (weights and biases), so a rank-1 semantic path reproduces
    them exactly; pairs 0, 1 (nonzero frequencies) go to the geometric path."""
    cfg = _cfg(style, kv, bias=bias, inv_freq=[1.0, 0.25, 0.0, 0.0])
    teacher = _teacher(cfg, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    rest = pair_rows(style, 8, [2, 3])
    with torch.no_grad():
        for attn in teacher.attention_layers():
            for g in range(kv):
                u = torch.randn(33, generator=gen, dtype=torch.float64)
                for r in rest:
                    a = float(torch.randn((), generator=gen, dtype=torch.float64))
                    attn.key.weight[g * 8 + r] = a * u[:32]
                    if bias:
                        attn.key.bias[g * 8 + r] = a * u[32]
    return teacher


@pytest.mark.parametrize("style,kv,bias", [("half", 4, False), ("half", 2, False), ("interleaved", 2, False),
                                           ("interleaved", 1, True)])
@pytest.mark.parametrize("calibrated", [False, True])
def test_full_student_reproduces_teacher_logits(style, kv, bias, calibrated):
    """Clean exact construction (see ``_zero_freq_low_rank_teacher``): sem_head_dim=1,
    geo_pairs=2 of 4 shrinks the cache (1 + 4 + 8 < 16 per kv head), and the whole student's
    logits equal the teacher's to 1e-8 with and without calibration."""
    teacher = _zero_freq_low_rank_teacher(style, kv, bias)
    ids = _ids(1, 4, 24)
    student, report = upcycle(teacher, SurgeryPlan(sem_head_dim=1, geo_pairs=2), ids if calibrated else None)
    with torch.no_grad():
        diff = (student(ids) - teacher(ids)).abs().max().item()
    assert diff <= 1e-8
    assert all(r.kept_pairs == [[0, 1]] * kv for r in report.layers)
    assert all(r.kept_freqs == [[1.0, 0.25]] * kv for r in report.layers)
    assert all(r.energy_captured == pytest.approx(1.0, abs=1e-10) for r in report.layers)
    assert report.output_kl == pytest.approx(0.0, abs=1e-10)
    assert student.config.attention_specs()[0].rope.inv_freq == [[1.0, 0.25]] * kv


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_mean_rotation_target_is_the_average_over_causal_pairs(style):
    """A constant input makes each rest-pair logit a function of the distance only; the
    semantic path (full rank) then equals its average over the causal pairs of the context."""
    teacher = _teacher(_cfg(style, 2))
    layer, spec = teacher.body.layers[0].attention, teacher.config.attention_specs()[0]
    plan = SurgeryPlan(sem_head_dim=6, geo_pairs=1, context=10)
    student, rep = upcycle_attention(layer, spec, plan)
    with torch.no_grad():
        student.query_geo.weight.zero_()
        rest_only = copy.deepcopy(layer)
        for g, kept in enumerate(rep.kept_pairs):
            rows = pair_rows(style, 8, kept)
            rest_only.key.weight[[g * 8 + r for r in rows]] = 0
    x = _hidden(2, 1, 1).expand(1, 10, 32)
    pos = torch.arange(10)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    teacher_mean = attention_logits(rest_only, x, pos)[..., causal].mean(-1)  # (1, H)
    sem = attention_logits(student, x, pos)[..., causal]
    assert torch.allclose(sem, teacher_mean[..., None].expand_as(sem), atol=1e-10)


def test_interleaved_and_half_teachers_give_the_same_student():
    """Permuting an interleaved teacher to the half layout changes no logit; the surgery must
    then keep the same pairs and capture the same energy."""
    inter = _teacher(_cfg("interleaved", 2), seed=3)
    half = _teacher(_cfg("half", 2), seed=3)
    with torch.no_grad():
        for a, b in zip(inter.attention_layers(), half.attention_layers()):
            b.query.weight.copy_(interleaved_to_half(a.query.weight, 4))
            b.key.weight.copy_(interleaved_to_half(a.key.weight, 2))
    ids = _ids(2)
    assert torch.allclose(inter(ids), half(ids), atol=1e-10)
    plan = SurgeryPlan(sem_head_dim=2, geo_pairs=2)
    ri, rh = upcycle(inter, plan, ids)[1], upcycle(half, plan, ids)[1]
    assert [r.kept_pairs for r in ri.layers] == [r.kept_pairs for r in rh.layers]
    for a, b in zip(ri.layers, rh.layers):
        assert a.logit_energy == pytest.approx(b.logit_energy, abs=1e-9)


# ---------------------------------------------------------------- selection, GQA, values
def test_selection_keeps_the_dominant_pairs_with_scaled_teacher_frequencies():
    cfg = _cfg("half", 2, head_dim=16, scaling=LLAMA3)
    teacher = _teacher(cfg)
    _boost_pairs(teacher, 1, [[0, 5], [2, 7]])
    _, report = upcycle(teacher, SurgeryPlan(sem_head_dim=2, geo_pairs=2, pair_score="energy"))
    assert report.layers[1].kept_pairs == [[0, 5], [2, 7]]
    freqs = rope_inv_freq(cfg.attention.rope, 16)
    unscaled = rope_inv_freq(cfg.attention.rope.model_copy(update={"scaling": None}), 16)
    assert freqs[7] != unscaled[7]  # llama3 scaling acts on the pairs kept here
    assert report.layers[1].kept_freqs == [[float(freqs[0]), float(freqs[5])], [float(freqs[2]), float(freqs[7])]]
    assert report.layers[1].geo_energy_share > 0.9


def test_positional_score_leaves_frequency_zero_pairs_to_the_semantic_path():
    """A dominant pair that never rotates is position-free: the positional score keeps the
    rotating pairs instead, the plain energy score keeps it."""
    teacher = _teacher(_cfg("half", 2, inv_freq=[1.0, 0.5, 0.1, 0.0]))
    _boost_pairs(teacher, 0, [[3], [3]], factor=20.0)
    kept = lambda score: upcycle(teacher, SurgeryPlan(2, 2, pair_score=score))[1].layers[0].kept_pairs
    assert all(3 in pairs for pairs in kept("energy"))
    assert all(3 not in pairs for pairs in kept("positional"))


def test_gqa_groups_share_key_rows_and_values_are_copied():
    cfg = _cfg("interleaved", 2, heads=6, d_model=48)  # head_dim 8, groups of 3 query heads
    teacher = _teacher(cfg)
    student, report = upcycle(teacher, SurgeryPlan(sem_head_dim=2, geo_pairs=2), _ids())
    for t, s, rep in zip(teacher.attention_layers(), student.attention_layers(), report.layers):
        assert s.key_geo.weight.shape == (2 * 4, 48) and s.key_sem.weight.shape == (2 * 2, 48)
        for g, kept in enumerate(rep.kept_pairs):
            rows = pair_rows("interleaved", 8, kept)
            assert torch.equal(s.key_geo.weight[g * 4:(g + 1) * 4], t.key.weight[[g * 8 + r for r in rows]])
            for hh in range(3 * g, 3 * g + 3):
                expect = t.query.weight[[hh * 8 + r for r in rows]] * (4 / 8) ** 0.5
                assert torch.allclose(s.query_geo.weight[hh * 4:(hh + 1) * 4], expect, atol=1e-15)
        assert torch.equal(s.value.weight, t.value.weight) and torch.equal(s.out.weight, t.out.weight)
    # everything outside attention is the teacher's
    for name, p in teacher.state_dict().items():
        if ".attention." not in name:
            assert torch.equal(student.state_dict()[name], p), name


@pytest.mark.parametrize("kv", [2, 1])
def test_full_rank_values_are_exact_and_low_rank_values_lose_energy(kv):
    teacher = _teacher(_cfg("half", kv, bias=True))
    layer, spec = teacher.body.layers[0].attention, teacher.config.attention_specs()[0]
    x, pos = _hidden(3), torch.arange(12)
    ctx = ForwardContext(positions=pos, attention_impl="eager")
    student, rep = upcycle_attention(layer, spec, SurgeryPlan(1, 4, v_rank=8), context=12)
    assert torch.allclose(student(x, ctx), layer(x, ctx), atol=1e-10)
    assert all(e == pytest.approx(1.0) for e in rep.v_energy_kept)
    _, rep = upcycle_attention(layer, spec, SurgeryPlan(1, 4, v_rank=3), context=12)
    assert all(0 < e < 1 for e in rep.v_energy_kept)


# ---------------------------------------------------------------- energy
def test_rope_aware_beats_the_seeds_independent_svd_and_grows_with_the_budget():
    cfg = _cfg("half", 2, head_dim=16)
    teacher = _teacher(cfg, seed=5)
    for layer in range(2):
        _boost_pairs(teacher, layer, [[1, 4], [0, 6]], factor=3.0)
    ids = _ids(4, 4, 32)

    def energies(plan):
        return [r.energy_captured for r in upcycle(teacher, plan, ids)[1].layers]

    aware = energies(SurgeryPlan(sem_head_dim=2, geo_pairs=2))
    seed = energies(SurgeryPlan(sem_head_dim=2, geo_pairs=2, method="independent_svd"))
    assert all(0.0 <= e <= 1.0 for e in aware + seed)
    assert all(a > s + 0.3 for a, s in zip(aware, seed)), (aware, seed)
    by_geo = [energies(SurgeryPlan(sem_head_dim=2, geo_pairs=g)) for g in (1, 2, 3, 5)]
    by_sem = [energies(SurgeryPlan(sem_head_dim=s, geo_pairs=2)) for s in (1, 2, 4, 8)]
    for series in (by_geo, by_sem):
        for lower, higher in itertools.pairwise(series):
            assert all(b >= a - 1e-12 for a, b in zip(lower, higher)), series


def test_independent_svd_is_the_seed_recipe():
    teacher = _teacher(_cfg("half", 4))
    student, report = upcycle(teacher, SurgeryPlan(2, 2, method="independent_svd"))
    t, s = teacher.body.layers[0].attention, student.body.layers[0].attention
    assert torch.allclose(s.query_sem.weight, svd_band(t.query.weight, 0, 8, 8), atol=1e-12)
    assert torch.allclose(s.key_geo.weight, svd_band(t.key.weight, 8, 16, 16), atol=1e-12)
    assert report.layers[0].kept_pairs == [] and report.layers[0].geo_energy_share is None
    assert student.config.attention_specs()[0].rope.inv_freq is None


def test_calibration_path():
    teacher = _teacher(_cfg("interleaved", 2), seed=7)
    ids = _ids(5, 3, 40)
    plan = SurgeryPlan(sem_head_dim=2, geo_pairs=2)
    _, calibrated = upcycle(teacher, plan, ids)
    _, weights_only = upcycle(teacher, plan, energy_tokens=ids)
    assert calibrated.calibration_tokens == 120 and weights_only.calibration_tokens == 0
    assert calibrated.energy_tokens == weights_only.energy_tokens == 120
    assert all(0 <= r.energy_captured <= 1 for r in calibrated.layers)
    assert sum(r.logit_energy for r in calibrated.layers) > sum(r.logit_energy for r in weights_only.layers)
    with pytest.raises(InputError):
        upcycle(teacher, plan, torch.full((2, 8), VOCAB))
    with pytest.raises(InputError):
        upcycle(teacher, plan, torch.zeros(16, dtype=torch.long))


# ---------------------------------------------------------------- KV cache and errors
def test_kv_bytes_and_plans_that_do_not_shrink_the_cache():
    teacher = _teacher(_cfg("half", 2, head_dim=16))
    _, report = upcycle(teacher, SurgeryPlan(sem_head_dim=4, geo_pairs=4))
    kv, layers = 2, 2
    assert report.teacher_kv_bytes["fp16"] == layers * 2 * kv * (16 + 16)
    assert report.student_kv_bytes["fp16"] == layers * 2 * kv * (4 + 8 + 16)
    assert set(report.student_kv_bytes) == {"fp16", "q8_0", "q4_0", "k_sem=q4_0,k_geo=q8_0,v=q4_0"}
    assert set(report.teacher_kv_bytes) == {"fp16", "q8_0", "q4_0", "k=q8_0,v=q4_0"}
    for plan in (SurgeryPlan(sem_head_dim=2, geo_pairs=7), SurgeryPlan(sem_head_dim=1, geo_pairs=8)):
        with pytest.raises(ConfigError, match="not below") as err:
            upcycle(teacher, plan)
        assert "\n" not in str(err.value)
    upcycle(teacher, SurgeryPlan(sem_head_dim=4, geo_pairs=8, v_rank=8))  # values pay for it
    with pytest.raises(ConfigError, match="geo_pairs"):
        upcycle(teacher, SurgeryPlan(sem_head_dim=1, geo_pairs=9))


def test_student_config_rejects_teachers_it_cannot_convert():
    dba = ModelConfig.model_validate({"vocab_size": VOCAB, "d_model": 32, "block_size": 64, "num_layers": 1,
                                      "attention": {"type": "decoupled", "num_heads": 4, "sem_dim": 8, "geo_dim": 16}})
    with pytest.raises(ConfigError, match="standard attention"):
        student_config(dba, SurgeryPlan(1, 1))
    no_rope = _cfg().model_copy(update={"attention": _cfg().attention.model_copy(update={"rope": None})})
    with pytest.raises(ConfigError, match="RoPE"):
        student_config(no_rope, SurgeryPlan(1, 1))


STORIES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "models" / "stories260K.bin"


@pytest.mark.skipif(not STORIES.is_file(), reason=f"shared reference data absent ({STORIES} not found)")
def test_real_trained_teacher_float32():
    """stories260K (trained, GQA 8/4, interleaved RoPE, head_dim 8), float32 as loaded: every
    layer's init keeps far more logit energy than the seed's, and the position-aware defaults
    beat the plain energy score with a rotation-0 semantic target."""
    from attnlab.convert import load_llama2c

    teacher = load_llama2c(STORIES)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))

    def energies(**kw):
        student, report = upcycle(teacher, SurgeryPlan(sem_head_dim=2, geo_pairs=2, **kw), ids)
        assert student.embed.weight.dtype == torch.float32
        return [r.logit_energy for r in report.layers]

    default = energies()
    literal = energies(pair_score="energy", sem_target="zero_rotation")
    seed = energies(method="independent_svd")
    assert all(d > lit > s for d, lit, s in zip(default, literal, seed)), (default, literal, seed)


def test_student_config_keeps_mlp_overrides_and_per_layer_heads():
    cfg = ModelConfig.model_validate({
        "vocab_size": VOCAB, "d_model": 32, "block_size": 64, "num_layers": 3,
        "attention": {"type": "standard", "num_heads": 4, "num_kv_heads": 2},
        "layer_overrides": [{"layers": [1], "mlp": {"type": "gelu"}},
                            {"layers": [2], "attention": {"type": "standard", "num_heads": 4, "head_dim": 16}}]})
    student, report = upcycle(_teacher(cfg), SurgeryPlan(sem_head_dim=2, geo_pairs=2))
    specs = student.config.attention_specs()
    assert [s.type for s in specs] == ["decoupled"] * 3
    assert [(s.kv_heads, s.v_dim, s.geo_dim) for s in specs] == [(2, 32, 16), (2, 32, 16), (4, 64, 16)]
    assert student.config.mlp_for_layer(1).type == "gelu" and student.config.mlp_for_layer(0).type == "swiglu"
    assert [len(r.kept_pairs) for r in report.layers] == [2, 2, 4]


def test_teacher_with_per_kv_head_frequencies():
    """A teacher whose kv heads rotate at their own frequencies (RopeConfig.inv_freq lists):
    each student group keeps its own head's frequencies, and keeping all pairs is exact."""
    lists = [[1.0, 0.5, 0.1, 0.01], [0.9, 0.3, 0.05, 0.002]]
    teacher = _teacher(_cfg("interleaved", 2, inv_freq=lists))
    layer, spec = teacher.body.layers[0].attention, teacher.config.attention_specs()[0]
    student, rep = upcycle_attention(layer, spec, SurgeryPlan(sem_head_dim=1, geo_pairs=4), context=8)
    assert rep.kept_freqs == lists
    x, pos = _hidden(4), torch.arange(300, 312)
    assert torch.allclose(attention_logits(student, x, pos), attention_logits(layer, x, pos), atol=1e-10)
    _, rep = upcycle_attention(layer, spec, SurgeryPlan(sem_head_dim=1, geo_pairs=2), context=8)
    assert rep.kept_freqs == [[lists[g][i] for i in rep.kept_pairs[g]] for g in range(2)]
