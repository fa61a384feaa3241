"""Cached inference (through the decode runtime) vs the full forward, for every attention variant
and every format: incremental decode, chunked prefill, batched prompts of different lengths,
rollback, byte accounting."""

import pytest
import torch

from attnlab.cache import CachePolicy
from attnlab.config import ModelConfig
from attnlab.errors import AttnlabError, ConfigError, InputError
from attnlab.infer import DecodeRuntime
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


def steps(runtime, ids):
    """Feed ``ids`` (B, T) one ``runtime.step`` at a time; logits (B, T, V) (each step's output
    copied: the runtime may reuse its buffer)."""
    return torch.stack([runtime.step(ids[:, t]).clone() for t in range(ids.shape[1])], 1)


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_incremental_decode_equals_full_forward(name):
    model = make_model(VARIANTS[name])
    ids = torch.randint(0, 97, (2, 20))
    full = model(ids)
    rt = DecodeRuntime(model, batch=2, max_length=20)
    out = torch.cat([rt.forward(ids[:, :7]), steps(rt, ids[:, 7:])], 1)
    torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-10)
    assert rt.host_lengths == [20, 20] and rt.lengths.tolist() == [20, 20]


@pytest.mark.parametrize("name", ["gqa", "dba_gqa_null_gate"])
@torch.no_grad()
def test_chunked_prefill_equals_one_shot_and_goes_past_block_size(name):
    model = make_model(VARIANTS[name])
    ids = torch.randint(0, 97, (1, 24))
    ref = DecodeRuntime(model, max_length=24).forward(ids)
    chunked = DecodeRuntime(model, max_length=44)
    outs = [chunked.forward(ids[:, s: s + 5]) for s in range(0, 24, 5)]
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-10, atol=1e-10)
    more = torch.randint(0, 97, (1, 20))  # a sequence may go past block_size, chunk by chunk
    chunked.forward(more)
    assert chunked.host_lengths == [44]
    with pytest.raises(InputError, match="exceed block_size 24"):
        DecodeRuntime(model, max_length=25).forward(torch.randint(0, 97, (1, 25)))


@torch.no_grad()
def test_batched_prompts_of_different_lengths_equal_single_prompts():
    model = make_model(VARIANTS["dba_gqa_null_gate"])
    prompts = [torch.randint(0, 97, (n,)) for n in (9, 4, 12)]
    padded = torch.zeros(3, 12, dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = p
    rt = DecodeRuntime(model, batch=3, max_length=13)
    logits = rt.forward(padded, valid=[len(p) for p in prompts])
    assert rt.host_lengths == [9, 4, 12]
    nxt = torch.randint(0, 97, (3,))
    step = rt.step(nxt).clone()
    for b, p in enumerate(prompts):
        single = DecodeRuntime(model, max_length=13)
        ref = single.forward(p[None])
        torch.testing.assert_close(logits[b, : len(p)], ref[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(step[b], single.step(nxt[b: b + 1])[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("policy", ["fp32", "q8_0,tail=4", "k_sem=q4_0,k_geo=q8_0,v=q4_0,tail=3"])
@torch.no_grad()
def test_truncate_restores_the_exact_state(policy):
    model = make_model(VARIANTS["dba_gqa_null_gate"], dtype=torch.float32)
    ids = torch.randint(0, 97, (1, 16))
    rt = DecodeRuntime(model, policy, max_length=16)
    rt.forward(ids[:, :10])
    expected = rt.forward(ids[:, 10:13])
    after = rt.step(ids[:, 13]).clone()
    rt.forward(torch.randint(0, 97, (1, 2)))  # a rejected draft ...
    rt.truncate(10)                           # ... rolled back
    assert rt.host_lengths == [10] and rt.lengths.tolist() == [10]
    torch.testing.assert_close(rt.forward(ids[:, 10:13]), expected, rtol=0, atol=0)
    torch.testing.assert_close(rt.step(ids[:, 13]), after, rtol=0, atol=0)


@torch.no_grad()
def test_rollback_past_the_exact_tail_is_refused():
    model = make_model(VARIANTS["gqa"], dtype=torch.float32)
    rt = DecodeRuntime(model, CachePolicy.parse("q4_0,tail=2,rollback=3"), max_length=20)
    rt.forward(torch.randint(0, 97, (1, 20)))
    rt.truncate(17)
    with pytest.raises(AttnlabError, match="full-precision tail no longer holds"):
        rt.truncate(12)
    assert rt.host_lengths == [17]  # a refused rollback changes nothing
    with pytest.raises(InputError, match="sequence 0 has 17 tokens; cannot set length 18"):
        rt.truncate(18)


@torch.no_grad()
def test_tail_is_read_at_full_precision():
    """With every token inside the tail, a q4_0 cache decodes exactly like an fp32 cache."""
    model = make_model(VARIANTS["dba"], dtype=torch.float32)
    ids = torch.randint(0, 97, (1, 12))
    exact = DecodeRuntime(model, "fp32", max_length=12).forward(ids)
    tailed = DecodeRuntime(model, "q4_0,tail=16", max_length=12).forward(ids)
    torch.testing.assert_close(tailed, exact, rtol=1e-6, atol=1e-6)
    coarse = DecodeRuntime(model, "q4_0", max_length=12).forward(ids)
    assert (coarse - exact).abs().max() > 1e-4


def test_bytes_allocated_are_the_analytic_bytes_for_the_capacity_plus_the_tail_ring():
    model = make_model(VARIANTS["dba_gqa_null_gate"], dtype=torch.float32)
    policy = CachePolicy.parse("k_sem=q4_0,k_geo=q8_0,v=q4_0,tail=8")
    rt = DecodeRuntime(model, policy, batch=2, max_length=80)
    before = rt.report()
    with torch.no_grad():
        rt.forward(torch.randint(0, 97, (2, 24)))
        for _ in range(50):
            rt.step(torch.randint(0, 97, (2,)))
    report = rt.report()
    dims = model.attention_layers()[0].dims
    per_layer = kv_bytes_per_token_layer(dims, {"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"})
    assert report.bytes_per_token == 2 * per_layer  # two layers, same spec as compile's plan
    # the ring: (tail + rollback) slots per sequence of every field at fp32, plus each slot's position (int64)
    ring = (8 + policy.rollback) * (sum(dims.cache_fields.values()) * dims.num_kv_heads * 4 + 8)
    assert report.tail_bytes == 2 * 2 * ring  # two layers, two sequences
    assert report.max_length == 74 and report.capacity == 80 and report.batch == 2
    assert report.bytes_allocated == report.bytes_per_token * 2 * 80 + report.tail_bytes
    assert report.bytes_allocated == report.used_bytes + report.slack_bytes + report.tail_bytes
    assert report.slack_bytes == report.bytes_per_token * 2 * 6
    assert before.bytes_allocated == report.bytes_allocated and before.max_length == 0  # allocated once


@pytest.mark.parametrize("text, needle", [
    ("k_sem=q3_k", "unknown format"), ("q_sem=q4_0", "unknown cache field"), ("tail=x", "expected an integer"),
])
def test_bad_policies_are_one_line_errors(text, needle):
    with pytest.raises(ConfigError, match=needle):
        CachePolicy.parse(text)


def test_policy_field_must_exist_for_the_variant():
    model = make_model(VARIANTS["gqa"])
    with pytest.raises(ConfigError, match="field 'k_sem' does not exist for this attention"):
        DecodeRuntime(model, "k_sem=q4_0")


# relative error ||cached - full|| / ||full|| of the logits; measured worst over variants and
# seeds: fp16 1.2e-4, bf16 9.5e-4, q8_0 2.8e-3, q4_0 4.4e-2, nf4 4.7e-2, fp8_e4m3 1.3e-2, fp8_e5m2 2.6e-2
FORMAT_TOLERANCE = {"fp32": 1e-6, "fp16": 5e-4, "bf16": 4e-3, "q8_0": 1e-2, "q4_0": 0.12, "nf4": 0.12,
                    "fp8_e4m3": 0.04, "fp8_e5m2": 0.08}


@pytest.mark.parametrize("fmt", list(FORMAT_TOLERANCE))
@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_every_format_decodes_close_to_the_full_forward(name, fmt):
    seed = int(torch.randint(0, 10_000, ()).item())  # fresh inputs on every run
    model = make_model(VARIANTS[name], seed=seed, dtype=torch.float32)
    ids = torch.randint(0, 97, (2, 20))
    full = model(ids)
    rt = DecodeRuntime(model, fmt, batch=2, max_length=20)
    out = torch.cat([rt.forward(ids[:, :5]), steps(rt, ids[:, 5:])], 1)
    rel = ((out - full).norm() / full.norm()).item()
    assert rel <= FORMAT_TOLERANCE[fmt], f"{name}/{fmt} (seed {seed}): relative error {rel:.2e}"
    if fmt != "fp32":
        assert rel > 0  # the format really was applied


@torch.no_grad()
def test_hybrid_stack_takes_one_policy_for_both_kinds_of_layer():
    model = make_model(VARIANTS["dba"], dtype=torch.float32, num_layers=4,
                       layer_overrides=[{"every": 2, "offset": 1, "attention": VARIANTS["gqa"]}])
    rt = DecodeRuntime(model, "k_sem=q4_0,k_geo=q8_0,k=q8_0,v=q4_0", max_length=10)
    assert [sorted(layer.formats.items()) for layer in rt.cache.layers[:2]] == [
        [("k_geo", "q8_0"), ("k_sem", "q4_0"), ("v", "q4_0")], [("k", "q8_0"), ("v", "q4_0")]]
    ids = torch.randint(0, 97, (1, 10))
    torch.testing.assert_close(rt.forward(ids), model(ids), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("policy", ["q4_0,tail=3", "k_sem=q4_0,k_geo=q8_0,v=q4_0,tail=5,rollback=2"])
@torch.no_grad()
def test_exact_tail_is_per_query_so_chunking_does_not_matter(policy):
    """A query reads its own newest `tail` tokens exactly, whether the tokens arrive one by one
    or in chunks longer than the tail window."""
    model = make_model(VARIANTS["dba_gqa_null_gate"], dtype=torch.float32)
    ids = torch.randint(0, 97, (2, 23))
    one_by_one = steps(DecodeRuntime(model, policy, batch=2, max_length=23), ids)
    chunked = DecodeRuntime(model, policy, batch=2, max_length=23)
    in_chunks = torch.cat([chunked.forward(ids[:, s: s + 9]) for s in range(0, 23, 9)], 1)
    torch.testing.assert_close(in_chunks, one_by_one, rtol=1e-5, atol=1e-5)
