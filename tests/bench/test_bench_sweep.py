import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnlab.bench import sweep
from attnlab.bench.context import BenchContext
from attnlab.bench.sweep import run_context_sweep
from attnlab.config import ModelConfig
from attnlab.config.bench import ContextSweepBench
from attnlab.errors import ConfigError
from attnlab.model import build_model

BLOCK = 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({"vocab_size": 256, "d_model": 32, "num_layers": 2, "block_size": BLOCK,
                                      "attention": {"type": "decoupled", "num_heads": 2, "sem_dim": 16, "geo_dim": 16}})
    return build_model(cfg).eval()


def context(model, **kw):
    return BenchContext(model=model, device=torch.device("cpu"), dtype=torch.float32, run_key="test", **kw)


HELDOUT = np.random.default_rng(0).integers(0, 256, 50).astype(np.uint16)  # shorter than the longest point


def test_rows_per_length_with_chunking_and_wrapped_heldout(model):
    rows = run_context_sweep(ContextSweepBench(lengths=[8, 40, 2 * BLOCK + 3], decode_tokens=3),
                             context(model, heldout=HELDOUT, cache_policy="q8_0"))
    assert [r["length"] for r in rows] == [8, 40, 67]
    assert [r["last_chunk_tokens"] for r in rows] == [8, 8, 3]
    for r in rows:
        assert r["ok"] is True and r["error"] is None and r["chunk"] == BLOCK and r["policy"] == "q8_0"
        assert r["prefill_s"] > 0 and r["last_chunk_ms"] > 0 and r["decode_ms"] > 0
        assert r["last_chunk_ms"] <= 1000 * r["prefill_s"]
        assert r["last_chunk_ppl"] == pytest.approx(math.exp(r["last_chunk_loss"]))
        # the runtime is allocated once for the length plus the decode steps
        assert r["kv_bytes_allocated"] == r["kv_bytes_per_token"] * (r["length"] + 3)
        assert r["peak_device_bytes"] is None
        assert all(isinstance(v, (str, int, float, bool, type(None))) for v in r.values())


def test_last_chunk_loss_is_the_teacher_forced_nll(model):
    """With an exact cache the last chunk's loss equals the full forward's NLL on those positions."""
    length, chunk = 24, 10  # chunks 10, 10, 4
    rows = run_context_sweep(ContextSweepBench(lengths=[length], chunk=chunk, policy="fp32"),
                             context(model, heldout=HELDOUT))
    ids = torch.from_numpy(HELDOUT[: length + 1].astype(np.int64))[None]
    logits = model(ids[:, :length])
    expected = F.cross_entropy(logits[0, 20:length], ids[0, 21: length + 1]).item()
    assert rows[0]["last_chunk_tokens"] == 4 and rows[0]["chunk"] == chunk
    assert rows[0]["last_chunk_loss"] == pytest.approx(expected, abs=1e-5)


def test_a_failing_point_is_recorded_and_the_sweep_continues(model, monkeypatch):
    real = sweep.sweep_point

    def flaky(model, policy, ids, *args, **kw):
        if ids.shape[1] - 1 == 40:
            raise MemoryError("cannot allocate 1.5 GiB\nsecond line")
        return real(model, policy, ids, *args, **kw)

    monkeypatch.setattr(sweep, "sweep_point", flaky)
    rows = run_context_sweep(ContextSweepBench(lengths=[8, 40, 50], decode_tokens=1), context(model))
    assert [r["ok"] for r in rows] == [True, False, True]
    failed = rows[1]
    assert failed["error"] == "MemoryError: cannot allocate 1.5 GiB"
    assert failed["prefill_s"] is None and failed["last_chunk_loss"] is None and failed["decode_ms"] is None
    assert set(failed) == set(rows[0]) and rows[2]["last_chunk_loss"] > 0


def test_out_of_memory_inside_the_model_is_caught(model, monkeypatch):
    calls = {"n": 0}

    def boom(module, args):
        if args[0].shape[1] > 16:
            calls["n"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = model.register_forward_pre_hook(boom)
    try:
        rows = run_context_sweep(ContextSweepBench(lengths=[30, 12], decode_tokens=1), context(model))
    finally:
        hook.remove()
    assert calls["n"] == 1 and [r["ok"] for r in rows] == [False, True]
    assert rows[0]["error"].startswith("OutOfMemoryError: CUDA out of memory")


def test_bad_chunk_and_length(model):
    with pytest.raises(ConfigError, match="chunk"):
        run_context_sweep(ContextSweepBench(lengths=[8], chunk=BLOCK + 1), context(model))
    with pytest.raises(ConfigError, match=r"lengths\[1\]"):
        run_context_sweep(ContextSweepBench(lengths=[8, 0]), context(model))
