"""Cached generation vs the uncached reference: every attention variant, chunked prefill, batches
of different lengths, stop ids, a quantized cache, bad inputs."""

import pytest
import torch

from attnlab.config import ModelConfig
from attnlab.errors import InputError
from attnlab.infer import DecodeRuntime, SamplingConfig, generate, generate_uncached
from attnlab.model import build_model

VOCAB = 61
VARIANTS = {
    "standard": {"type": "standard", "num_heads": 4},
    "gqa": {"type": "standard", "num_heads": 4, "num_kv_heads": 2},
    "bottleneck": {"type": "bottleneck", "num_heads": 4, "attn_dim": 32},
    "dba_null_gate": {"type": "decoupled", "num_heads": 4, "num_kv_heads": 2, "sem_dim": 16, "geo_dim": 32,
                      "null_token": True, "gate": True},
}


def make_model(attention=VARIANTS["standard"], seed=0, block_size=32, d_model=48, vocab=VOCAB):
    """Untied head and init_std 0.2: varied greedy output that depends on attention (the default
    tied N(0, 0.02) init mostly repeats the input token)."""
    torch.manual_seed(seed)
    cfg = ModelConfig.model_validate({"vocab_size": vocab, "d_model": d_model, "num_layers": 2,
                                      "block_size": block_size, "attention": attention,
                                      "tie_embeddings": False, "init_std": 0.2})
    model = build_model(cfg).float().eval()
    with torch.no_grad():  # gates and null tokens away from their init values
        for name, p in model.named_parameters():
            if "gate" in name or "null" in name:
                p.normal_(0, 0.5)
    return model


def prompt(n, seed=1):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_greedy_equals_uncached(name):
    model = make_model(VARIANTS[name])
    p = prompt(11)  # crosses the prefill chunk boundary at 4 and 8
    res = generate(model, [p], 12, prefill_chunk=4)
    assert res.tokens[0] == generate_uncached(model, p, 12)
    stats = res.stats
    assert stats.prompt_tokens == 11 and stats.new_tokens == 12 and stats.decode_steps == 11
    assert stats.decode_tokens == 11 and stats.prefill_tokens_per_s > 0 and stats.decode_ms_per_token > 0
    assert stats.cache.max_length == 11 + 11 and stats.cache.bytes_per_token > 0
    # the runtime generate builds holds the prompt plus max_new_tokens, allocated once
    assert stats.cache.capacity == 11 + 12
    assert stats.cache.bytes_allocated == stats.cache.bytes_per_token * stats.cache.capacity + stats.cache.tail_bytes


def test_batched_equals_one_by_one():
    model = make_model(VARIANTS["dba_null_gate"])
    prompts = [prompt(3, 1), prompt(9, 2), prompt(1, 3)]
    batched = generate(model, prompts, 10, prefill_chunk=4).tokens
    assert batched == [generate(model, [p], 10).tokens[0] for p in prompts]
    assert batched == [generate_uncached(model, p, 10) for p in prompts]


def test_stop_ids_stop_each_sequence_independently():
    model = make_model()
    prompts = [prompt(3, 1), prompt(9, 2), prompt(1, 3)]
    free = generate(model, prompts, 10).tokens
    stop = free[0][2]  # the third token of sequence 0
    assert stop in free[1] and stop not in free[2]  # stops 0 and 1 at different steps, 2 runs on
    res = generate(model, prompts, 10, stop_ids=(stop,))
    for full, got in zip(free, res.tokens):
        cut = full[: full.index(stop) + 1] if stop in full else full
        assert got == cut
    assert res.tokens[0][-1] == stop and len(res.tokens[0]) <= 3
    assert res.stats.new_tokens == sum(len(t) for t in res.tokens)


def test_chunked_prefill_logits_equal_one_shot_and_go_past_block_size():
    model = make_model(VARIANTS["gqa"], block_size=16)
    prompts = [prompt(13, 1), prompt(5, 2), prompt(16, 3)]
    one = DecodeRuntime(model, batch=3, max_length=16).prefill(prompts)
    runtime = DecodeRuntime(model, batch=3, max_length=16)
    for chunk in (1, 3, 8):
        runtime.reset()  # one runtime, reused
        torch.testing.assert_close(runtime.prefill(prompts, chunk), one, rtol=1e-5, atol=1e-5)
        assert runtime.host_lengths == [13, 5, 16]
    with torch.no_grad():
        for b, p in enumerate(prompts):  # the last real token's logits, per prompt
            torch.testing.assert_close(one[b], model(torch.tensor([p]))[0, -1], rtol=1e-5, atol=1e-5)
    long = prompt(40, 4)  # longer than block_size: fine through chunks
    runtime = DecodeRuntime(model, max_length=40)
    logits = runtime.prefill([long])
    assert logits.shape == (1, VOCAB) and runtime.host_lengths == [40]
    assert len(generate(model, [long], 5).tokens[0]) == 5


def test_quantized_cache_runs_and_stays_close():
    model = make_model(VARIANTS["dba_null_gate"])
    p = prompt(12)
    exact = generate(model, [p], 16)
    quant = generate(model, [p], 16, cache_policy="q8_0")
    assert len(quant.tokens[0]) == 16
    assert quant.stats.cache.bytes_per_token < exact.stats.cache.bytes_per_token / 1.5
    # teacher-forced top-1 agreement along the exact continuation
    ids = torch.tensor([p + exact.tokens[0]])
    with torch.no_grad():
        ref = model(ids)[0, len(p) - 1: -1].argmax(-1)
        got = DecodeRuntime(model, "q8_0", max_length=ids.shape[1]).forward(ids)[0, len(p) - 1: -1].argmax(-1)
    assert (ref == got).float().mean() >= 0.8


def test_sampling_is_seeded_and_keep_cache():
    model = make_model()
    prompts = [prompt(4, 1), prompt(6, 2)]
    cfg = SamplingConfig(1.0, top_k=20)
    a = generate(model, prompts, 8, cfg, seed=7)
    b = generate(model, prompts, 8, cfg, seed=7, keep_cache=True)
    assert a.tokens == b.tokens and a.runtime is None
    assert b.runtime.host_lengths == [4 + 7, 6 + 7]
    # a kept runtime decodes the next prompts of the same batch size (reset first): same tokens
    assert generate(model, prompts, 8, cfg, seed=7, runtime=b.runtime).tokens == a.tokens
    assert generate(model, prompts, 8, cfg, seed=8).tokens != a.tokens
    assert generate(model, prompts, 0).tokens == [[], []]


@pytest.mark.parametrize("prompts, needle", [
    ([[1, 2], []], "prompt 1 is empty"),
    ([[1, VOCAB]], f"token id {VOCAB} is outside the model's vocab"),
    ([[-1]], "token id -1 is outside"),
    ([[1, 2.5]], "token ids must be integers"),
    ([1, 2, 3], "wrap a single prompt"),
    ([], "non-empty list"),
])
def test_bad_inputs_raise_input_error(prompts, needle):
    model = make_model()
    with pytest.raises(InputError, match=needle) as err:
        generate(model, prompts, 4)
    assert "\n" not in str(err.value)


def test_bad_chunk_and_token_count():
    model = make_model(block_size=16)
    with pytest.raises(InputError, match="prefill chunk size must lie in 1..block_size"):
        DecodeRuntime(model).prefill([[1, 2]], chunk_size=17)
    with pytest.raises(InputError, match="max_new_tokens"):
        generate(model, [[1]], -1)
    with pytest.raises(InputError, match="this runtime decodes 1 sequences, got 2 prompts"):
        DecodeRuntime(model).prefill([[1], [2]])


def test_runtime_too_short_or_of_another_batch_is_an_input_error():
    """A runtime holds at most max_length tokens per sequence (prompt plus new tokens) and decodes
    exactly its batch: anything else is a one-line InputError, never a shape error deep inside."""
    model = make_model()
    short = DecodeRuntime(model, max_length=8)
    with pytest.raises(InputError, match="max_length=8") as err:
        generate(model, [prompt(5)], 6, runtime=short)  # 5 + 6 - 1 = 10 tokens held > 8
    assert "\n" not in str(err.value) and "would hold 9 tokens" in str(err.value)
    with pytest.raises(InputError, match="max_length=8") as err:
        generate(model, [prompt(9)], 1, runtime=short)  # the prompt alone does not fit
    assert "\n" not in str(err.value)
    assert len(generate(model, [prompt(5)], 4, runtime=short).tokens[0]) == 4  # 5 + 3 = 8: fits exactly
    with pytest.raises(InputError, match="runtime was built for 1 sequences, got 2 prompts") as err:
        generate(model, [prompt(3), prompt(4)], 2, runtime=short)
    assert "\n" not in str(err.value)
