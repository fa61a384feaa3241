"""Every attention variant: fused SDPA path vs eager reference vs an independent float64
re-derivation from the paper's formula; causal masking, GQA, null token, tied Q/K, gate, RoPE
only on the geometric path, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from attnlab.config.attention import (
    BottleneckAttentionConfig,
    DecoupledAttentionConfig,
    RopeConfig,
    StandardAttentionConfig,
)
from attnlab.nn.attention import DecoupledAttention, StandardAttention, build_attention
from attnlab.nn.context import ForwardContext

D_MODEL = 48

VARIANTS = {
    "mha": StandardAttentionConfig(num_heads=4),
    "gqa": StandardAttentionConfig(num_heads=6, num_kv_heads=2, bias=True),
    "mqa": StandardAttentionConfig(num_heads=4, num_kv_heads=1),
    "no_rope": StandardAttentionConfig(num_heads=4, rope=None),
    "bottleneck": BottleneckAttentionConfig(num_heads=4, attn_dim=32),
    "dba": DecoupledAttentionConfig(num_heads=4, sem_dim=16, geo_dim=32),
    "dba_gqa_null": DecoupledAttentionConfig(num_heads=4, num_kv_heads=2, sem_dim=8, geo_dim=16, v_dim=24, null_token=True),
    "dba_tied_gate": DecoupledAttentionConfig(num_heads=4, sem_dim=16, geo_dim=16, tie_qk=True, gate=True),
    "dba_all": DecoupledAttentionConfig(num_heads=4, num_kv_heads=4, sem_dim=8, geo_dim=16, null_token=True, tie_qk=True, gate=True, rope=RopeConfig(style="interleaved", theta=50.0)),
    "dba_mqa_gate_null": DecoupledAttentionConfig(num_heads=4, num_kv_heads=1, sem_dim=8, geo_dim=16, null_token=True, gate=True),
}


def make_layer(cfg, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layer = build_attention(cfg, D_MODEL, 0).to(dtype)
    with torch.no_grad():  # non-trivial values everywhere, incl. gates, biases and null token
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
    return layer


def _lin(x, lin):
    return F.linear(x, lin.weight, lin.bias)


def _rope(x, pos, inv_freq, style):
    """x (B, T, heads, d): rotate by angle pos * inv_freq, written out independently."""
    ang = pos.double()[:, None] * inv_freq.double()[None, :]  # (T, d/2)
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    d = x.shape[-1]
    if style == "half":
        a, b = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
    return out


def reference(layer, x, pos):
    """float64 re-derivation: score = sum_f q_f.k_f / sqrt(d_f) (+ null), causal softmax, GQA."""
    dims = layer.dims
    bsz, t_len, _ = x.shape
    h, kv = dims.num_heads, dims.num_kv_heads
    if isinstance(layer, DecoupledAttention):
        ds, dg = (f.head_dim for f in dims.key_fields)
        qs = _lin(x, layer.query_sem).view(bsz, t_len, h, ds)
        ks = qs if layer.key_sem is None else _lin(x, layer.key_sem).view(bsz, t_len, kv, ds)
        qg = _lin(x, layer.query_geo).view(bsz, t_len, h, dg)
        kg = _lin(x, layer.key_geo).view(bsz, t_len, kv, dg)
        inv = layer.rope.inv_freq
        qg, kg = _rope(qg, pos, inv, layer.rope.style), _rope(kg, pos, inv, layer.rope.style)
        if layer.gate is not None:
            g = torch.sigmoid(_lin(x, layer.gate))[..., None]  # (B, T, H, 1)
            qs, qg = qs * 2 * g, qg * 2 * (1 - g)
        q_fields, k_fields = [qs, qg], [ks, kg]
    else:
        hd = dims.key_fields[0].head_dim
        q = _lin(x, layer.query).view(bsz, t_len, h, hd)
        k = _lin(x, layer.key).view(bsz, t_len, kv, hd)
        if layer.rope is not None:
            q, k = _rope(q, pos, layer.rope.inv_freq, layer.rope.style), _rope(k, pos, layer.rope.inv_freq, layer.rope.style)
        q_fields, k_fields = [q], [k]
    v = _lin(x, layer.value).view(bsz, t_len, kv, dims.v_head_dim)
    group = h // kv
    out = torch.zeros(bsz, t_len, h, dims.v_head_dim, dtype=torch.float64)
    for head in range(h):
        g_idx = head // group
        scores = sum(
            (qf[:, :, head] @ kf[:, :, g_idx].transpose(1, 2)) / math.sqrt(qf.shape[-1])
            for qf, kf in zip(q_fields, k_fields))  # (B, T, S)
        scores = scores.masked_fill(torch.ones(t_len, t_len).triu(1).bool(), float("-inf"))
        values = v[:, :, g_idx]  # (B, S, dv)
        if dims.null_token:
            null_scores = sum(
                qf[:, :, head] @ layer.null_keys[f.name][g_idx] / math.sqrt(qf.shape[-1])
                for qf, f in zip(q_fields, dims.key_fields))[..., None]
            scores = torch.cat([null_scores, scores], -1)
            values = torch.cat([layer.null_value[g_idx].expand(bsz, 1, -1), values], 1)
        out[:, :, head] = torch.softmax(scores, -1) @ values
    return _lin(out.reshape(bsz, t_len, -1), layer.out)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fused_and_eager_match_float64_reference(name):
    layer = make_layer(VARIANTS[name])
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    pos = torch.arange(7)
    ref = reference(layer, x, pos)
    for impl in ("fused", "eager"):
        out = layer(x, ForwardContext(pos, attention_impl=impl))
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9, msg=f"{name}/{impl}")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fused_and_eager_gradients_agree(name):
    grads = {}
    for impl in ("fused", "eager"):
        layer = make_layer(VARIANTS[name])
        torch.manual_seed(1)
        x = torch.randn(2, 9, D_MODEL, dtype=torch.float64, requires_grad=True)
        layer(x, ForwardContext(torch.arange(9), attention_impl=impl)).square().sum().backward()
        grads[impl] = {"x": x.grad} | {n: p.grad for n, p in layer.named_parameters()}
    for key, g in grads["fused"].items():
        assert g is not None and torch.isfinite(g).all(), key
        torch.testing.assert_close(g, grads["eager"][key], rtol=1e-9, atol=1e-9, msg=key)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causal_future_tokens_do_not_leak(name):
    layer = make_layer(VARIANTS[name])
    x = torch.randn(1, 8, D_MODEL, dtype=torch.float64)
    y = x.clone()
    y[:, 5:] = torch.randn(1, 3, D_MODEL, dtype=torch.float64)
    ctx = ForwardContext(torch.arange(8))
    a, b = layer(x, ctx), layer(y, ctx)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_rope_only_on_geometric_path():
    layer = make_layer(VARIANTS["dba"])
    x = torch.randn(1, 5, D_MODEL, dtype=torch.float64)
    p0, p1 = layer.project(x, torch.arange(5)), layer.project(x, torch.arange(5) + 11)
    torch.testing.assert_close(p0.q[0], p1.q[0], rtol=0, atol=0)   # q_sem: no position
    torch.testing.assert_close(p0.k[0], p1.k[0], rtol=0, atol=0)   # k_sem: no position
    assert not torch.allclose(p0.k[1], p1.k[1])                    # k_geo: rotated
    # with the geometric path zeroed, the layer is position-blind: permuting history is invisible
    with torch.no_grad():
        layer.query_geo.weight.zero_()
    a = layer(x, ForwardContext(torch.arange(5)))
    b = layer(x[:, [1, 0, 2, 3, 4]], ForwardContext(torch.arange(5)))
    torch.testing.assert_close(a[:, 2:], b[:, 2:], rtol=1e-12, atol=1e-12)


def test_null_token_absorbs_attention_and_keeps_the_fast_causal_call(monkeypatch):
    layer = make_layer(VARIANTS["dba_gqa_null"])
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x = torch.randn(2, 6, D_MODEL, dtype=torch.float64)
    layer(x, ForwardContext(torch.arange(6)))
    assert len(calls) == 1 and calls[0].get("attn_mask") is None and calls[0]["is_causal"] is True
    # a dominant null key makes every query return the null value
    with torch.no_grad():
        for f in layer.dims.key_fields:
            layer.null_keys[f.name].zero_()
        layer.query_geo.weight.zero_()
        layer.query_sem.weight.copy_(torch.zeros_like(layer.query_sem.weight))
        layer.query_sem.bias = None
        layer.null_keys["k_sem"].fill_(1.0)
        layer.query_sem.weight[:, 0] = 1e4
    x = torch.zeros(1, 4, D_MODEL, dtype=torch.float64)
    x[..., 0] = 1.0
    got = layer(x, ForwardContext(torch.arange(4)), )
    group = layer.dims.num_heads // layer.dims.num_kv_heads
    nv = layer.null_value.repeat_interleave(group, 0).reshape(-1)
    torch.testing.assert_close(got[0, -1], F.linear(nv, layer.out.weight, layer.out.bias))


def test_tied_qk_shares_the_semantic_projection():
    tied = make_layer(VARIANTS["dba_tied_gate"])
    assert tied.key_sem is None
    x = torch.randn(1, 3, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        tied.gate.weight.zero_(); tied.gate.bias.zero_()
    p = tied.project(x, torch.arange(3))
    torch.testing.assert_close(p.q[0], p.k[0])
    with pytest.raises(ValueError, match="tie_qk needs num_kv_heads == num_heads"):
        DecoupledAttentionConfig(num_heads=4, num_kv_heads=2, sem_dim=8, geo_dim=8, tie_qk=True)


def test_gate_at_zero_init_is_plain_dba():
    gated = make_layer(DecoupledAttentionConfig(num_heads=4, sem_dim=16, geo_dim=16, gate=True))
    plain = DecoupledAttention(DecoupledAttentionConfig(num_heads=4, sem_dim=16, geo_dim=16), D_MODEL, 0).double()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("gate")})
    with torch.no_grad():
        gated.gate.weight.zero_(); gated.gate.bias.zero_()
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    ctx = ForwardContext(torch.arange(5))
    torch.testing.assert_close(gated(x, ctx), plain(x, ctx))


def test_gqa_equals_mha_with_duplicated_kv_heads():
    gqa = make_layer(StandardAttentionConfig(num_heads=4, num_kv_heads=2))
    mha = StandardAttention(StandardAttentionConfig(num_heads=4), D_MODEL, 0).double()
    hd = gqa.dims.key_fields[0].head_dim
    with torch.no_grad():
        mha.query.weight.copy_(gqa.query.weight)
        mha.out.weight.copy_(gqa.out.weight)
        for name in ("key", "value"):
            w = getattr(gqa, name).weight.view(2, hd, D_MODEL).repeat_interleave(2, 0).reshape(-1, D_MODEL)
            getattr(mha, name).weight.copy_(w)
    x = torch.randn(2, 6, D_MODEL, dtype=torch.float64)
    ctx = ForwardContext(torch.arange(6))
    torch.testing.assert_close(gqa(x, ctx), mha(x, ctx))


def test_bottleneck_projects_below_d_model():
    layer = make_layer(VARIANTS["bottleneck"])
    assert layer.query.weight.shape == (32, D_MODEL) and layer.dims.key_fields[0].head_dim == 8
