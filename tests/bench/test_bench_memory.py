import pytest
import torch

from attnlab.bench.context import BenchContext
from attnlab.bench.memory import CONFIGS, run_memory, standard_counterpart
from attnlab.config import ModelConfig
from attnlab.config.attention import StandardAttentionConfig, attention_dims
from attnlab.config.bench import MemoryBench
from attnlab.model import build_model
from attnlab.model.stats import PAPER_DBA_POLICY, kv_bytes_per_token_layer

BLOCK = 32
DBA = {"type": "decoupled", "num_heads": 2, "sem_dim": 16, "geo_dim": 16}


def make_model(attention, **kw):
    torch.manual_seed(0)
    cfg = {"vocab_size": 256, "d_model": 32, "num_layers": 2, "block_size": BLOCK, "attention": attention}
    return build_model(ModelConfig.model_validate(cfg | kw)).eval()


def kv_total(cfg, formats) -> int:
    """What model_stats reports (without building a meta model)."""
    return sum(kv_bytes_per_token_layer(attention_dims(s, cfg.d_model), formats) for s in cfg.attention_specs())


def context(model, **kw):
    return BenchContext(model=model, device=torch.device("cpu"), dtype=torch.float32, run_key="test", **kw)


def test_estimates_measurements_and_ratios_for_dba():
    model = make_model(DBA)
    rows = run_memory(MemoryBench(contexts=[20, 70, 500], measure_up_to=100), context(model))
    assert [(r["context"], r["config"]) for r in rows] == [(c, n) for c in (20, 70, 500) for n in CONFIGS]
    std = kv_total(standard_counterpart(model.config), "fp16")
    arch = kv_total(model.config, "fp16")
    het = kv_total(model.config, PAPER_DBA_POLICY)
    assert std == 2 * 2 * 32 * 2  # layers x (k + v) x d_model x fp16
    for r in rows:
        expected = {"standard_fp16": std, "arch_fp16": arch, "arch_policy": het}[r["config"]]
        assert r["bytes_per_token"] == expected and r["tail_bytes"] == 0
        assert r["estimate_bytes"] == expected * r["context"]
        assert r["policy"] == ("k_sem=q4_0,k_geo=q8_0,v=q4_0" if r["config"] == "arch_policy" else "fp16")
        assert r["peak_device_bytes"] is None  # CPU
        if r["context"] <= 100:
            # a real runtime preallocated for the context holds exactly the estimate
            assert r["measured_bytes"] == r["bytes_per_token"] * r["context"] == r["estimate_bytes"]
            assert r["measured_tail_bytes"] == 0
        else:
            assert r["measured_bytes"] is None and r["measured_tail_bytes"] is None
        if r["config"] == "arch_policy":
            assert r["ratio_architecture"] == pytest.approx(std / arch)
            assert r["ratio_quantization"] == pytest.approx(arch / het)
            assert r["ratio_end_to_end"] == pytest.approx(r["ratio_architecture"] * r["ratio_quantization"])
        else:
            assert r["ratio_architecture"] is r["ratio_quantization"] is r["ratio_end_to_end"] is None


def test_gqa_architecture_ratio_and_policy_resolution():
    model = make_model({"type": "standard", "num_heads": 4, "num_kv_heads": 1})
    rows = run_memory(MemoryBench(contexts=[10], measure_up_to=1), context(model, cache_policy="q8_0"))
    last = rows[-1]
    assert last["policy"] == "q8_0" and last["ratio_architecture"] == pytest.approx(4.0)
    # per layer k + v rows of 8 values: fp16 2 x 16 B; q8_0 pads each row to one 32-value block, 2 x 34 B
    assert last["ratio_quantization"] == pytest.approx(32 / 68)
    # cfg.policy wins; standard models default to the k=q8_0,v=q4_0 policy
    assert run_memory(MemoryBench(contexts=[10], measure_up_to=1, policy="nf4"),
                      context(model, cache_policy="q8_0"))[-1]["policy"] == "nf4"
    assert run_memory(MemoryBench(contexts=[10], measure_up_to=1), context(model))[-1]["policy"] == "k=q8_0,v=q4_0"


def test_tail_window_is_part_of_the_estimate_and_the_measurement():
    model = make_model(DBA)
    rows = run_memory(MemoryBench(contexts=[40], measure_up_to=64, policy="q4_0,tail=8,rollback=0", chunk=16),
                      context(model))
    r = rows[-1]
    # (tail + rollback) slots x (k_sem 16 + k_geo 16 + v 32 values, fp32) x 2 layers + slot positions (int64)
    assert r["tail_bytes"] == 2 * (8 * (16 + 16 + 32) * 4 + 8 * 8)
    assert r["estimate_bytes"] == r["bytes_per_token"] * 40 + r["tail_bytes"]
    # the measured field storage is the analytic bytes exactly; the tail ring is measured separately
    assert r["measured_bytes"] == r["bytes_per_token"] * 40
    assert r["measured_tail_bytes"] == r["tail_bytes"]
    assert r["measured_bytes"] + r["measured_tail_bytes"] == r["estimate_bytes"]


def test_standard_counterpart_replaces_every_attention_layer():
    cfg = ModelConfig.model_validate({
        "vocab_size": 256, "d_model": 32, "num_layers": 4, "block_size": BLOCK, "attention": DBA,
        "layer_overrides": [{"every": 2, "attention": {"type": "standard", "num_heads": 4, "num_kv_heads": 1}},
                            {"layers": [1], "mlp": {"type": "gelu"}, "attention": DBA}]})
    std = standard_counterpart(cfg)
    assert all(spec == StandardAttentionConfig(num_heads=2) for spec in std.attention_specs())
    assert std.mlp_for_layer(1).type == "gelu" and std.num_layers == 4 and std.d_model == 32
    dims = [layer.dims for layer in build_model(std).attention_layers()]
    assert sum(kv_bytes_per_token_layer(d, "fp16") for d in dims) == 4 * 2 * 32 * 2
    topo = ModelConfig.model_validate({
        "vocab_size": 256, "d_model": 32, "block_size": BLOCK, "attention": DBA,
        "topology": {"type": "repeat", "count": 2, "body": {"type": "block", "attention": DBA}}})
    assert all(s.type == "standard" for s in standard_counterpart(topo).attention_specs())
