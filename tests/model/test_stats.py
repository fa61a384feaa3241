from attnlab.config import ModelConfig
from attnlab.model import build_model
from attnlab.model.stats import kv_bytes_per_token_layer, model_stats
from attnlab.config.attention import attention_dims, DecoupledAttentionConfig, StandardAttentionConfig


def test_kv_bytes_by_hand_standard_gqa():
    dims = attention_dims(StandardAttentionConfig(num_heads=32, num_kv_heads=8), 2048)  # hd 64
    row = 8 * 64
    assert kv_bytes_per_token_layer(dims, "fp16") == 2 * row * 2
    assert kv_bytes_per_token_layer(dims, "q8_0") == 2 * (row // 32) * 34
    assert kv_bytes_per_token_layer(dims, "q4_0") == 2 * (row // 32) * 18
    assert kv_bytes_per_token_layer(dims, "nf4") == 2 * (row // 64) * 34


def test_kv_bytes_by_hand_paper_dba_heterogeneous():
    dims = attention_dims(DecoupledAttentionConfig(num_heads=32, sem_dim=256, geo_dim=1024, v_dim=1280), 2048)
    policy = {"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}
    assert kv_bytes_per_token_layer(dims, policy) == 256 // 32 * 18 + 1024 // 32 * 34 + 1280 // 32 * 18
    assert kv_bytes_per_token_layer(dims, "fp16") == (256 + 1024 + 1280) * 2


def test_padding_to_whole_blocks_is_counted():
    dims = attention_dims(StandardAttentionConfig(num_heads=2, num_kv_heads=1), 40)  # row of 20 values
    assert kv_bytes_per_token_layer(dims, "q4_0") == 2 * 18


def test_model_stats_params_and_flops():
    c = ModelConfig.model_validate({"vocab_size": 100, "d_model": 64, "block_size": 16, "num_layers": 2,
                                    "attention": {"type": "standard", "num_heads": 4}})
    s = model_stats(c)
    assert s.params == build_model(c).num_parameters()
    matmul = 2 * (4 * 64 * 64 + 3 * 64 * 192) + 100 * 64  # two layers + tied LM head
    attn = 2 * (2 * 4 * (16 + 16) * (16 + 1) / 2)
    assert s.flops_per_token_forward == int(2 * matmul + attn)
    assert s.kv_total("fp16") == 2 * 2 * 64 * 2
    assert "k_sem=q4_0,k_geo=q8_0,v=q4_0" not in s.kv_bytes
