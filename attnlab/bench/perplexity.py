"""The ``perplexity`` benchmark: held-out NLL per cache policy, by cached decode, beside the full
forward (the measurement is ``bench.nll``; its names are re-exported here)."""

from __future__ import annotations

from attnlab.bench.kv_policies import compare_policies, default_policies
from attnlab.bench.nll import NLLResult, cached_decode_nll, eval_windows, forward_nll
from attnlab.errors import AttnlabError

__all__ = ["NLLResult", "cached_decode_nll", "eval_windows", "forward_nll", "run_perplexity"]


def run_perplexity(cfg, ctx) -> list[dict]:
    """Rows per cache policy: analytic/allocated KV bytes per token, cached-decode NLL and the
    gap to the full forward (``PerplexityBench``)."""
    if ctx.heldout is None:
        raise AttnlabError("perplexity benchmark needs held-out tokens (a run folder with data)")
    seq_len = cfg.seq_len or ctx.model.config.block_size
    windows = eval_windows(ctx.heldout, seq_len, cfg.windows, ctx.align)
    policies = cfg.policies or default_policies(ctx.model)
    reference, rows = compare_policies(ctx.model, windows, policies, cfg.batch_size)
    return [{**row.to_dict(), "forward_nll": reference, "windows": len(windows), "seq_len": seq_len} for row in rows]
