import math

import pytest
import torch

from attnlab.model import build_model
from attnlab.train.optim import build_optimizer, classify_parameters, param_groups
from attnlab.train.schedule import lr_at
from train_helpers import model_config, train_config


def _decayed_names(model, cfg) -> set[str]:
    groups = param_groups(model, cfg)
    ids = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_only_linear_weights_decay_by_default():
    model = build_model(model_config(attention={"type": "decoupled", "num_heads": 4, "sem_dim": 16,
                                                "geo_dim": 16, "null_token": True, "gate": True,
                                                "bias": True}))
    cfg = train_config(weight_decay=0.1)
    decayed = _decayed_names(model, cfg)
    roles = classify_parameters(model)
    assert decayed == {n for n, r in roles.items() if r == "linear"}
    assert "embed.weight" not in decayed and "final_norm.weight" not in decayed
    assert not any(n.endswith(".bias") for n in decayed)
    assert not any("null" in n for n in decayed)
    assert "body.layers.0.attention.query_sem.weight" in decayed
    assert "body.layers.0.mlp.down.weight" in decayed


def test_tied_weights_appear_once_and_count_as_embedding():
    model = build_model(model_config(tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight
    groups = param_groups(model, train_config())
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params})
    assert {id(p) for p in all_params} == {id(p) for p in model.parameters()}
    assert classify_parameters(model)["embed.weight"] == "embedding"
    assert "lm_head.weight" not in classify_parameters(model)  # same tensor, named once


def test_decay_norms_and_embeddings_flag():
    model = build_model(model_config(tie_embeddings=False, norm="layernorm"))
    decayed = _decayed_names(model, train_config(decay_norms_and_embeddings=True))
    assert {"embed.weight", "final_norm.weight", "lm_head.weight"} <= decayed
    assert "final_norm.bias" not in decayed
    untied = _decayed_names(model, train_config())
    assert "lm_head.weight" in untied and "embed.weight" not in untied


def test_build_optimizer_settings():
    model = build_model(model_config())
    cfg = train_config(lr=1e-3, betas=[0.8, 0.9], eps=1e-7, weight_decay=0.05)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-7
    assert not opt.defaults.get("fused")  # CPU parameters


def test_schedule_endpoints():
    cfg = train_config(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)  # cosine midpoint
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_schedule_without_warmup_and_degenerate():
    cfg = train_config(steps=4, warmup_steps=0, lr=2.0, min_lr_ratio=0.0)
    assert lr_at(0, cfg) == 2.0 and lr_at(4, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(2, cfg) == pytest.approx(1.0)
    full = train_config(steps=3, warmup_steps=3, lr=1.0, min_lr_ratio=0.5)
    assert [lr_at(s, full) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lr_at(3, full) == pytest.approx(0.5)
    assert not math.isnan(lr_at(3, full))
