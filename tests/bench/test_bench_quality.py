import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnlab.bench.context import BenchContext
from attnlab.bench.quality import (
    compare_distributions,
    greedy_agreement,
    greedy_tokens,
    run_quality,
)
from attnlab.cache import CachePolicy
from attnlab.config import ModelConfig
from attnlab.config.bench import QualityBench
from attnlab.errors import AttnlabError, DataError
from attnlab.model import build_model

BLOCK = 32
CFG = {"vocab_size": 256, "d_model": 32, "num_layers": 2, "block_size": BLOCK, "init_std": 0.1,
       "attention": {"type": "decoupled", "num_heads": 2, "sem_dim": 16, "geo_dim": 16}}


def make_model(seed: int, **kw):
    torch.manual_seed(seed)
    return build_model(ModelConfig.model_validate(CFG | kw)).eval()


@pytest.fixture(scope="module")
def model():
    return make_model(0)


def context(model, **kw):
    return BenchContext(model=model, device=torch.device("cpu"), dtype=torch.float32, run_key="test", **kw)


HELDOUT = np.random.default_rng(0).integers(0, 256, 400).astype(np.uint16)


def test_model_against_itself_agrees(model):
    cfg = QualityBench(policy="fp32", windows=3, seq_len=16, greedy_tokens=12)
    (row,) = run_quality(cfg, context(model, heldout=HELDOUT))
    assert row["reference"] == "fp16" and row["policy"] == "fp32" and row["data"] == "heldout"
    assert row["windows"] == 3 and row["positions"] == 3 * 16 and row["greedy_prompt_len"] == 8
    assert row["top1_agreement"] == pytest.approx(1.0) and row["topk_overlap"] > 0.95
    assert 0 <= row["kl_nats_per_token"] < 1e-4 and row["kl_max_nats"] < 1e-3
    assert row["delta_nll"] == pytest.approx(0.0, abs=1e-3)
    assert row["greedy_agreement"] == row["greedy_prefix_agreement"] == row["greedy_identical"] == 1.0
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in row.values())


def test_another_model_disagrees_and_default_policy_is_heterogeneous(model):
    other = make_model(1)
    loads = []
    ctx = context(model, heldout=HELDOUT, load_reference=lambda run_id: loads.append(run_id) or other)
    (row,) = run_quality(QualityBench(reference="run:teacher", windows=2, seq_len=16, greedy_tokens=8), ctx)
    assert loads == ["teacher"] and row["reference"] == "run:teacher"
    assert row["policy"] == "k_sem=q4_0,k_geo=q8_0,v=q4_0" and row["reference_policy"] == "fp16"
    assert row["top1_agreement"] < 0.5 and row["kl_nats_per_token"] > 0.01
    assert row["greedy_agreement"] < 1.0


def test_metrics_match_a_full_forward_computation(model):
    """With exact caches the cached-decode distributions are the full forward's: check the
    metrics against a direct computation on the same windows."""
    other = make_model(2)
    windows = torch.randint(0, 256, (3, 11))
    got = compare_distributions(model, CachePolicy.parse("fp32"), other, CachePolicy.parse("fp32"), windows,
                                top_k=4, batch_size=2)
    logp = torch.log_softmax(model(windows[:, :-1]), -1).flatten(0, 1)
    ref_logp = torch.log_softmax(other(windows[:, :-1]), -1).flatten(0, 1)
    top, ref_top = logp.topk(4).indices, ref_logp.topk(4).indices
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / 4 for a, b in zip(top, ref_top)]).mean()
    kl = F.kl_div(logp, ref_logp, log_target=True, reduction="batchmean")
    assert got["positions"] == 30
    assert got["topk_overlap"] == pytest.approx(overlap.item(), abs=1e-6)
    assert got["top1_agreement"] == pytest.approx((top[:, 0] == ref_top[:, 0]).double().mean().item())
    assert got["kl_nats_per_token"] == pytest.approx(kl.item(), rel=1e-4)
    assert got["nll"] == pytest.approx(F.nll_loss(logp, windows[:, 1:].flatten()).item(), rel=1e-5)


def test_greedy_agreement_counts_up_to_the_first_divergence():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    b = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4]])
    out = greedy_agreement(a, b)
    assert out["greedy_prefix_agreement"] == pytest.approx((1.0 + 0.25) / 2)
    assert out["greedy_agreement"] == pytest.approx(7 / 8)
    assert out["greedy_identical"] == 0.5


def test_greedy_tokens_extend_past_block_size(model):
    prompts = torch.randint(0, 256, (2, BLOCK - 2))
    out = greedy_tokens(model, CachePolicy.parse("fp32"), prompts, 6)
    assert out.shape == (2, 6)
    first = model(prompts)[:, -1].argmax(-1)
    assert torch.equal(out[:, 0], first)


def test_errors_and_random_fallback(model):
    with pytest.raises(AttnlabError, match="none can be loaded"):
        run_quality(QualityBench(reference="run:x", windows=1, seq_len=8, greedy_tokens=2), context(model))
    small_vocab = make_model(0, vocab_size=128)
    with pytest.raises(AttnlabError, match="vocab_size"):
        run_quality(QualityBench(reference="run:x", windows=1, seq_len=8, greedy_tokens=2),
                    context(model, load_reference=lambda _: small_vocab))
    with pytest.raises(DataError, match="fewer than one window"):
        run_quality(QualityBench(windows=1, seq_len=16), context(model, heldout=HELDOUT[:10]))
    (row,) = run_quality(QualityBench(windows=1, seq_len=8, greedy_tokens=2), context(model))
    assert row["data"] == "random" and row["positions"] == 8
