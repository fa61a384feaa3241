"""Speculative decoding: the accept/resample rule is exact (checked statistically on a tiny
vocab), greedy speculative decoding reproduces the target's greedy output, caches roll back."""

import copy

import pytest
import torch

from attnlab.config import ModelConfig
from attnlab.errors import InputError
from attnlab.infer import (
    SamplingConfig,
    accept_or_resample,
    generate,
    generate_uncached,
    speculative_generate,
    speculative_step_distribution,
)
from attnlab.model import build_model

VOCAB = 61


def make_model(attention, seed, d_model=48, block_size=48):
    torch.manual_seed(seed)
    cfg = ModelConfig.model_validate({"vocab_size": VOCAB, "d_model": d_model, "num_layers": 2,
                                      "block_size": block_size, "attention": attention,
                                      "tie_embeddings": False, "init_std": 0.2})
    model = build_model(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name or "null" in name:
                p.normal_(0, 0.5)
    return model


TARGET = {"type": "decoupled", "num_heads": 4, "num_kv_heads": 2, "sem_dim": 16, "geo_dim": 32,
          "null_token": True, "gate": True}
DRAFT = {"type": "standard", "num_heads": 2}


@pytest.fixture(scope="module")
def target():
    return make_model(TARGET, seed=0)


@pytest.fixture(scope="module")
def draft(target):
    """A different model that agrees with the target on roughly half of the greedy proposals
    (the target's weights plus noise), so rounds end in accepts, rejections and bonus tokens."""
    model = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.005)
    return model


@pytest.fixture(scope="module")
def stranger():
    """An unrelated draft (other architecture, other weights): greedy proposals almost never match."""
    return make_model(DRAFT, seed=5, d_model=32)


def prompt(n, seed=1):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------- the rule itself
@pytest.mark.parametrize("p, q", [
    ([0.1, 0.2, 0.3, 0.25, 0.15], [0.3, 0.3, 0.1, 0.1, 0.2]),
    ([0.0, 0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]),    # target puts no mass where the draft does
    ([0.4, 0.1, 0.1, 0.1, 0.3], [0.0, 0.0, 0.5, 0.5, 0.0]),    # draft cannot propose the target's favourites
])
def test_accept_or_resample_reproduces_the_target_distribution(p, q):
    p, q = torch.tensor(p), torch.tensor(q)
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    draft_tokens = torch.multinomial(q, n, replacement=True, generator=gen)  # (n,) ~ q
    accepted, tokens = accept_or_resample(p.expand(n, -1), q.expand(n, -1), draft_tokens, gen)
    freq = torch.bincount(tokens, minlength=5).double() / n
    se = (p.double() * (1 - p.double()) / n).sqrt().clamp_min(1 / n)
    assert ((freq - p.double()).abs() <= 5 * se).all(), (freq, p)
    # acceptance probability is sum_x min(p, q); accepted tokens are the draft's
    expected_rate = torch.minimum(p, q).sum().item()
    rate = accepted.double().mean().item()
    assert abs(rate - expected_rate) <= 5 * (expected_rate * (1 - expected_rate) / n) ** 0.5 + 1 / n
    assert torch.equal(tokens[accepted], draft_tokens[accepted])
    assert (p[tokens] > 0).all()  # never emits a token the target excludes (top-k/top-p zeros)
    torch.testing.assert_close(speculative_step_distribution(p, q), p.double(), rtol=0, atol=1e-6)


def test_identical_distributions_always_accept():
    p = torch.softmax(torch.randn(1000, 7, generator=torch.Generator().manual_seed(1)), -1)
    x = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(2)).squeeze(-1)
    accepted, tokens = accept_or_resample(p, p, x, torch.Generator().manual_seed(3))
    assert accepted.all() and torch.equal(tokens, x)


# ---------------------------------------------------------------- greedy: exactly the target's output
def test_greedy_speculative_reproduces_target_greedy(target, draft, stranger):
    p = prompt(9)
    expected = generate_uncached(target, p, 20)
    res = speculative_generate(target, draft, p, 20, k=4, prefill_chunk=4)
    assert res.tokens == expected
    s = res.stats
    assert s.new_tokens == 20 and s.rounds * 5 >= 20 and 0 < s.accepted < s.proposed  # accepts and rejections
    assert s.tokens_per_s > 0 and s.decode_ms_per_token > 0 and s.target_cache.max_length <= 9 + 20
    for k in (1, 3, 7):
        assert speculative_generate(target, draft, p, 20, k=k).tokens == expected
    res = speculative_generate(target, stranger, p, 20, k=4)  # an unrelated draft: slow, still exact
    assert res.tokens == expected and res.stats.acceptance_rate < 0.2


def test_draft_equal_to_target_accepts_everything(target):
    p = prompt(6, 2)
    res = speculative_generate(target, target, p, 12, k=4)
    assert res.tokens == generate_uncached(target, p, 12)
    s = res.stats
    # 12 tokens = 5 + 5 + 2: the last round proposes only one token
    assert (s.rounds, s.proposed, s.accepted, s.acceptance_rate) == (3, 9, 9, 1.0)


@pytest.mark.parametrize("policy", ["q8_0", "k_sem=q4_0,k_geo=q8_0,v=q4_0"])
def test_greedy_speculative_with_a_quantized_target_cache(target, draft, policy):
    """Rows are quantized independently, so scoring k tokens at once stores what k single steps
    would: the output equals plain cached generation under the same policy (barring float ties)."""
    p = prompt(9, 3)
    res = speculative_generate(target, draft, p, 20, k=4, target_policy=policy, draft_policy="q8_0")
    assert res.tokens == generate(target, [p], 20, cache_policy=policy).tokens[0]
    assert res.stats.target_cache.bytes_per_token < generate(target, [p], 1).stats.cache.bytes_per_token
    assert 0 < res.stats.accepted < res.stats.proposed


def test_exact_tail_policy_matches_plain_generation(target, draft):
    """The exact tail is per query (a query reads its own newest N tokens exactly), so a k-token
    verify pass and its rollback reproduce plain cached generation under the same policy."""
    policy = "q4_0,tail=3,rollback=4"
    p = prompt(9, 3)
    res = speculative_generate(target, draft, p, 20, k=4, target_policy=policy)
    assert res.tokens == generate(target, [p], 20, cache_policy=policy).tokens[0]
    assert res.stats.accepted < res.stats.proposed


def test_short_runs(target, draft):
    p = prompt(1, 6)  # a one-token prompt: nothing to prefill, the first round feeds it
    assert speculative_generate(target, draft, p, 0).tokens == []
    one = speculative_generate(target, draft, p, 1, k=4)
    assert one.tokens == generate_uncached(target, p, 1) and one.stats.proposed == 0 and one.stats.rounds == 1
    assert speculative_generate(target, draft, p, 7, k=4).tokens == generate_uncached(target, p, 7)


def test_stop_ids(target, draft):
    p = prompt(5, 4)
    free = generate_uncached(target, p, 16)
    stop = free[6]
    res = speculative_generate(target, draft, p, 16, stop_ids=(stop,))
    assert res.tokens == free[: free.index(stop) + 1]


# ---------------------------------------------------------------- sampling end to end
@pytest.mark.parametrize("cfg", [SamplingConfig(1.0), SamplingConfig(0.8, top_k=10, top_p=0.9)])
def test_sampled_run_completes_and_is_seeded(target, draft, cfg):
    p = prompt(7, 5)
    a = speculative_generate(target, draft, p, 24, cfg, k=3, seed=11)
    assert len(a.tokens) == 24 and all(0 <= t < VOCAB for t in a.tokens)
    s = a.stats
    assert s.proposed > 0 and 0.0 <= s.acceptance_rate <= 1.0 and s.rounds >= 24 // 4
    assert speculative_generate(target, draft, p, 24, cfg, k=3, seed=11).tokens == a.tokens
    same = speculative_generate(target, target, p, 24, cfg, k=3, seed=11)
    assert same.stats.acceptance_rate > 0.9  # p == q up to float rounding of the two forward shapes


def test_bad_arguments(target, draft):
    small_vocab = build_model(ModelConfig.model_validate(
        {"vocab_size": VOCAB - 1, "d_model": 32, "num_layers": 1, "block_size": 16, "attention": DRAFT}))
    with pytest.raises(InputError, match="draft vocab size 60 differs"):
        speculative_generate(target, small_vocab, [1, 2], 4)
    with pytest.raises(InputError, match="k \\(draft tokens per round\\) must be"):
        speculative_generate(target, draft, [1, 2], 4, k=0)
    with pytest.raises(InputError, match="more than its block_size 48"):
        speculative_generate(target, draft, [1, 2], 4, k=48)
    with pytest.raises(InputError, match="needs rollback >= 4"):
        speculative_generate(target, draft, [1, 2], 4, k=4, target_policy="q8_0,tail=2,rollback=2")
    with pytest.raises(InputError, match="prompt 0 is empty"):
        speculative_generate(target, draft, [], 4)
