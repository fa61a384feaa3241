import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnlab.bench.kv_policies import compare_policies, default_policies, format_policy_table
from attnlab.bench.perplexity import cached_decode_nll, eval_windows, forward_nll
from attnlab.config import ModelConfig
from attnlab.model import build_model
from attnlab.model.stats import model_stats


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({"vocab_size": 50, "d_model": 32, "num_layers": 2, "block_size": 16,
                                      "attention": {"type": "decoupled", "num_heads": 2, "sem_dim": 32, "geo_dim": 32, "null_token": True}})
    return build_model(cfg).eval()


def test_windows_are_evenly_spaced_and_deterministic():
    tokens = np.arange(100, dtype=np.uint16)
    w = eval_windows(tokens, 9, 4)
    assert w.shape == (4, 10) and w[0, 0] == 0 and w[-1, -1] == 99
    assert torch.equal(w, eval_windows(tokens, 9, 4))
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_windows(tokens[:5], 9, 4)


def test_forward_nll_is_the_mean_cross_entropy(model):
    w = torch.randint(0, 50, (3, 17))
    expected = F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten()).item()
    assert forward_nll(model, w, batch_size=2).nll == pytest.approx(expected, rel=1e-6)


def test_cached_decode_with_an_exact_cache_matches_the_forward(model):
    w = torch.randint(0, 50, (3, 17))
    exact, runtime = cached_decode_nll(model, w, "fp32", batch_size=2)
    assert runtime.batch == 1 and runtime.host_lengths == [16]  # the last batch's runtime, sized to the window
    assert exact.nll == pytest.approx(forward_nll(model, w).nll, abs=1e-5)
    coarse, _ = cached_decode_nll(model, w, "q4_0", batch_size=2)
    assert coarse.nll != pytest.approx(exact.nll, abs=1e-7)
    # per-window NLLs (for report intervals): equal-length windows, so their mean is the NLL
    full = forward_nll(model, w, batch_size=3)
    for result in (exact, coarse, full):
        assert len(result.window_nll) == len(w)
        assert sum(result.window_nll) / len(w) == pytest.approx(result.nll, rel=1e-9)
    assert exact.window_nll == pytest.approx(full.window_nll, abs=1e-5)


def test_policy_rows_report_analytic_and_allocated_bytes(model):
    w = torch.randint(0, 50, (4, 17))
    policies = default_policies(model)
    assert policies[-1] == "k_sem=q4_0,k_geo=q8_0,v=q4_0"
    reference, rows = compare_policies(model, w, policies, batch_size=4)
    stats = model_stats(model.config, formats=("fp16", "q8_0", "q4_0", "nf4"))
    for row in rows:
        assert row.bytes_per_token == stats.kv_total(row.policy)
        # runtimes are sized to the window: allocated == analytic (no tail in these policies)
        assert row.allocated_per_token == row.bytes_per_token and row.slack_bytes == 0 == row.tail_bytes
    assert rows[0].delta_nll == pytest.approx(0.0, abs=2e-3)  # fp16
    text = format_policy_table(reference, rows)
    assert "k_sem=q4_0,k_geo=q8_0,v=q4_0" in text and "KV B/tok allocated" in text
