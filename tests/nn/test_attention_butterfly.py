"""Butterfly attention: the explicit key-set reference vs the masked eager path vs FlexAttention vs
the cached paths (chunked prefill, incremental decode), block summaries, partner rules and bad
input."""

from __future__ import annotations

import pytest
import torch

from attnlab.config.model import ModelConfig
from attnlab.errors import ConfigError
from attnlab.infer.runtime import DecodeRuntime
from attnlab.model.decoder import DecoderLM
from decode_checks import assert_cached_paths_equal_the_full_forward, assert_graph_decode_equals_eager_and_full
from attnlab.nn.attention.backends import FLEX_IMPORT_ERROR, attend
from attnlab.nn.attention.butterfly import (
    PARTNER_RULES,
    ButterflyMask,
    block_means,
    default_num_stages,
    key_set,
    partner_block,
    reference_attention,
)


def _qkv(batch=2, heads=4, kv=2, t_len=77, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, t_len, d, generator=g, dtype=dtype),
            torch.randn(batch, kv, t_len, d, generator=g, dtype=dtype),
            torch.randn(batch, kv, t_len, d, generator=g, dtype=dtype))


def _masked(q, k, v, *, window, block_size, rule, stage, impl):
    keys = torch.cat([k, block_means(k, block_size)], 2)
    values = torch.cat([v, block_means(v, block_size)], 2)
    mask = ButterflyMask(q.shape[2], window, block_size, rule, stage)
    return attend([q], [keys], values, [q.shape[-1] ** -0.5], mask=mask, impl=impl)


@pytest.mark.parametrize("p,expected", [
    # (query position) -> summarised blocks; block 4, window 3, causal_shift stage 1 (partner b - 2)
    (13, [0, 1]),      # block 3: sink 0, local 2 (8..11 overlaps window 11..13: dropped), partner 1
    (14, [0, 1, 2]),   # window 12..14: block 2 (8..11) now ends before it
    (6, [0]),          # block 1: window 4..6; block 0 (0..3) is sink and local
    (7, [0]),          # window 5..7
    (2, []),           # nothing completed
])
def test_key_set_rule(p, expected):
    raw, blocks = key_set(p, window=3, block_size=4, rule="causal_shift", stage=1)
    assert raw == list(range(max(0, p - 2), p + 1))
    assert blocks == expected


def test_partner_rules_by_hand():
    b = torch.arange(8)
    assert partner_block("causal_shift", b, 1).tolist() == [-1, -1, 0, 1, 2, 3, 4, 5]
    assert partner_block("xor", b, 1).tolist() == [-1, -1, 0, 1, -1, -1, 4, 5]  # b ^ 2 > b dropped
    assert partner_block("local_only", b, 1).tolist() == [-1] * 8
    rnd = partner_block("random", b, 1)
    assert rnd[0] == -1 and all(0 <= int(rnd[i]) < i for i in range(1, 8))
    assert torch.equal(rnd, partner_block("random", b, 1))  # fixed, not sampled
    assert not torch.equal(rnd, partner_block("random", b, 2))  # depends on the stage
    with pytest.raises(ValueError, match="unknown butterfly partner rule"):
        partner_block("nearest", b, 0)


def test_block_means_are_exact_block_means():
    x = torch.randn(2, 3, 21, 4, dtype=torch.float64)
    means = block_means(x, 5)
    assert means.shape == (2, 3, 4, 4)  # the incomplete fifth block is left out
    for j in range(4):
        assert torch.equal(means[:, :, j], x[:, :, 5 * j:5 * j + 5].mean(2))


@pytest.mark.parametrize("rule", PARTNER_RULES)
@pytest.mark.parametrize("stage", [0, 2])
def test_masked_eager_equals_the_key_set_reference(rule, stage):
    q, k, v = _qkv(t_len=77)  # not a multiple of the block size
    ref = reference_attention(q, k, v, q.shape[-1] ** -0.5, window=6, block_size=8, rule=rule, stage=stage)
    got = _masked(q, k, v, window=6, block_size=8, rule=rule, stage=stage, impl="eager")
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


@pytest.mark.skipif(FLEX_IMPORT_ERROR is not None, reason="no FlexAttention")
@pytest.mark.parametrize("rule", ["causal_shift", "random"])
def test_flex_equals_the_key_set_reference(rule):
    q, k, v = _qkv(t_len=150, dtype=torch.float32)
    ref = reference_attention(q, k, v, q.shape[-1] ** -0.5, window=5, block_size=16, rule=rule, stage=1)
    got = _masked(q, k, v, window=5, block_size=16, rule=rule, stage=1, impl="flex")
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


def test_rules_differ_where_they_should():
    q, k, v = _qkv(t_len=128)
    outs = {r: reference_attention(q, k, v, 0.3, window=4, block_size=4, rule=r, stage=2) for r in PARTNER_RULES}
    for a in PARTNER_RULES:
        for b in PARTNER_RULES:
            if a < b:
                assert not torch.allclose(outs[a], outs[b]), (a, b)


# ---------------------------------------------------------------- the model and its cache
def _model(rule="causal_shift", layers=3, block=8, window=6, context=128, dtype=torch.float64, seed=0, **extra):
    torch.manual_seed(seed)
    attention = dict(type="butterfly", num_heads=4, num_kv_heads=2, window=window, block_size=block,
                     partner=rule, **extra)
    cfg = ModelConfig.model_validate(dict(vocab_size=61, d_model=32, num_layers=layers, block_size=context,
                                          attention=attention))
    return DecoderLM(cfg).to(dtype).eval()


@pytest.mark.parametrize("rule", PARTNER_RULES)
def test_incremental_decode_and_chunked_prefill_equal_the_full_forward(rule):
    model = _model(rule, layers=2, block=4, window=3)  # stages 0 and 1
    ids = torch.randint(0, 61, (2, 60), generator=torch.Generator().manual_seed(1))
    assert_cached_paths_equal_the_full_forward(model, ids)


def test_ragged_prefill_then_decode_equals_per_sequence_forwards():
    model = _model()
    ids = torch.randint(0, 61, (2, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        rt = DecodeRuntime(model, batch=2, max_length=128)
        first = rt.forward(ids[:, :41], valid=[41, 29])
        nxt = rt.forward(torch.stack([ids[0, 41:42], ids[1, 29:30]]))
        for b, n in enumerate([41, 29]):
            alone = model(torch.cat([ids[b, :n], ids[b, n:n + 1] if b else ids[b, 41:42]]).unsqueeze(0))
            torch.testing.assert_close(first[b, :n], alone[0, :n], atol=1e-10, rtol=0)
            torch.testing.assert_close(nxt[b, 0], alone[0, n], atol=1e-10, rtol=0)


def test_rollback_within_the_window_is_exact():
    model = _model(block=8, window=6)
    ids = torch.randint(0, 61, (1, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        rt = DecodeRuntime(model, "rollback=8", batch=1, max_length=64)
        rt.forward(ids[:, :30])
        for t in range(30, 38):  # cross a block boundary (32), then undo it
            rt.forward(ids[:, t:t + 1])
        rt.truncate(31)
        after = [rt.forward(ids[:, t:t + 1]) for t in range(31, 45)]
        torch.testing.assert_close(torch.cat(after, 1), model(ids[:, :45])[:, 31:], atol=1e-10, rtol=0)
        with pytest.raises(Exception, match="cannot roll back"):
            rt.truncate(20)


def test_summaries_in_the_cache_are_the_block_means():
    model = _model(layers=1, block=8, window=4)
    ids = torch.randint(0, 61, (1, 43), generator=torch.Generator().manual_seed(4))
    layer = model.attention_layers()[0]
    seen = {}
    handle = layer.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(ids)  # the layer's input, to project the keys independently of the cache
        handle.remove()
        rt = DecodeRuntime(model, batch=1, max_length=64)
        rt.forward(ids[:, :20])
        for t in range(20, 43):
            rt.forward(ids[:, t:t + 1])
        proj = layer.project(seen["x"], torch.arange(43).unsqueeze(0))
    got_k, got_v = rt.cache.layers[0].summary_prefix(5)  # batch of one
    for j in range(5):
        torch.testing.assert_close(got_k[:, :, j], proj.k[0][:, :, 8 * j:8 * j + 8].mean(2), atol=1e-12, rtol=0)
        torch.testing.assert_close(got_v[:, :, j], proj.v[:, :, 8 * j:8 * j + 8].mean(2), atol=1e-12, rtol=0)


def test_retained_bytes_grow_with_blocks_not_tokens():
    model = _model(layers=2, block=16, window=8, context=4096, dtype=torch.float32)
    rt = DecodeRuntime(model, "k=q8_0,v=q8_0,k_sum=fp16,v_sum=fp16,rollback=0", batch=1, max_length=4096)
    cache = rt.cache.layers[0]
    row = 2 * 8  # kv heads x head dim
    q8 = row // 32 * 34 if row >= 32 else None
    fp16_sum = 2 * row * 2  # k_sum + v_sum, fp16
    assert cache.retained_bytes(1000) == 8 * cache.ring["k"].bytes_per_token() * 2 + 63 * fp16_sum
    assert cache.retained_bytes(4000) - cache.retained_bytes(2000) == 125 * fp16_sum  # no window growth
    assert q8 is None or cache.ring["k"].bytes_per_token() == q8
    report = rt.report()
    assert report.bytes_allocated == sum(layer.bytes_allocated() for layer in rt.cache.layers)
    summaries = sum(s.bytes_allocated() for layer in rt.cache.layers for s in layer.summaries.values())
    assert summaries == 2 * 256 * fp16_sum  # 4096 / 16 blocks per layer, allocated once
    assert report.fixed_bytes == sum(layer.fixed_bytes() for layer in rt.cache.layers)


def test_quantized_pools_stay_close_to_the_full_forward():
    model = _model(dtype=torch.float32)
    ids = torch.randint(0, 61, (1, 70), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        rt = DecodeRuntime(model, "k=q8_0,v=q8_0,k_sum=q8_0,v_sum=q8_0", batch=1, max_length=128)
        out = torch.cat([rt.forward(ids[:, :30])] + [rt.forward(ids[:, t:t + 1]) for t in range(30, 70)], 1)
    assert (out - full).abs().max() < 0.05 * full.abs().max()
    assert (out - full).abs().max() > 0  # the pools really are quantized


def test_stage_defaults_and_explicit_stages():
    assert default_num_stages(1024, 128) == 3 and default_num_stages(100, 128) == 1
    model = _model(layers=4, block=8, context=128)  # 16 blocks -> 4 stages
    assert [layer.stage for layer in model.attention_layers()] == [0, 1, 2, 3]
    model = _model(layers=3, block=8, context=32)  # 4 blocks -> 2 stages
    assert [layer.stage for layer in model.attention_layers()] == [0, 1, 0]
    model = _model(layers=2, stage=3)
    assert [layer.stage for layer in model.attention_layers()] == [3, 3]


@pytest.mark.parametrize("change,needle", [
    ({"window": 0}, "window"), ({"block_size": -4}, "block_size"), ({"window": 1.5}, "window"),
    ({"partner": "nearest"}, "partner"), ({"window": 4096}, "larger than the context"),
    ({"block_size": 200}, "larger than the context"),
])
def test_bad_sizes_and_rules_are_one_line_errors(change, needle):
    from attnlab.config.base import validate_section

    attention = {"type": "butterfly", "num_heads": 4, **change}
    with pytest.raises(ConfigError) as err:
        validate_section(ModelConfig, dict(vocab_size=61, d_model=32, num_layers=2, block_size=128,
                                           attention=attention), "model")
    assert needle in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- on the GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("policy", [None, "bf16", "k=q8_0,v=q4_0,k_sum=q8_0,v_sum=fp16"])
def test_cuda_graph_decode_equals_eager_decode_and_the_full_forward(policy):
    model = _model(layers=3, block=8, window=6, dtype=torch.float32).cuda()
    ids = torch.randint(0, 61, (2, 100), generator=torch.Generator().manual_seed(6)).cuda()
    assert_graph_decode_equals_eager_and_full(model, ids, policy)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_flex_prefill_equals_the_key_set_reference(dtype):
    q, k, v = (t.cuda().to(dtype) for t in _qkv(t_len=300, d=16, dtype=torch.float32))
    ref = reference_attention(q.double(), k.double(), v.double(), 0.25, window=16, block_size=32, rule="xor", stage=2)
    got = _masked(q, k, v, window=16, block_size=32, rule="xor", stage=2, impl="flex")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=0)

