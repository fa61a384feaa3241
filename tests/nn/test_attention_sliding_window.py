"""Sliding-window attention: the mask vs a brute-force window, cached decode / chunked prefill /
rollback vs the full forward (float64), bytes that do not grow with the context, bad input."""

from __future__ import annotations

import pytest
import torch

from attnlab.config.model import ModelConfig
from attnlab.errors import ConfigError
from attnlab.infer.runtime import DecodeRuntime
from attnlab.model.decoder import DecoderLM
from decode_checks import assert_cached_paths_equal_the_full_forward


def _model(window=5, layers=2, context=64, dtype=torch.float64):
    cfg = ModelConfig.model_validate(dict(vocab_size=61, d_model=32, num_layers=layers, block_size=context,
                                          attention=dict(type="sliding_window", num_heads=4, num_kv_heads=2,
                                                         window=window)))
    torch.manual_seed(0)
    return DecoderLM(cfg).to(dtype).eval()


def test_mask_is_the_window():
    layer = _model().attention_layers()[0]
    dense = layer.mask.dense(1, 20, 20, "cpu")[0]
    for t in range(20):
        assert dense[t].nonzero().flatten().tolist() == list(range(max(0, t - 5), t + 1))


@pytest.mark.parametrize("window", [0, 5, 40])
def test_decode_and_chunks_equal_the_full_forward(window):
    ids = torch.randint(0, 61, (2, 60), generator=torch.Generator().manual_seed(1))
    assert_cached_paths_equal_the_full_forward(_model(window), ids, attention_impl="eager")


def test_rollback_within_the_ring_and_refused_beyond():
    model = _model(4)
    ids = torch.randint(0, 61, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        rt = DecodeRuntime(model, "rollback=4", batch=1, max_length=64)
        rt.forward(ids[:, :20])
        rt.forward(ids[:, 20:24])
        rt.truncate(21)
        after = torch.cat([rt.forward(ids[:, t:t + 1]) for t in range(21, 40)], 1)
        torch.testing.assert_close(after, model(ids)[:, 21:], atol=1e-10, rtol=0)
        with pytest.raises(Exception, match="cannot roll back"):
            rt.truncate(10)


def test_bytes_are_the_window_only():
    model = _model(7, context=4096, dtype=torch.float32)
    rt = DecodeRuntime(model, "k=fp16,v=fp16,rollback=0", batch=1, max_length=4096)
    cache = rt.cache.layers[0]
    row = 2 * 2 * 8  # k + v, 2 kv heads x 8, fp16
    assert cache.bytes_per_token() == 0
    assert cache.retained_bytes(3) == 3 * 2 * row and cache.retained_bytes(4000) == 8 * 2 * row
    assert cache.bytes_allocated() < 4096 * 2 * row / 100  # nothing per position is allocated


@pytest.mark.parametrize("window,needle", [(-1, ">= 0"), (65, "larger than the context"), (1.5, "window")])
def test_bad_windows_are_one_line_errors(window, needle):
    from attnlab.config.base import validate_section

    with pytest.raises(ConfigError) as err:
        validate_section(ModelConfig, dict(vocab_size=61, d_model=32, num_layers=1, block_size=64,
                                           attention={"type": "sliding_window", "num_heads": 4, "window": window}),
                         "model")
    assert needle in str(err.value) and "\n" not in str(err.value)
