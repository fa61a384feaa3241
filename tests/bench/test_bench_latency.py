import numpy as np
import pytest
import torch

from attnlab.bench import latency
from attnlab.bench.context import BenchContext
from attnlab.bench.latency import (
    bench_tokens,
    chunked_prefill,
    resolve_policy,
    run_latency,
)
from attnlab.config import ModelConfig
from attnlab.config.bench import LatencyBench
from attnlab.errors import ConfigError
from attnlab.infer import DecodeRuntime
from attnlab.model import build_model
from attnlab.model.stats import kv_bytes_per_token_layer

BLOCK = 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({"vocab_size": 256, "d_model": 32, "num_layers": 2, "block_size": BLOCK,
                                      "attention": {"type": "decoupled", "num_heads": 2, "sem_dim": 16, "geo_dim": 16}})
    return build_model(cfg).eval()


def context(model, **kw):
    return BenchContext(model=model, device=torch.device("cpu"), dtype=torch.float32, run_key="test", **kw)


def test_rows_cover_the_grid_with_units_and_analytic_bytes(model):
    cfg = LatencyBench(prompt_lengths=[8, 2 * BLOCK + 5], gen_lengths=[0, 3], batch_size=2, warmup=0, repeats=2)
    rows = run_latency(cfg, context(model, cache_policy="q8_0"))
    assert [(r["prompt_len"], r["gen_len"]) for r in rows] == [(8, 0), (8, 3), (69, 0), (69, 3)]
    q8_bytes = sum(kv_bytes_per_token_layer(layer.dims, "q8_0") for layer in model.attention_layers())
    for r in rows:
        assert r["policy"] == "q8_0" and r["batch_size"] == 2 and r["repeats"] == 2 and r["warmup"] == 0
        assert 0 < r["prefill_p10_s"] <= r["prefill_median_s"] <= r["prefill_p90_s"]
        assert r["prefill_tokens_per_s"] == pytest.approx(2 * r["prompt_len"] / r["prefill_median_s"])
        assert r["kv_bytes_per_token"] == q8_bytes
        # one runtime per prompt length, allocated for the prompt plus the longest generation
        assert r["kv_bytes_allocated"] == r["kv_bytes_per_token"] * 2 * (r["prompt_len"] + 3)
        if r["gen_len"] == 0:
            assert r["decode_ms_per_token"] is None and r["decode_tokens_per_s"] is None
        else:
            assert 0 < r["decode_p10_ms_per_token"] <= r["decode_ms_per_token"] <= r["decode_p90_ms_per_token"]
            assert r["decode_tokens_per_s"] == pytest.approx(2000 / r["decode_ms_per_token"])
        assert all(isinstance(v, (str, int, float, bool, type(None))) for v in r.values())
    # the cfg's policy wins over the run's
    assert run_latency(LatencyBench(prompt_lengths=[4], gen_lengths=[1], repeats=1, policy="q4_0"),
                       context(model, cache_policy="q8_0"))[0]["policy"] == "q4_0"


def test_decode_timing_holds_only_single_token_steps(model, monkeypatch):
    """The timed decode runs exactly gen_len one-token forwards (runtime steps); the prefill
    (chunked) and the warm-up step (graph capture on CUDA) happen in the untimed setup; the timed
    prefill is chunks of at most block_size."""
    timed: list[list[int]] = []
    inside = {"on": False}
    hook = model.register_forward_hook(lambda m, args, out: timed[-1].append(args[0].shape[1]) if inside["on"] else None)
    real = latency.time_fn

    def recording_time_fn(fn, **kw):
        def wrapped():
            timed.append([])
            inside["on"] = True
            try:
                fn()
            finally:
                inside["on"] = False
        return real(wrapped, **kw)

    monkeypatch.setattr(latency, "time_fn", recording_time_fn)
    try:
        run_latency(LatencyBench(prompt_lengths=[BLOCK + 10], gen_lengths=[5], warmup=1, repeats=2), context(model))
    finally:
        hook.remove()
    prefill_runs, decode_runs = timed[:3], timed[3:]
    assert prefill_runs == [[BLOCK, 10]] * 3
    assert decode_runs == [[1] * 5] * 3


def test_chunked_prefill_matches_one_forward(model):
    ids = torch.randint(0, 256, (2, BLOCK))
    runtime = DecodeRuntime(model, "fp32", batch=2, max_length=BLOCK)
    last = chunked_prefill(runtime, ids, chunk=10)  # chunks 10, 10, 10, 2
    assert last.shape == (2, 2, 256) and runtime.host_lengths == [BLOCK, BLOCK]
    torch.testing.assert_close(last, model(ids)[:, -2:], atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="block_size"):
        chunked_prefill(DecodeRuntime(model, None), ids[:1], chunk=BLOCK + 1)


def test_bench_tokens_wrap_the_heldout_stream_and_fall_back_to_random(model):
    heldout = np.arange(10, dtype=np.uint16)
    ids = bench_tokens(context(model, heldout=heldout), 25, batch=2)
    assert ids[0].tolist() == [i % 10 for i in range(25)]
    assert ids[1].tolist() == [(5 + i) % 10 for i in range(25)]
    rand = bench_tokens(context(model), 25, batch=2)
    assert rand.shape == (2, 25) and torch.equal(rand, bench_tokens(context(model), 25, batch=2))
    with pytest.raises(ConfigError, match="vocab"):
        bench_tokens(context(model, heldout=np.array([300])), 4)


def test_policy_resolution(model):
    assert resolve_policy(None, context(model)).label == "native"
    assert resolve_policy(None, context(model, cache_policy="q4_0")).label == "q4_0"
    assert resolve_policy("nf4", context(model, cache_policy="q4_0")).label == "nf4"
    assert resolve_policy(None, context(model), heterogeneous_default=True).label == "k_sem=q4_0,k_geo=q8_0,v=q4_0"


def test_bad_lengths_are_config_errors(model):
    with pytest.raises(ConfigError, match=r"prompt_lengths\[0\]"):
        run_latency(LatencyBench(prompt_lengths=[0], repeats=1), context(model))
