"""Typed configs refuse non-finite floats, integers beyond int64 and absurd sizes at validation,
fast and with a one-line ConfigError naming the key (issue 11)."""

import math
import time

import pytest

from attnlab.config.attention import RopeConfig, StandardAttentionConfig
from attnlab.config.base import validate_section
from attnlab.config.bench import validate_benchmarks
from attnlab.config.data import DataConfig
from attnlab.config.limits import Limits, default_limits
from attnlab.config.model import ModelConfig, estimate_parameters
from attnlab.config.train import TrainConfig
from attnlab.config.upcycle import DistillConfig
from attnlab.config.verify import VerifyConfig
from attnlab.errors import ConfigError

MODEL = {"vocab_size": 256, "d_model": 64, "num_layers": 2, "block_size": 64,
         "attention": {"type": "standard", "num_heads": 4}}
INF, NAN = float("inf"), float("nan")


def _error(cls, data, prefix="x", context=None) -> str:
    start = time.perf_counter()
    with pytest.raises(ConfigError) as exc:
        validate_section(cls, data, prefix, context)
    assert time.perf_counter() - start < 2.0
    text = str(exc.value)
    assert "\n" not in text
    return text


def _model(**changes):
    out = {**MODEL, **changes}
    return {k: v for k, v in out.items() if v is not None}


# ------------------------------------------------------------------ finite floats
@pytest.mark.parametrize("key", ["lr", "weight_decay", "grad_clip", "eps", "min_lr_ratio"])
@pytest.mark.parametrize("bad", [INF, -INF, NAN])
def test_train_floats_must_be_finite(key, bad):
    text = _error(TrainConfig, {"steps": 10, key: bad}, "train")
    assert text.startswith(f"train.{key}: must be a finite number")


def test_betas_items_must_be_finite():
    assert _error(TrainConfig, {"steps": 1, "betas": [0.9, NAN]}, "train").startswith("train.betas[1]: must be a finite")


@pytest.mark.parametrize("key", ["init_std", "norm_eps", "dropout"])
def test_model_floats_must_be_finite(key):
    assert _error(ModelConfig, _model(**{key: INF}), "model").startswith(f"model.{key}: must be a finite number")


def test_rope_theta_and_inv_freq_must_be_finite():
    attn = {"type": "standard", "num_heads": 4, "rope": {"theta": INF}}
    assert _error(ModelConfig, _model(attention=attn), "model").startswith("model.attention.rope.theta: must be a finite")
    flat = {"type": "standard", "num_heads": 4, "rope": {"inv_freq": [1.0] * 3 + [NAN] + [1.0] * 4}}
    assert _error(ModelConfig, _model(attention=flat), "model").startswith(
        "model.attention.rope.inv_freq[3]: must be a finite number")
    per_head = {"type": "standard", "num_heads": 4, "rope": {"inv_freq": [[1.0] * 8] * 3 + [[1.0] * 7 + [-INF]]}}
    assert _error(ModelConfig, _model(attention=per_head), "model").startswith(
        "model.attention.rope.inv_freq[3][7]: must be a finite number")
    # finite values still pass
    RopeConfig.model_validate({"inv_freq": [0.5, 0.25]})


def test_other_sections_floats_must_be_finite():
    assert "finite" in _error(DataConfig, {"val_fraction": NAN}, "data")
    assert "finite" in _error(DistillConfig, {"temperature": INF}, "distill")
    assert _error(VerifyConfig, {"logits": {"max_kl": INF}}, "verify").startswith("verify.logits.max_kl: must be a finite")


# ------------------------------------------------------------------ int64
@pytest.mark.parametrize("key", ["d_model", "vocab_size", "block_size", "num_layers"])
def test_model_ints_beyond_int64(key):
    text = _error(ModelConfig, _model(**{key: 2**64}), "model")
    assert text.startswith(f"model.{key}: integer does not fit in 64 bits")


def test_seed_beyond_int64_and_negative():
    assert _error(TrainConfig, {"steps": 1, "seed": 10**30}, "train").startswith("train.seed: integer does not fit")
    assert _error(TrainConfig, {"steps": 1, "seed": -(2**63) - 1}, "train").startswith("train.seed: integer does not fit")
    assert validate_section(TrainConfig, {"steps": 1, "seed": 2**63 - 1}, "train").seed == 2**63 - 1


def test_int64_inside_lists_names_the_index():
    text = _error(VerifyConfig, {"cases": [{"id": "a", "kind": "int_greedy", "prompt_ids": [1, 2**70], "answer": 1}]},
                  "verify")
    assert text.startswith("verify.cases[0].prompt_ids[1]: integer does not fit"), text


def test_a_huge_float_for_a_float_field_is_refused():
    text = _error(TrainConfig, {"steps": 1, "lr": 10**400}, "train")
    assert text.startswith("train.lr: integer does not fit in 64 bits") and len(text) < 200


# ------------------------------------------------------------------ sizes, before anything is built
def test_billion_layers_fails_fast():
    text = _error(ModelConfig, _model(num_layers=1_000_000_000), "model")
    assert text.startswith("model.num_layers: num_layers=1000000000 exceeds the limit of 4096")


def test_repeat_count_limit_and_nested_repeats():
    topo = {"type": "repeat", "count": 1_000_000_000, "body": {"type": "block"}}
    assert _error(ModelConfig, _model(num_layers=None, topology=topo), "model").startswith(
        "model.topology.count: repeat count=1000000000 exceeds the limit")
    # 1e9 as YAML would give it: a float, not an integer
    topo = {"type": "repeat", "count": 1e9, "body": {"type": "block"}}
    assert "model.topology.count" in _error(ModelConfig, _model(num_layers=None, topology=topo), "model")
    # each count is allowed, the product is not: refused without expanding 4000^3 blocks
    nested = {"type": "block"}
    for _ in range(3):
        nested = {"type": "repeat", "count": 4000, "body": nested}
    text = _error(ModelConfig, _model(num_layers=None, topology=nested), "model")
    assert "expands to" in text and "over the limit of 4096" in text


def test_topology_node_limit():
    wide = {"type": "sequential", "children": [{"type": "norm"}] * 1000}
    topo = {"type": "repeat", "count": 200, "body": wide}  # 200k norms, no layers
    assert "nodes, over the limit" in _error(ModelConfig, _model(num_layers=None, topology=topo), "model")


@pytest.mark.parametrize("key,value,knob", [
    ("d_model", 1 << 20, "max_width"), ("vocab_size", 10**8, "max_vocab"), ("block_size", 10**9, "max_context"),
])
def test_width_vocab_context_maxima(key, value, knob):
    text = _error(ModelConfig, _model(**{key: value}), "model")
    assert text.startswith(f"model.{key}: ") and knob in text


@pytest.mark.parametrize("attn,key", [
    ({"type": "standard", "num_heads": 4, "head_dim": 10**7}, "head_dim"),
    ({"type": "standard", "num_heads": 10**7}, "num_heads"),
    ({"type": "decoupled", "num_heads": 4, "sem_dim": 16, "geo_dim": 4 * 10**6}, "geo_dim"),
    ({"type": "bottleneck", "num_heads": 4, "attn_dim": 10**6}, "attn_dim"),
])
def test_attention_width_maxima(attn, key):
    assert _error(ModelConfig, _model(attention=attn), "model").startswith(f"model.attention.{key}: ")


def test_d_ff_maximum():
    assert _error(ModelConfig, _model(mlp={"d_ff": 10**8}), "model").startswith("model.mlp.d_ff: d_ff=100000000")


def test_parameter_estimate_limit():
    big = _model(d_model=65536, num_layers=4000, vocab_size=65536, attention={"type": "standard", "num_heads": 64})
    text = _error(ModelConfig, big, "model")
    assert "parameters, over the limit of 1T" in text


def test_parameter_estimate_is_close_to_the_real_count():
    from attnlab.model.stats import count_parameters

    for attn in ({"type": "standard", "num_heads": 4, "num_kv_heads": 2},
                 {"type": "decoupled", "num_heads": 4, "sem_dim": 16, "geo_dim": 32},
                 {"type": "bottleneck", "num_heads": 4, "attn_dim": 32}):
        cfg = ModelConfig.model_validate(_model(attention=attn, tie_embeddings=False))
        exact = count_parameters(cfg)[0]
        assert 0.8 * exact <= estimate_parameters(cfg) <= 1.2 * exact, (attn, exact, estimate_parameters(cfg))


def test_limits_come_from_the_context_and_the_environment(monkeypatch):
    small = {"limits": Limits(max_layers=1)}
    assert "limit of 1 " in _error(ModelConfig, _model(), "model", small)
    monkeypatch.setenv("ATTNLAB_MAX_LAYERS", "1")
    assert default_limits().max_layers == 1
    assert "ATTNLAB_MAX_LAYERS" in _error(ModelConfig, _model(), "model")
    monkeypatch.setenv("ATTNLAB_MAX_LAYERS", "lots")
    with pytest.raises(ConfigError, match="ATTNLAB_MAX_LAYERS: expected a number"):
        default_limits()
    monkeypatch.delenv("ATTNLAB_MAX_LAYERS")
    assert validate_section(ModelConfig, _model(num_layers=5000), "model",
                            {"limits": Limits(max_layers=5000)}).num_layers == 5000


def test_limits_themselves_are_validated():
    assert _error(Limits, {"max_params": INF}, "defaults.limits").startswith("defaults.limits.max_params: must be a finite")
    assert _error(Limits, {"max_layers": 0}, "defaults.limits").startswith("defaults.limits.max_layers")
    assert math.isclose(Limits().max_params, 1e12)


# ------------------------------------------------------------------ attention.type defaults to standard
def test_attention_type_defaults_to_standard():
    cfg = ModelConfig.model_validate(_model(attention={"num_heads": 4}))
    assert isinstance(cfg.attention, StandardAttentionConfig)
    over = _model(layer_overrides=[{"every": 2, "attention": {"num_heads": 2}}])
    assert isinstance(ModelConfig.model_validate(over).layer_overrides[0].attention, StandardAttentionConfig)
    # the error path has no invented 'standard' component
    assert _error(ModelConfig, _model(attention={"num_heads": 4, "head_dim": 0}), "model").startswith(
        "model.attention.head_dim: ")


# ------------------------------------------------------------------ benchmark specs
@pytest.mark.parametrize("spec,path", [
    ({"type": "perplexity", "policies": ["fp16", "q9_9"]}, "b[0].policies[1]: 'q9_9' is not a valid cache policy"),
    ({"type": "latency", "policy": "bogus"}, "b[0].policy: not a valid cache policy"),
    ({"type": "memory", "contexts": [-5]}, "b[0].contexts[0]: must be >= 1"),
    ({"type": "context_sweep", "lengths": [0]}, "b[0].lengths[0]: must be >= 1"),
    ({"type": "latency", "prompt_lengths": [0]}, "b[0].prompt_lengths[0]: must be >= 1"),
    ({"type": "latency", "gen_lengths": [-1]}, "b[0].gen_lengths[0]: must be >= 0"),
    ({"type": "memory", "contexts": [8, 10**10]}, "b[0].contexts[1]: contexts[1]=10000000000 exceeds"),
    ({"type": "quality", "seq_len": 10**10}, "b[0].seq_len: seq_len=10000000000 exceeds"),
    ({"type": "quality", "reference": "nope"}, "b[0].reference"),
    ({"type": "perplexity", "windows": 2**64}, "b[0].windows: integer does not fit"),
])
def test_bad_benchmark_specs(spec, path):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as exc:
        validate_benchmarks([spec], "b")
    assert time.perf_counter() - start < 2.0
    assert str(exc.value).startswith(path), str(exc.value)
    assert "\n" not in str(exc.value)


def test_good_benchmark_specs_pass():
    specs = [{"type": "perplexity", "policies": ["fp16", "k=q8_0,v=q4_0,tail=4"]},
             {"type": "latency", "gen_lengths": [0, 4], "policy": "q8_0"},
             {"type": "memory", "contexts": [1, 2]}, {"type": "quality", "reference": "run:x"}]
    assert len(validate_benchmarks(specs, "b")) == 4

