"""The Butterfly decode kernel (write + attend in one launch) against the torch decode path:
Triton's CPU interpreter here, compiled on a GPU."""

import pytest
import torch

pytest.importorskip("triton")

from attnlab.config import ModelConfig  # noqa: E402
from attnlab.infer import DecodeRuntime  # noqa: E402
from attnlab.model import build_model  # noqa: E402
from attnlab.nn.attention.butterfly import PARTNER_RULES  # noqa: E402


def _model(rule, dtype):
    torch.manual_seed(0)
    attention = {"type": "butterfly", "num_heads": 4, "num_kv_heads": 2, "window": 3, "block_size": 4, "partner": rule}
    cfg = ModelConfig.model_validate({"vocab_size": 61, "d_model": 32, "num_layers": 2, "block_size": 64,
                                      "attention": attention})
    return build_model(cfg).to(dtype).eval()



CASES = [(rule, None, torch.float32) for rule in PARTNER_RULES] + [
    ("causal_shift", "k=fp16,v=fp16,k_sum=bf16,v_sum=bf16", torch.float32), ("xor", None, torch.bfloat16)]


@pytest.mark.parametrize("rule,policy,dtype", CASES)
def test_decode_kernel_equals_the_torch_path(rule, policy, dtype, monkeypatch):
    """The Triton kernel (the CPU interpreter here, compiled on the GPU) against the torch decode
    path: the same cache contents after every step and the same logits."""
    model = _model(rule, dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    ids = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(7)).to(next(model.parameters()).device)
    runs = {}
    for kernels in (False, True):
        if kernels and not torch.cuda.is_available():
            monkeypatch.setenv("ATTNLAB_KERNELS_ON_CPU", "1")
        with torch.no_grad():
            if not kernels:
                monkeypatch.setenv("ATTNLAB_DECODE_KERNEL", "reference")
            else:
                monkeypatch.delenv("ATTNLAB_DECODE_KERNEL", raising=False)
            rt = DecodeRuntime(model, policy, batch=2, max_length=64, cuda_graphs=False)
            out = [rt.forward(ids[:, :9], valid=[9, 6])]
            for t in range(9, 22):  # crosses blocks 2..5: sink, local and partner summaries
                out.append(rt.step(ids[:, t]).unsqueeze(1))
        runs[kernels] = (torch.cat(out, 1).float(), rt.cache.layers[1])
    (a, ca), (b, cb) = runs[False], runs[True]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(b, a, atol=tol * a.abs().max().item(), rtol=0)
    assert torch.equal(ca.slot_position, cb.slot_position)
    for name in ("k", "v"):
        torch.testing.assert_close(cb.ring[name].data.float(), ca.ring[name].data.float(), atol=tol, rtol=0)
        torch.testing.assert_close(cb.summaries[name].data.float(), ca.summaries[name].data.float(), atol=tol, rtol=0)
