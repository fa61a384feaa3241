"""The decode runtime on the CPU (eager steps; graph replays are tests/infer/test_infer_runtime_cuda.py):
a step is exactly a one-token forward, prefill of prompts of different lengths, reset and
truncate, byte accounting, greedy generation against the uncached reference for several
attention variants and cache formats, and one-line errors."""

import pytest
import torch

from attnlab.cache import CachePolicy
from attnlab.config import ModelConfig
from attnlab.errors import InputError
from attnlab.infer import DecodeRuntime, generate, generate_uncached
from attnlab.model import build_model
from attnlab.model.stats import kv_bytes_per_token_layer

VOCAB = 61
STANDARD = {"type": "standard", "num_heads": 4}
GQA = {"type": "standard", "num_heads": 4, "num_kv_heads": 2}
DBA = {"type": "decoupled", "num_heads": 4, "num_kv_heads": 2, "sem_dim": 16, "geo_dim": 32,
       "null_token": True, "gate": True}
#: "hybrid": one model with a standard, a GQA and a DBA (null token + gate) layer
VARIANTS = {"standard": STANDARD, "gqa": GQA, "dba_null_gate": DBA, "hybrid": DBA}
HYBRID = [{"layers": [0], "attention": STANDARD}, {"layers": [1], "attention": GQA}]
#: fp32, q8_0 with a short exact tail, and the heterogeneous policy (its standard-layer form for
#: standard models; both forms for the hybrid stack)
POLICIES = {"fp32": "fp32", "q8_0_tail4": "q8_0,tail=4", "heterogeneous": None}


def heterogeneous(variant: str) -> str:
    return {"standard": "k=q8_0,v=q4_0", "gqa": "k=q8_0,v=q4_0", "dba_null_gate": "k_sem=q4_0,k_geo=q8_0,v=q4_0",
            "hybrid": "k_sem=q4_0,k_geo=q8_0,k=q8_0,v=q4_0"}[variant]


def make_model(variant="dba_null_gate", dtype=torch.float32, seed=0, block_size=32):
    """Untied head, init_std 0.2: greedy output that depends on attention."""
    torch.manual_seed(seed)
    cfg = {"vocab_size": VOCAB, "d_model": 48, "num_layers": 3 if variant == "hybrid" else 2,
           "block_size": block_size, "attention": VARIANTS[variant], "tie_embeddings": False, "init_std": 0.2}
    if variant == "hybrid":
        cfg["layer_overrides"] = HYBRID
    model = build_model(ModelConfig.model_validate(cfg)).to(dtype).eval()
    with torch.no_grad():  # gates and null tokens away from their init values
        for name, p in model.named_parameters():
            if "gate" in name or "null" in name:
                p.normal_(0, 0.5)
    return model


def prompts(lengths=(9, 4, 12), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def tokens(batch, seed):
    return torch.randint(0, VOCAB, (batch,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- step, prefill, reset, truncate
@pytest.mark.parametrize("policy", [None, "q8_0,tail=4"])
@pytest.mark.parametrize("variant", ["standard", "gqa", "dba_null_gate"])
@torch.no_grad()
def test_step_is_exactly_a_one_token_forward(variant, policy):
    model = make_model(variant, dtype=torch.float64)
    ps = prompts()
    stepped = DecodeRuntime(model, policy, batch=3, max_length=20)
    forwarded = DecodeRuntime(model, policy, batch=3, max_length=20)
    assert torch.equal(stepped.prefill(ps, 5), forwarded.prefill(ps, 5))
    for i in range(6):
        tok = tokens(3, i)
        got = stepped.step(tok)
        assert got.shape == (3, VOCAB) and got.dtype == torch.float64
        assert torch.equal(got, forwarded.forward(tok[:, None])[:, 0])
    assert stepped.host_lengths == forwarded.host_lengths == [15, 10, 18]
    assert stepped.lengths.tolist() == [15, 10, 18] and stepped.lengths.dtype == torch.int32


@torch.no_grad()
def test_prefill_of_prompts_of_different_lengths_and_continuing_them():
    model = make_model(dtype=torch.float64)
    first, more = prompts((9, 4, 12)), prompts((2, 5, 1), seed=2)
    rt = DecodeRuntime(model, batch=3, max_length=13)
    last = rt.prefill(first, chunk_size=5)  # chunks of 5: each prompt ends in a different chunk
    assert last.shape == (3, VOCAB) and rt.host_lengths == [9, 4, 12]
    for b, p in enumerate(first):
        torch.testing.assert_close(last[b], model(torch.tensor([p]))[0, -1], rtol=1e-10, atol=1e-10)
    cont = rt.prefill(more, chunk_size=3)  # prompts continue the sequences
    assert rt.host_lengths == [11, 9, 13]
    for b, (p, q) in enumerate(zip(first, more)):
        torch.testing.assert_close(cont[b], model(torch.tensor([p + q]))[0, -1], rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_reset_reuses_the_storage_and_decodes_as_a_fresh_runtime():
    model = make_model()
    policy = "k_sem=q4_0,k_geo=q8_0,v=q4_0,tail=2"
    rt = DecodeRuntime(model, policy, batch=2, max_length=16)
    storage = [store.codes.data_ptr() for layer in rt.cache.layers for store in layer.stores.values()]
    allocated = rt.report().bytes_allocated
    rt.prefill(prompts((12, 7)), 4)
    for i in range(3):
        rt.step(tokens(2, i))
    rt.reset()
    assert rt.host_lengths == [0, 0] and rt.lengths.tolist() == [0, 0] and rt.report().max_length == 0
    fresh = DecodeRuntime(model, policy, batch=2, max_length=16)
    new = prompts((3, 8), seed=5)
    assert torch.equal(rt.prefill(new, 4), fresh.prefill(new, 4))
    for i in range(5):
        assert torch.equal(rt.step(tokens(2, 10 + i)), fresh.step(tokens(2, 10 + i)))
    assert [store.codes.data_ptr() for layer in rt.cache.layers for store in layer.stores.values()] == storage
    assert rt.report().bytes_allocated == allocated


@torch.no_grad()
def test_truncate_per_sequence_continues_like_the_shorter_sequences():
    model = make_model()
    policy = "q8_0,tail=4"
    ps = prompts((10, 7))
    rt = DecodeRuntime(model, policy, batch=2, max_length=16)
    rt.prefill(ps, 4)
    rt.forward(torch.randint(0, VOCAB, (2, 3)))  # a rejected draft
    rt.truncate([8, 7])
    assert rt.host_lengths == [8, 7] and rt.lengths.tolist() == [8, 7]
    short = DecodeRuntime(model, policy, batch=2, max_length=16)
    short.prefill([ps[0][:8], ps[1]], 4)
    for i in range(4):
        torch.testing.assert_close(rt.step(tokens(2, i)), short.step(tokens(2, i)), rtol=0, atol=0)
    with pytest.raises(InputError, match="truncate: 1 lengths for a batch of 2"):
        rt.truncate([3])
    with pytest.raises(InputError, match="sequence 1 has 11 tokens; cannot set length 12"):
        rt.truncate([5, 12])
    assert rt.host_lengths == [12, 11]


# ---------------------------------------------------------------- accounting
@pytest.mark.parametrize("name", list(POLICIES))
def test_report_allocated_is_the_analytic_bytes_times_capacity_plus_the_tail(name):
    model = make_model("hybrid")
    policy = CachePolicy.parse(POLICIES[name] or heterogeneous("hybrid"))
    rt = DecodeRuntime(model, policy, batch=3, max_length=21)
    with torch.no_grad():
        rt.prefill(prompts(), 5)
        rt.step(tokens(3, 0))
    report = rt.report()
    layers = [layer.dims for layer in model.attention_layers()]
    analytic = [kv_bytes_per_token_layer(d, {f: policy.format_for(f, "fp32") for f in d.cache_fields}) for d in layers]
    assert report.bytes_per_token_layer == analytic and report.bytes_per_token == sum(analytic)
    ring = policy.tail + policy.rollback  # slots per sequence: every field at fp32, plus the slot's position
    tail = sum(3 * ring * (sum(d.num_kv_heads * hd for hd in d.cache_fields.values()) * 4 + 8) for d in layers)
    assert report.tail_bytes == (tail if policy.tail else 0)
    assert report.capacity == 21 and report.batch == 3 and report.max_length == 13
    assert report.bytes_allocated == report.bytes_per_token * 3 * 21 + report.tail_bytes
    assert report.used_bytes + report.slack_bytes == report.bytes_per_token * 3 * 21


# ---------------------------------------------------------------- greedy generation
@torch.no_grad()
def reforward_greedy(model, policy, prompt, n):
    """Greedy tokens from a fresh one-shot cached forward of the whole sequence each step (what
    the cache stores, read back, without any decode loop)."""
    ids = list(prompt)
    for _ in range(n):
        logits = DecodeRuntime(model, policy, max_length=len(ids)).forward(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generate_equals_the_uncached_reference(variant, name):
    """Batched greedy generation through the runtime (chunked prefill, then steps) equals
    ``generate_uncached`` wherever the cache is exact: fp32, and the quantized policies with an
    exact tail covering the whole sequence. Where old tokens are read quantized it equals the
    reference over the same stored rows (a one-shot cached forward of the whole sequence per
    token); greedy under q4_0 leaves the exact reference within a few tokens on this model, so
    the exact-tail run shows the tail is really read."""
    model = make_model(variant)
    policy = POLICIES[name] or heterogeneous(variant)
    ps, new = prompts((5, 11, 8)), 12
    got = generate(model, ps, new, cache_policy=policy, prefill_chunk=4).tokens
    if name == "fp32":
        assert got == [generate_uncached(model, p, new) for p in ps]
        return
    assert got == [reforward_greedy(model, policy, p, new) for p in ps]
    exact_tail = CachePolicy.parse(policy)
    exact_tail = CachePolicy(exact_tail.formats, exact_tail.default, tail=32, rollback=0)
    assert generate(model, ps, new, cache_policy=exact_tail, prefill_chunk=4).tokens == [
        generate_uncached(model, p, new) for p in ps]


# ---------------------------------------------------------------- errors
@torch.no_grad()
def test_more_tokens_than_max_length_is_a_one_line_input_error():
    model = make_model()
    rt = DecodeRuntime(model, batch=2, max_length=10)
    for call in (lambda: rt.prefill(prompts((11, 3))),                              # a prompt alone
                 lambda: rt.forward(torch.zeros(2, 11, dtype=torch.long))):
        with pytest.raises(InputError, match="max_length=10") as err:
            call()
        assert "\n" not in str(err.value)
    assert rt.host_lengths == [0, 0]  # nothing was written
    rt.prefill(prompts((9, 6)))
    rt.step(tokens(2, 0))  # sequence 0 now holds 10 = max_length
    with pytest.raises(InputError, match="sequence 0 would hold 11 tokens; .*max_length=10 \\(prompt plus new"):
        rt.step(tokens(2, 1))
    with pytest.raises(InputError, match="max_length=10"):  # generate: prompt + new tokens past it
        generate(model, prompts((6, 2)), 6, runtime=rt)
    with pytest.raises(InputError, match="max_length must be an integer >= 1"):
        DecodeRuntime(model, max_length=0)


@torch.no_grad()
def test_a_batch_other_than_the_runtimes_is_an_input_error():
    model = make_model()
    rt = DecodeRuntime(model, batch=2, max_length=10)
    for call, needle in ((lambda: rt.forward(torch.zeros(3, 2, dtype=torch.long)), "decodes 2 sequences"),
                         (lambda: rt.prefill(prompts((3,))), "decodes 2 sequences, got 1 prompts"),
                         (lambda: generate(model, prompts((3, 4, 5)), 2, runtime=rt), "built for 2 sequences")):
        with pytest.raises(InputError, match=needle) as err:
            call()
        assert "\n" not in str(err.value)
    assert rt.host_lengths == [0, 0]


@torch.no_grad()
def test_a_step_for_another_batch_is_an_input_error():
    rt = DecodeRuntime(make_model(), batch=2, max_length=10)
    with pytest.raises(InputError, match="2 sequences"):
        rt.step(tokens(3, 0))


@pytest.mark.slow
@torch.no_grad()
def test_compiled_step_equals_the_eager_step():
    """torch.compile of the step (cache write + attention as one opaque op, kernels.ops): the
    same logits as the eager step, and one compilation serves a second runtime of the model."""
    torch.manual_seed(3)
    cfg = ModelConfig.model_validate({"vocab_size": 61, "d_model": 32, "num_layers": 1, "block_size": 16,
                                      "norm": "rmsnorm", "mlp": {"type": "swiglu"}, "tie_embeddings": False,
                                      "attention": {"type": "decoupled", "num_heads": 2, "sem_dim": 8, "geo_dim": 16,
                                                    "null_token": True}})
    model = build_model(cfg).float().eval()
    policy = "k_sem=q4_0,k_geo=q8_0,v=q4_0,tail=2"
    eager = DecodeRuntime(model, policy, batch=2, max_length=20)
    compiled = DecodeRuntime(model, policy, batch=2, max_length=20, compile=True)
    again = DecodeRuntime(model, policy, batch=2, max_length=20, compile=True)
    ps = [[1, 2, 3], [4, 5, 6, 7, 8]]
    for rt in (eager, compiled, again):
        rt.prefill(ps)
    for t in range(3):
        tokens = torch.tensor([t + 1, t + 9])
        want = eager.step(tokens)
        torch.testing.assert_close(compiled.step(tokens), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again.step(tokens), want, rtol=1e-5, atol=1e-5)
    assert compiled.host_lengths == eager.host_lengths == [6, 8]
