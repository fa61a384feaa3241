import math

import pytest
import torch

from attnlab.config.attention import Llama3RopeScaling, RopeConfig
from attnlab.nn.rope import RotaryEmbedding, apply_llama3_scaling, rope_inv_freq


def test_inv_freq_matches_formula():
    inv = rope_inv_freq(RopeConfig(theta=500.0), 8)
    expected = torch.tensor([500.0 ** (-i / 8) for i in (0, 2, 4, 6)], dtype=torch.float64)
    torch.testing.assert_close(inv, expected)


def test_explicit_frequency_list_is_used_verbatim():
    freqs = [1.0, 0.25, 0.01]
    inv = rope_inv_freq(RopeConfig(inv_freq=freqs), 6)
    assert inv.tolist() == freqs


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rotation_is_relative_and_norm_preserving(style):
    torch.manual_seed(0)
    rope = RotaryEmbedding(RopeConfig(style=style, theta=100.0), 16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    def score(m, n):
        return (rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum()
    torch.testing.assert_close(score(7, 3), score(104, 100), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 4))
    torch.testing.assert_close(rope(q, torch.tensor([37])).norm(), q.norm())


def test_interleaved_equals_half_under_pair_permutation():
    torch.manual_seed(0)
    d = 8
    x = torch.randn(2, 3, 5, d)
    pos = torch.arange(5)
    half = RotaryEmbedding(RopeConfig(style="half"), d)(x, pos)
    # interleaved layout of the same pairs: (x0, x4), (x1, x5), ...
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    inter = RotaryEmbedding(RopeConfig(style="interleaved"), d)(x[..., perm], pos)
    torch.testing.assert_close(inter, half[..., perm])


def test_position_zero_is_identity_and_batch_positions_broadcast():
    rope = RotaryEmbedding(RopeConfig(), 4)
    x = torch.randn(2, 3, 2, 4)
    torch.testing.assert_close(rope(x, torch.zeros(2, dtype=torch.long))[:, :, :1], x[:, :, :1])
    per_seq = rope(x, torch.tensor([[0, 1], [5, 6]]))
    torch.testing.assert_close(per_seq[1:], rope(x[1:], torch.tensor([5, 6])))


def test_llama3_scaling_bands():
    s = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
    inv = rope_inv_freq(RopeConfig(theta=500000.0), 128)
    scaled = apply_llama3_scaling(inv, s)
    wavelen = 2 * math.pi / inv
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    torch.testing.assert_close(scaled[high], inv[high])            # short wavelengths untouched
    torch.testing.assert_close(scaled[low], inv[low] / 8.0)        # long ones divided by factor
    mid = ~(high | low)
    assert mid.any() and bool(((scaled[mid] < inv[mid]) & (scaled[mid] > inv[mid] / 8)).all())


def test_llama3_scaling_matches_transformers_when_available():
    transformers = pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_inv_freq(RopeConfig(theta=500000.0, scaling=Llama3RopeScaling()), 64)
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-6, atol=0)


def test_frequencies_stay_float64_when_the_model_is_cast():
    rope = RotaryEmbedding(RopeConfig(), 8)
    rope.to(torch.bfloat16)
    assert rope.inv_freq.dtype == torch.float64
    x = torch.randn(1, 1, 1, 8, dtype=torch.float64)
    far = torch.tensor([100_000])
    exact = RotaryEmbedding(RopeConfig(), 8).double()(x, far)
    torch.testing.assert_close(rope.double()(x, far), exact, rtol=0, atol=0)


def test_per_kv_head_frequencies_apply_to_their_query_group():
    freqs = [[1.0, 0.1], [0.5, 0.01]]  # two kv heads, head dim 4
    rope = RotaryEmbedding(RopeConfig(inv_freq=freqs), 4)
    x = torch.randn(2, 4, 3, 4)  # 4 query heads: heads 0-1 use list 0, heads 2-3 use list 1
    pos = torch.tensor([0, 5, 9])
    out = rope(x, pos)
    for head, group in ((0, 0), (1, 0), (2, 1), (3, 1)):
        single = RotaryEmbedding(RopeConfig(inv_freq=freqs[group]), 4)
        torch.testing.assert_close(out[:, head], single(x[:, head: head + 1], pos)[:, 0])
    torch.testing.assert_close(rope(x, pos.expand(2, 3)), out)


def test_per_head_frequency_lists_are_validated():
    from attnlab.config.attention import DecoupledAttentionConfig

    with pytest.raises(ValueError, match="num_kv_heads=2 needs one each"):
        DecoupledAttentionConfig(num_heads=4, num_kv_heads=2, sem_dim=8, geo_dim=16,
                                 rope=RopeConfig(inv_freq=[[1.0, 0.5], [1.0, 0.5], [1.0, 0.5]]))
    with pytest.raises(ValueError, match="needs 2"):
        DecoupledAttentionConfig(num_heads=4, num_kv_heads=2, sem_dim=8, geo_dim=16,
                                 rope=RopeConfig(inv_freq=[[1.0], [1.0, 0.5]]))
