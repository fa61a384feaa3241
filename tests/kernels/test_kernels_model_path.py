"""The whole model through the fused kernels (quantize-on-write, chunk prefill, decode) under
Triton's CPU interpreter, against the same runtime on the torch reference paths."""

import pytest
import torch

pytest.importorskip("triton")

from attnlab.config import ModelConfig  # noqa: E402
from attnlab.infer import DecodeRuntime  # noqa: E402
from attnlab.kernels import kernel_unsupported_reason, write_unsupported_reason  # noqa: E402
from attnlab.model import build_model  # noqa: E402

VOCAB = 97
CASES = {
    "gqa": ({"type": "standard", "num_heads": 4, "num_kv_heads": 2}, "k=q4_0,v=q8_0,tail=3"),
    "dba_null_gate": ({"type": "decoupled", "num_heads": 4, "num_kv_heads": 2, "sem_dim": 16, "geo_dim": 32,
                       "v_dim": 48, "null_token": True, "gate": True}, "k_sem=q4_0,k_geo=q8_0,v=q4_0"),
    "mla": ({"type": "mla", "num_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
             "v_head_dim": 12}, "c_kv=q4_0,k_rope=q8_0,tail=2"),
}


def make_model(attention):
    cfg = ModelConfig.model_validate({"vocab_size": VOCAB, "d_model": 64, "num_layers": 2, "block_size": 32,
                                      "attention": attention, "tie_embeddings": False, "init_std": 0.2})
    model = build_model(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name or "null" in name:
                p.normal_(0, 0.5)
    return model


def decode(model, policy, prompts, feed):
    rt = DecodeRuntime(model, policy, batch=len(prompts), max_length=24)
    out = [rt.prefill(prompts, 4)]
    for tokens in feed:
        out.append(rt.step(tokens).clone())
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; on the GPU the kernels always serve "
                    "(tests/infer/test_infer_runtime_cuda.py compares them with the uncached reference)")
@pytest.mark.parametrize("name", list(CASES))
def test_model_through_the_kernels_equals_the_reference_paths(name, monkeypatch):
    attention, policy = CASES[name]
    torch.manual_seed(int(torch.randint(0, 10_000, ())))
    model = make_model(attention)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 11)]
    feed = [torch.randint(0, VOCAB, (2,)) for _ in range(4)]
    monkeypatch.setenv("ATTNLAB_KERNELS_ON_CPU", "0")
    reference = decode(model, policy, prompts, feed)
    monkeypatch.setenv("ATTNLAB_KERNELS_ON_CPU", "1")
    rt = DecodeRuntime(model, policy, batch=2, max_length=24)
    for layer, cache in zip(model.attention_layers(), rt.cache.layers):  # the kernels really serve it
        null_k, _ = layer.null_kv()
        assert write_unsupported_reason(cache, None) is None
        for t_len in (1, 4):
            q = [torch.zeros(2, layer.dims.num_heads, t_len, f.head_dim) for f in layer.dims.key_fields]
            assert kernel_unsupported_reason(q, cache, null_k=null_k) is None
    fused = decode(model, policy, prompts, feed)
    for got, want in zip(fused, reference):
        assert ((got - want).norm() / want.norm()).item() < 1e-5
