"""GPU: graph-captured decode == eager decode, token for token, for every variant and format;
both == the uncached reference where the cache is exact (float caches, or block formats under a
tail that covers the sequence). Also torch.compile'd steps. Skipped without CUDA."""

import pytest
import torch

from attnlab.config import ModelConfig
from attnlab.infer import DecodeRuntime, generate, generate_uncached
from attnlab.model import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

VOCAB = 101
VARIANTS = {
    "standard": {"type": "standard", "num_heads": 4},
    "gqa": {"type": "standard", "num_heads": 8, "num_kv_heads": 2},
    "bottleneck": {"type": "bottleneck", "num_heads": 4, "attn_dim": 32},
    "dba": {"type": "decoupled", "num_heads": 4, "sem_dim": 16, "geo_dim": 32},
    "dba_gqa_null_gate": {"type": "decoupled", "num_heads": 4, "num_kv_heads": 2, "sem_dim": 16, "geo_dim": 32,
                          "v_dim": 48, "null_token": True, "gate": True},
    "dba_small_heads": {"type": "decoupled", "num_heads": 8, "sem_dim": 64, "geo_dim": 256, "v_dim": 320},
    "mla": {"type": "mla", "num_heads": 4, "kv_lora_rank": 64, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16,
            "v_head_dim": 32},
}
FORMATS = ["fp32", "bf16", "q8_0", "q4_0", "nf4", "fp8_e4m3", "k_sem=q4_0,k_geo=q8_0,k=q4_0,v=q4_0,c_kv=q4_0,k_rope=q8_0",
           "k_sem=fp8_e5m2,k_geo=fp8_e4m3,k=fp8_e4m3,v=fp8_e4m3,c_kv=fp8_e4m3,k_rope=fp8_e4m3;layers=1:q8_0"]


def make_model(attention, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.model_validate({"vocab_size": VOCAB, "d_model": 128, "num_layers": 2, "block_size": 64,
                                      "attention": attention, "tie_embeddings": False, "init_std": 0.2})
    model = build_model(cfg).to(device="cuda", dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name or "null" in name:
                p.normal_(0, 0.5)
    return model


def prompts(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (k,), generator=g).tolist() for k in (7, 19, 12)][:n]


def policy_for(fmt: str, variant: str) -> str:
    """The fields of ``fmt`` that this variant stores."""
    if "=" not in fmt:
        return fmt
    fields = set(make_model(VARIANTS[variant], dtype=torch.float32).config.layer_dims()[0].cache_fields)
    base, *layers = fmt.split(";")  # per-layer overrides (bare formats) pass through
    return ";".join([",".join(p for p in base.split(",") if p.split("=")[0] in fields), *layers])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_graph_decode_equals_eager_and_the_uncached_reference(variant, fmt):
    model = make_model(VARIANTS[variant])
    policy = policy_for(fmt, variant)
    ps = prompts()
    new = 20
    graph = generate(model, ps, new, cache_policy=policy, prefill_chunk=8)
    eager_rt = DecodeRuntime(model, policy, batch=len(ps), max_length=max(map(len, ps)) + new, cuda_graphs=False)
    eager = generate(model, ps, new, prefill_chunk=8, runtime=eager_rt)
    assert graph.tokens == eager.tokens
    base, sep, layers = policy.partition(";")
    exact_policy = policy if fmt == "fp32" else f"{base},tail=64{sep}{layers}"
    exact = generate(model, ps, new, cache_policy=exact_policy, prefill_chunk=8)
    assert exact.tokens == [generate_uncached(model, p, new) for p in ps]


def _compiled_and_eager_logits(model, policy, ps, feed):
    a = DecodeRuntime(model, policy, batch=len(ps), max_length=48, cuda_graphs=False)
    b = DecodeRuntime(model, policy, batch=len(ps), max_length=48, cuda_graphs=True, compile=True)
    # copies: a graph step returns its output buffer, which the next replay overwrites
    eager, compiled = [a.prefill(ps).float().clone()], [b.prefill(ps).float().clone()]
    for tok in feed:
        eager.append(a.step(tok).float().clone())
        compiled.append(b.step(tok).float().clone())
    assert a.host_lengths == b.host_lengths and torch.equal(a.lengths, b.lengths)
    return torch.stack(eager), torch.stack(compiled)


@pytest.mark.parametrize("variant", ["gqa", "dba_gqa_null_gate"])
def test_compiled_graph_step_equals_eager_step(variant):
    """fp32: compiled + graph-captured steps equal the eager steps to rounding. bf16: inductor keeps
    fused intermediates in fp32 where eager rounds each op to bf16 (a few bf16 ulps apart, measured
    on the CPU too), so both are held against the fp32 run and the compiled one may not be worse."""
    ps = prompts()
    policy = policy_for("k_sem=q4_0,k_geo=q8_0,k=q4_0,v=q4_0", variant) + ",tail=4"
    feed = [torch.randint(0, VOCAB, (3,), generator=torch.Generator().manual_seed(t)).cuda() for t in range(6)]
    model = make_model(VARIANTS[variant])
    ref_eager, ref_compiled = _compiled_and_eager_logits(model, policy, ps, feed)
    torch.testing.assert_close(ref_compiled, ref_eager, rtol=1e-4, atol=1e-4)
    eager, compiled = _compiled_and_eager_logits(make_model(VARIANTS[variant], dtype=torch.bfloat16), policy, ps, feed)
    err_eager = (eager - ref_eager).abs().max().item()
    err_compiled = (compiled - ref_eager).abs().max().item()
    assert err_compiled <= 1.5 * err_eager + 1e-2, (err_compiled, err_eager)


def test_runtime_after_prefill_allocates_exactly_the_analytic_bytes():
    model = make_model(VARIANTS["dba_gqa_null_gate"], dtype=torch.bfloat16)
    rt = DecodeRuntime(model, "k_sem=q4_0,k_geo=q8_0,v=q4_0", batch=2, max_length=200)
    rt.prefill([[t % VOCAB for t in range(1, 150)], [t % VOCAB for t in range(2, 100)]], 64)
    report = rt.report()
    assert report.bytes_allocated == report.bytes_per_token * 2 * 200
