"""Checks shared by the attention variants' tests: cached paths against the full forward."""

from __future__ import annotations

import torch

from attnlab.infer.runtime import DecodeRuntime


def assert_cached_paths_equal_the_full_forward(model, ids: torch.Tensor, *, prefill: int = 21, chunk: int = 13,
                                               max_length: int = 64, atol: float = 1e-10, **forward) -> None:
    """A prefill then one token at a time, and fixed-size chunks, both equal ``model(ids)``."""
    with torch.no_grad():
        full = model(ids, **forward)
        rt = DecodeRuntime(model, batch=ids.shape[0], max_length=max_length)
        steps = [rt.forward(ids[:, :prefill])] + [rt.forward(ids[:, t:t + 1]) for t in range(prefill, ids.shape[1])]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=atol, rtol=0)
        rt.reset()
        chunks = [rt.forward(ids[:, a:a + chunk]) for a in range(0, ids.shape[1], chunk)]
        torch.testing.assert_close(torch.cat(chunks, 1), full, atol=atol, rtol=0)


def assert_graph_decode_equals_eager_and_full(model, ids: torch.Tensor, policy, *, prefill: int = 30,
                                              max_length: int = 128) -> None:
    """CUDA-graph decode = eager decode (1e-5), and = the full forward (1e-4; within 10% of the
    logits' scale under a quantizing ``policy``)."""
    with torch.no_grad():
        full = model(ids)
        logits = {}
        for graphs in (False, True):
            rt = DecodeRuntime(model, policy, batch=ids.shape[0], max_length=max_length, cuda_graphs=graphs)
            out = [rt.forward(ids[:, :prefill]).float().clone()]
            for t in range(prefill, ids.shape[1]):
                out.append(rt.step(ids[:, t]).float().clone().unsqueeze(1))
            logits[graphs] = torch.cat(out, 1)
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=0)
    if policy is None:
        torch.testing.assert_close(logits[False], full, atol=1e-4, rtol=0)
    else:
        assert (logits[False] - full).abs().max() < 0.1 * full.abs().max()
