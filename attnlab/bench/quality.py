"""Quality smoke test against a reference: the model under its cache policy vs

- ``fp16``: the same model decoding through an fp16 cache (isolates the policy's quantization), or
- ``run:<id>``: another run of the group (``ctx.load_reference(id)``), decoding through an fp16
  cache (e.g. a distilled or upcycled student against its teacher).

Both decode the same held-out windows token by token through their decode runtimes
(``DecodeRuntime.step``, as ``perplexity.cached_decode_nll`` does), and at every position we
compare the next-token distributions: top-k overlap ``|topk_a ∩ topk_b| / k``, top-1
agreement, and ``KL(reference || model)`` in nats. Then both greedy-generate from the same prompts and we count
identical tokens up to the first divergence and overall.
"""

from __future__ import annotations

import numpy as np
import torch

from attnlab.bench.context import BenchContext
from attnlab.bench.latency import chunked_prefill, greedy_next, resolve_policy
from attnlab.bench.perplexity import eval_windows
from attnlab.cache import CachePolicy
from attnlab.config.bench import QualityBench
from attnlab.errors import AttnlabError, DataError
from attnlab.infer.runtime import DecodeRuntime

BATCH = 8


def reference_model(cfg: QualityBench, ctx: BenchContext):
    """(reference model, its label)."""
    if cfg.reference == "fp16":
        return ctx.model, "fp16"
    run_id = cfg.reference[len("run:"):]
    if ctx.load_reference is None:
        raise AttnlabError(f"quality reference {cfg.reference!r} needs another run of the group, but none can "
                           f"be loaded here (use reference: fp16)")
    ref = ctx.load_reference(run_id).to(device=ctx.device, dtype=ctx.dtype).eval()
    if ref.config.vocab_size != ctx.model.config.vocab_size:
        raise AttnlabError(f"quality reference {cfg.reference!r} has vocab_size {ref.config.vocab_size}, the model "
                           f"{ctx.model.config.vocab_size}: distributions cannot be compared")
    return ref, cfg.reference


def quality_windows(ctx: BenchContext, seq_len: int, count: int) -> tuple[torch.Tensor, str]:
    """(N, seq_len + 1) evenly spaced held-out windows, or seeded random tokens without held-out
    data; plus where they came from."""
    if ctx.heldout is None:
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, ctx.model.config.vocab_size, (count, seq_len + 1), generator=gen), "random"
    try:
        return eval_windows(np.asarray(ctx.heldout), seq_len, count, ctx.align), "heldout"
    except ValueError as err:
        raise DataError(f"quality benchmark: {err} (lower seq_len)") from None


@torch.no_grad()
def compare_distributions(model, policy: CachePolicy, ref, ref_policy: CachePolicy, windows: torch.Tensor,
                          top_k: int, batch_size: int = BATCH) -> dict:
    """Token-by-token cached decode of ``windows`` (N, T + 1) by both models; mean top-k overlap,
    top-1 agreement, KL(ref || model) (mean and max) and each model's NLL of the next token."""
    device = next(model.parameters()).device
    k = min(top_k, model.config.vocab_size)
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # overlap, top1, kl, nll, ref_nll
    kl_max = torch.zeros((), dtype=torch.float64, device=device)
    positions = 0
    length = windows.shape[1] - 1
    runtime = ref_runtime = None
    for i in range(0, len(windows), batch_size):
        w = windows[i: i + batch_size].to(device)
        if runtime is None or runtime.batch != len(w):  # one pair of runtimes per batch size, reset between
            runtime = DecodeRuntime(model, policy, batch=len(w), max_length=length)
            ref_runtime = DecodeRuntime(ref, ref_policy, batch=len(w), max_length=length)
        else:
            runtime.reset()
            ref_runtime.reset()
        for t in range(length):
            # log_softmax makes new tensors: each step's output buffer is consumed before the next step
            logp = torch.log_softmax(runtime.step(w[:, t]).float(), dim=-1)  # (B, V)
            ref_logp = torch.log_softmax(ref_runtime.step(w[:, t]).float(), dim=-1)
            top, ref_top = logp.topk(k, dim=-1).indices, ref_logp.topk(k, dim=-1).indices  # (B, k)
            overlap = (top[:, :, None] == ref_top[:, None, :]).any(-1).sum(-1).double() / k
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).double().clamp_min(0.0)
            target = w[:, t + 1: t + 2]
            sums += torch.stack([overlap.sum(), (top[:, 0] == ref_top[:, 0]).double().sum(), kl.sum(),
                                 -logp.gather(-1, target).double().sum(), -ref_logp.gather(-1, target).double().sum()])
            kl_max = torch.maximum(kl_max, kl.max())
            positions += len(w)
    overlap, top1, kl, nll, ref_nll = (v / positions for v in sums.tolist())
    return {"positions": positions, "topk_overlap": overlap, "top1_agreement": top1, "kl_nats_per_token": kl,
            "kl_max_nats": kl_max.item(), "nll": nll, "reference_nll": ref_nll, "delta_nll": nll - ref_nll}


@torch.no_grad()
def greedy_tokens(model, policy: CachePolicy, prompts: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) greedy continuation of ``prompts`` (B, P) through a decode runtime under
    ``policy`` (chunked prefill, then ``count - 1`` steps)."""
    runtime = DecodeRuntime(model, policy, batch=len(prompts), max_length=prompts.shape[1] + max(count - 1, 0))
    token = greedy_next(chunked_prefill(runtime, prompts.to(next(model.parameters()).device)))
    out = [token]
    for _ in range(count - 1):
        token = greedy_next(runtime.step(token))
        out.append(token)
    return torch.cat(out, dim=1)


def greedy_agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """``a``, ``b``: (B, n) generations from the same prompts. ``greedy_prefix_agreement``: mean
    fraction of tokens identical before the first divergence; ``greedy_agreement``: fraction of
    positions identical overall; ``greedy_identical``: fraction of fully identical rows."""
    same = (a == b).cpu()
    n = same.shape[1]
    first = torch.where(same.all(1), torch.full((len(same),), n), (~same).int().argmax(1))
    return {"greedy_prefix_agreement": first.double().mean().item() / n,
            "greedy_agreement": same.double().mean().item(),
            "greedy_identical": same.all(1).double().mean().item()}


@torch.no_grad()
def run_quality(cfg: QualityBench, ctx: BenchContext) -> list[dict]:
    """One row: ``reference, policy, reference_policy, data`` (heldout | random), ``windows,
    seq_len, positions, top_k, topk_overlap, top1_agreement, kl_nats_per_token, kl_max_nats,
    nll, reference_nll, delta_nll`` (nats per token), ``greedy_tokens, greedy_prompt_len,
    greedy_prefix_agreement, greedy_agreement, greedy_identical``."""
    model = ctx.model
    policy = resolve_policy(cfg.policy, ctx, heterogeneous_default=True)
    ref, ref_label = reference_model(cfg, ctx)
    ref_policy = CachePolicy.parse("fp16")
    seq_len = cfg.seq_len or model.config.block_size
    windows, data = quality_windows(ctx, seq_len, cfg.windows)
    row = {"reference": ref_label, "policy": policy.label, "reference_policy": ref_policy.label, "data": data,
           "windows": len(windows), "seq_len": seq_len, "top_k": cfg.top_k}
    row.update(compare_distributions(model, policy, ref, ref_policy, windows, cfg.top_k))
    prompt_len = max(1, min(seq_len, model.config.block_size) // 2)
    prompts = windows[:, :prompt_len]
    row.update(greedy_tokens=cfg.greedy_tokens, greedy_prompt_len=prompt_len)
    row.update(greedy_agreement(greedy_tokens(model, policy, prompts, cfg.greedy_tokens),
                                greedy_tokens(ref, ref_policy, prompts, cfg.greedy_tokens)))
    return [row]
