"""Cache policies side by side: KV bytes/token (analytic from the formats vs allocated by the
decode runtime's cache tensors) and held-out NLL through cached decode."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from attnlab.bench.nll import cached_decode_nll, forward_nll
from attnlab.cache import CachePolicy
from attnlab.config.variants import mixed_policy
from attnlab.summary import format_table

DEFAULT_POLICIES = ("fp16", "q8_0", "q4_0", "nf4")


def default_policies(model) -> list[str]:
    """fp16, q8_0, q4_0, nf4 and the model's heterogeneous policy: its attention variants'
    ``mixed_policy`` (DBA: the paper's semantic keys q4_0, geometric keys q8_0, values q4_0;
    standard: keys q8_0, values q4_0; MLA: latent and RoPE key q8_0)."""
    mixed = mixed_policy(model.config.attention_specs())
    return list(DEFAULT_POLICIES) + [",".join(f"{k}={v}" for k, v in mixed.items())]


@dataclass
class PolicyRow:
    policy: str
    bytes_per_token: int             # analytic, all layers, one sequence
    allocated_per_token: float       # bytes_allocated / (batch * length): analytic + tail ring share
    slack_bytes: int                 # capacity allocated beyond the window (0: runtimes are sized to it)
    tail_bytes: int
    nll: float
    ppl: float
    delta_nll: float                 # vs the full forward
    window_nll: list[float] = field(default_factory=list)  # per held-out window (report intervals)

    def to_dict(self) -> dict:
        return asdict(self)


def compare_policies(model, windows: torch.Tensor, policies: list[str], batch_size: int = 8) -> tuple[float, list[PolicyRow]]:
    """(full-forward NLL, one row per policy)."""
    reference = forward_nll(model, windows, batch_size)
    rows = []
    for text in policies:
        policy = CachePolicy.parse(text)
        result, runtime = cached_decode_nll(model, windows, policy, batch_size)
        report = runtime.report()
        rows.append(PolicyRow(policy.label, report.bytes_per_token,
                              report.bytes_allocated / (report.batch * report.max_length),
                              report.slack_bytes, report.tail_bytes, result.nll, result.ppl,
                              result.nll - reference.nll, result.window_nll))
    return reference.nll, rows


def format_policy_table(reference_nll: float, rows: list[PolicyRow]) -> str:
    table = [[r.policy, f"{r.bytes_per_token:,}", f"{r.allocated_per_token:,.1f}", f"{r.slack_bytes:,}",
              f"{r.nll:.4f}", f"{r.ppl:.3f}", f"{r.delta_nll:+.4f}"] for r in rows]
    head = ["policy", "KV B/tok analytic", "KV B/tok allocated", "slack B", "NLL (cached)", "ppl", "dNLL vs fwd"]
    return f"full forward NLL {reference_nll:.4f}\n" + format_table(head, table)
