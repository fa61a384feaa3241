"""Cached inference vs the full forward, for every attention variant and every format:
incremental decode, chunked prefill, batched prompts of different lengths, rollback."""

import pytest
import torch

from attnlab.cache import CachePolicy, ModelCache
from attnlab.config import ModelConfig
from attnlab.errors import AttnlabError, ConfigError, InputError
from attnlab.model import build_model
from attnlab.model.stats import kv_bytes_per_token_layer

VARIANTS = {
    "mha": {"type": "standard", "num_heads": 4},
    "gqa": {"type": "standard", "num_heads": 4, "num_kv_heads": 2},
    "mqa_interleaved": {"type": "standard", "num_heads": 4, "num_kv_heads": 1, "rope": {"style": "interleaved"}},
    "bottleneck": {"type": "bottleneck", "num_heads": 4, "attn_dim": 32},
    "dba": {"type": "decoupled", "num_heads": 4, "sem_dim": 16, "geo_dim": 32},
    "dba_gqa_null_gate": {"type": "decoupled", "num_heads": 4, "num_kv_heads": 2, "sem_dim": 16, "geo_dim": 32,
                          "v_dim": 48, "null_token": True, "gate": True},
    "dba_tied": {"type": "decoupled", "num_heads": 4, "sem_dim": 32, "geo_dim": 32, "tie_qk": True, "null_token": True},
}


def make_model(attention, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig.model_validate({"vocab_size": 97, "d_model": 64, "num_layers": 2, "block_size": 24,
                                      "attention": attention} | kw)
    model = build_model(cfg).to(dtype).eval()
    with torch.no_grad():  # gates and null tokens away from their init values
        for name, p in model.named_parameters():
            if "gate" in name or "null" in name:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_incremental_decode_equals_full_forward(name):
    model = make_model(VARIANTS[name])
    ids = torch.randint(0, 97, (2, 20))
    full = model(ids)
    cache = ModelCache.for_model(model, batch=2)
    steps = [model(ids[:, :7], cache=cache)] + [model(ids[:, t: t + 1], cache=cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)
    assert cache.lengths == [20, 20]


@pytest.mark.parametrize("name", ["gqa", "dba_gqa_null_gate"])
@torch.no_grad()
def test_chunked_prefill_equals_one_shot_and_goes_past_block_size(name):
    model = make_model(VARIANTS[name])
    ids = torch.randint(0, 97, (1, 24))
    one = ModelCache.for_model(model)
    ref = model(ids, cache=one)
    chunked = ModelCache.for_model(model)
    outs = [model(ids[:, s: s + 5], cache=chunked) for s in range(0, 24, 5)]
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-10, atol=1e-10)
    more = torch.randint(0, 97, (1, 20))  # a cache may grow past block_size, chunk by chunk
    model(more, cache=chunked)
    assert chunked.lengths == [44]
    with pytest.raises(InputError, match="exceed block_size 24"):
        model(torch.randint(0, 97, (1, 25)), cache=ModelCache.for_model(model))


@torch.no_grad()
def test_batched_prompts_of_different_lengths_equal_single_prompts():
    model = make_model(VARIANTS["dba_gqa_null_gate"])
    prompts = [torch.randint(0, 97, (n,)) for n in (9, 4, 12)]
    padded = torch.zeros(3, 12, dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = p
    cache = ModelCache.for_model(model, batch=3)
    logits = model(padded, cache=cache, valid=[len(p) for p in prompts])
    nxt = torch.randint(0, 97, (3, 1))
    step = model(nxt, cache=cache)
    for b, p in enumerate(prompts):
        single = ModelCache.for_model(model)
        ref = model(p[None], cache=single)
        torch.testing.assert_close(logits[b, : len(p)], ref[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(step[b], model(nxt[b: b + 1], cache=single)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("policy", ["fp32", "q8_0,tail=4", "k_sem=q4_0,k_geo=q8_0,v=q4_0,tail=3"])
@torch.no_grad()
def test_truncate_restores_the_exact_state(policy):
    model = make_model(VARIANTS["dba_gqa_null_gate"], dtype=torch.float32)
    ids = torch.randint(0, 97, (1, 16))
    cache = ModelCache.for_model(model, policy)
    model(ids[:, :10], cache=cache)
    expected = model(ids[:, 10:13], cache=cache)
    model(torch.randint(0, 97, (1, 3)), cache=cache)  # a rejected draft ...
    cache.truncate(10)                                   # ... rolled back
    assert cache.lengths == [10]
    torch.testing.assert_close(model(ids[:, 10:13], cache=cache), expected, rtol=0, atol=0)


@torch.no_grad()
def test_rollback_past_the_exact_tail_is_refused():
    model = make_model(VARIANTS["gqa"], dtype=torch.float32)
    cache = ModelCache.for_model(model, CachePolicy.parse("q4_0,tail=2,rollback=3"))
    model(torch.randint(0, 97, (1, 20)), cache=cache)
    cache.truncate(17)
    with pytest.raises(AttnlabError, match="full-precision tail no longer holds"):
        cache.truncate(12)


@torch.no_grad()
def test_tail_is_read_at_full_precision():
    """With every token inside the tail, a q4_0 cache decodes exactly like an fp32 cache."""
    model = make_model(VARIANTS["dba"], dtype=torch.float32)
    ids = torch.randint(0, 97, (1, 12))
    exact = model(ids, cache=ModelCache.for_model(model, "fp32"))
    tailed = model(ids, cache=ModelCache.for_model(model, "q4_0,tail=16"))
    torch.testing.assert_close(tailed, exact, rtol=1e-6, atol=1e-6)
    coarse = model(ids, cache=ModelCache.for_model(model, "q4_0"))
    assert (coarse - exact).abs().max() > 1e-4


def test_bytes_analytic_and_allocated_agree_up_to_growth_slack():
    model = make_model(VARIANTS["dba_gqa_null_gate"], dtype=torch.float32)
    policy = CachePolicy.parse("k_sem=q4_0,k_geo=q8_0,v=q4_0,tail=8")
    cache = ModelCache.for_model(model, policy, batch=2)
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 24)), cache=cache)
        for _ in range(50):
            model(torch.randint(0, 97, (2, 1)), cache=cache)
    report = cache.report()
    per_layer = kv_bytes_per_token_layer(model.attention_layers()[0].dims, {"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"})
    assert report.bytes_per_token == 2 * per_layer  # two layers, same spec as compile's plan
    assert report.max_length == 74 and report.capacity >= 74
    assert report.bytes_allocated == report.used_bytes + report.slack_bytes + report.tail_bytes
    assert report.slack_bytes < report.used_bytes  # geometric growth wastes less than half


@pytest.mark.parametrize("text, needle", [
    ("k_sem=q3_k", "unknown format"), ("q_sem=q4_0", "unknown cache field"), ("tail=x", "expected an integer"),
])
def test_bad_policies_are_one_line_errors(text, needle):
    with pytest.raises(ConfigError, match=needle):
        CachePolicy.parse(text)


def test_policy_field_must_exist_for_the_variant():
    model = make_model(VARIANTS["gqa"])
    with pytest.raises(ConfigError, match="field 'k_sem' does not exist for this attention"):
        ModelCache.for_model(model, "k_sem=q4_0")


# relative error ||cached - full|| / ||full|| of the logits; measured worst over variants and
# seeds: fp16 1.2e-4, bf16 9.5e-4, q8_0 2.8e-3, q4_0 4.4e-2, nf4 4.7e-2
FORMAT_TOLERANCE = {"fp32": 1e-6, "fp16": 5e-4, "bf16": 4e-3, "q8_0": 1e-2, "q4_0": 0.12, "nf4": 0.12}


@pytest.mark.parametrize("fmt", list(FORMAT_TOLERANCE))
@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_every_format_decodes_close_to_the_full_forward(name, fmt):
    seed = int(torch.randint(0, 10_000, ()).item())  # fresh inputs on every run
    model = make_model(VARIANTS[name], seed=seed, dtype=torch.float32)
    ids = torch.randint(0, 97, (2, 20))
    full = model(ids)
    cache = ModelCache.for_model(model, fmt, batch=2)
    out = torch.cat([model(ids[:, :5], cache=cache)] + [model(ids[:, t: t + 1], cache=cache) for t in range(5, 20)], 1)
    rel = ((out - full).norm() / full.norm()).item()
    assert rel <= FORMAT_TOLERANCE[fmt], f"{name}/{fmt} (seed {seed}): relative error {rel:.2e}"
    if fmt != "fp32":
        assert rel > 0  # the format really was applied


@torch.no_grad()
def test_hybrid_stack_takes_one_policy_for_both_kinds_of_layer():
    model = make_model(VARIANTS["dba"], dtype=torch.float32, num_layers=4,
                       layer_overrides=[{"every": 2, "offset": 1, "attention": VARIANTS["gqa"]}])
    cache = ModelCache.for_model(model, "k_sem=q4_0,k_geo=q8_0,k=q8_0,v=q4_0")
    assert [sorted(layer.formats.items()) for layer in cache.layers[:2]] == [
        [("k_geo", "q8_0"), ("k_sem", "q4_0"), ("v", "q4_0")], [("k", "q8_0"), ("v", "q4_0")]]
    ids = torch.randint(0, 97, (1, 10))
    torch.testing.assert_close(model(ids, cache=cache), model(ids), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("policy", ["q4_0,tail=3", "k_sem=q4_0,k_geo=q8_0,v=q4_0,tail=5,rollback=2"])
@torch.no_grad()
def test_exact_tail_is_per_query_so_chunking_does_not_matter(policy):
    """A query reads its own newest `tail` tokens exactly, whether the tokens arrive one by one
    or in chunks longer than the tail window."""
    model = make_model(VARIANTS["dba_gqa_null_gate"], dtype=torch.float32)
    ids = torch.randint(0, 97, (2, 23))
    stepwise = ModelCache.for_model(model, policy, batch=2)
    one_by_one = torch.cat([model(ids[:, t: t + 1], cache=stepwise) for t in range(23)], 1)
    chunked = ModelCache.for_model(model, policy, batch=2)
    in_chunks = torch.cat([model(ids[:, s: s + 9], cache=chunked) for s in range(0, 23, 9)], 1)
    torch.testing.assert_close(in_chunks, one_by_one, rtol=1e-5, atol=1e-5)
