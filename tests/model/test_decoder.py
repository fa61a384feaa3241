import pytest
import torch

from attnlab.config import ModelConfig
from attnlab.model import build_model
from attnlab.model.topology import Block, Parallel, Residual
from attnlab.nn.attention import DecoupledAttention, StandardAttention

V, D, L = 100, 64, 2


def cfg(attention, **kw):
    base = {"vocab_size": V, "d_model": D, "block_size": 32, "num_layers": L, "attention": attention}
    base.update(kw)
    return ModelConfig.model_validate(base)


def test_param_count_standard_gqa_by_hand():
    h, kv, hd = 4, 2, D // 4
    d_ff = 192  # swiglu default: 8/3 * 64 = 170 -> next multiple of 64
    attn = D * h * hd + 2 * D * kv * hd + h * hd * D
    mlp = 3 * D * d_ff
    per_layer = attn + mlp + 2 * D  # two RMSNorm weights
    tied = V * D + L * per_layer + D
    model = build_model(cfg({"type": "standard", "num_heads": h, "num_kv_heads": kv}))
    assert model.num_parameters() == tied
    untied = build_model(cfg({"type": "standard", "num_heads": h, "num_kv_heads": kv}, tie_embeddings=False))
    assert untied.num_parameters() == tied + V * D
    assert model.num_parameters(exclude_embedding=True) == tied - V * D


def test_param_count_dba_with_every_option_by_hand():
    h, kv, sem, geo, v_dim = 4, 2, 16, 32, 40
    att = {"type": "decoupled", "num_heads": h, "num_kv_heads": kv, "sem_dim": sem, "geo_dim": geo,
           "v_dim": v_dim, "null_token": True, "gate": True}
    sd, gd, vd = sem // h, geo // h, v_dim // h
    attn = D * sem + D * kv * sd + D * geo + D * kv * gd + D * kv * vd + v_dim * D
    null = kv * (sd + gd + vd)
    gate = D * h + h
    gelu_mlp = 2 * D * 4 * D + 4 * D + D  # with biases
    per_layer = attn + null + gate + gelu_mlp + 2 * 2 * D  # LayerNorm: weight + bias, twice
    expected = V * D + L * per_layer + 2 * D
    model = build_model(cfg(att, norm="layernorm", mlp={"type": "gelu", "bias": True}))
    assert model.num_parameters() == expected


def test_tied_qk_removes_the_key_projection():
    att = {"type": "decoupled", "num_heads": 4, "sem_dim": 16, "geo_dim": 16}
    untied = build_model(cfg(att)).num_parameters()
    tied = build_model(cfg(att | {"tie_qk": True})).num_parameters()
    assert untied - tied == L * D * 16


def test_hybrid_stack_every_fourth_layer_standard():
    model = build_model(cfg({"type": "decoupled", "num_heads": 4, "sem_dim": 16, "geo_dim": 32}, num_layers=8,
                            layer_overrides=[{"every": 4, "offset": 3, "attention": {"type": "standard", "num_heads": 4}},
                                             {"layers": [0], "mlp": {"type": "gelu"}}]))
    kinds = [type(a).__name__ for a in model.attention_layers()]
    assert kinds == ["DecoupledAttention"] * 3 + ["StandardAttention"] + ["DecoupledAttention"] * 3 + ["StandardAttention"]
    assert [a.layer_index for a in model.attention_layers()] == list(range(8))
    assert type(model.body.layers[0].mlp).__name__ == "GeluMLP"
    assert type(model.body.layers[1].mlp).__name__ == "SwiGLU"


def test_topology_tree_builds_and_numbers_attention_layers():
    topology = {"type": "sequential", "children": [
        {"type": "repeat", "count": 2, "body": {"type": "block"}},
        {"type": "residual", "children": [  # GPT-J style parallel block
            {"type": "norm"},
            {"type": "parallel", "children": [
                {"type": "attention", "attention": {"type": "standard", "num_heads": 2}},
                {"type": "mlp", "mlp": {"type": "gelu"}}]}]},
    ]}
    c = ModelConfig.model_validate({"vocab_size": V, "d_model": D, "block_size": 32, "topology": topology,
                                    "attention": {"type": "decoupled", "num_heads": 4, "sem_dim": 16, "geo_dim": 32}})
    model = build_model(c)
    layers = model.attention_layers()
    assert [type(a) for a in layers] == [DecoupledAttention, DecoupledAttention, StandardAttention]
    assert [a.layer_index for a in layers] == [0, 1, 2]
    assert len(c.attention_specs()) == 3
    assert any(isinstance(m, Parallel) for m in model.modules()) and any(isinstance(m, Residual) for m in model.modules())
    assert sum(isinstance(m, Block) for m in model.modules()) == 2
    x = torch.randint(0, V, (2, 10))
    torch.testing.assert_close(model(x), model(x, attention_impl="eager"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("att", [
    {"type": "standard", "num_heads": 4, "num_kv_heads": 1},
    {"type": "bottleneck", "num_heads": 4, "attn_dim": 32},
    {"type": "decoupled", "num_heads": 4, "num_kv_heads": 2, "sem_dim": 8, "geo_dim": 16, "null_token": True, "gate": True},
])
def test_model_fused_equals_eager_and_is_causal(att):
    torch.manual_seed(0)
    model = build_model(cfg(att)).double()
    x = torch.randint(0, V, (3, 20))
    logits = model(x)
    assert logits.shape == (3, 20, V)
    torch.testing.assert_close(logits, model(x, attention_impl="eager"), rtol=1e-10, atol=1e-10)
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 1) % V
    torch.testing.assert_close(model(y)[:, :12], logits[:, :12], rtol=0, atol=1e-12)


def test_tied_head_shares_storage_and_block_size_is_enforced():
    model = build_model(cfg({"type": "standard", "num_heads": 4}))
    assert model.lm_head.weight is model.embed.weight
    with pytest.raises(ValueError, match="exceed block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_init_is_deterministic_under_seed():
    c = cfg({"type": "decoupled", "num_heads": 4, "sem_dim": 16, "geo_dim": 32, "null_token": True})
    torch.manual_seed(3)
    a = build_model(c).state_dict()
    torch.manual_seed(3)
    b = build_model(c).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_backward_reaches_every_parameter():
    model = build_model(cfg({"type": "decoupled", "num_heads": 4, "num_kv_heads": 2, "sem_dim": 8,
                             "geo_dim": 16, "null_token": True, "gate": True}))
    x = torch.randint(0, V, (2, 12))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
