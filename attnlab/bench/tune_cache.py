"""``attnlab tune-cache``: search KV-cache policies for a run and pick the smallest one that passes a
quality guard against the fp16 cache.

Search space: one format per cache field of the model (``formats``), an exact tail of the newest
tokens (``tails``), and optionally the first and last attention layers kept at ``edge_format``
(a per-layer override). The search is cheap first and thorough on the survivors:

1. **bytes** (analytic, every candidate): KV bytes per token of the whole model; candidates over
   ``max_bytes_per_token`` are dropped;
2. **screen** (short): held-out delta NLL by cached decode on ``screen_windows`` short windows,
   vs the fp16 cache; candidates worse than ``max_dnll`` (x ``screen_slack``) are dropped, and of
   the rest only the screen's Pareto front (bytes x delta NLL) goes on;
3. **thorough** (the survivors): delta NLL and KL(fp16 cache || candidate) per token on
   ``windows`` windows, decode ms/token at ``context`` through the runtime (CUDA graphs on a GPU),
   and, with ``min_retrieval``, exact-match accuracy on the synthetic retrieval suite.

The chosen policy is the one with the fewest bytes per token among the thorough candidates that
meet every constraint (ties: lower delta NLL). ``TuneResult.closest`` says, for the candidates
closest to the budget, which constraint failed and by how much when none meets it.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from attnlab.bench.latency import chunked_prefill, greedy_next, sync, warm_up_step
from attnlab.bench.nll import cached_decode_nll
from attnlab.bench.quality import compare_distributions
from attnlab.cache import CachePolicy
from attnlab.errors import ConfigError
from attnlab.infer.runtime import DecodeRuntime
from attnlab.model.stats import kv_bytes_per_token_layer

SEARCH_FORMATS = ("fp16", "fp8_e4m3", "q8_0", "q4_0", "nf4")
REFERENCE = "fp16"


@dataclass
class Constraints:
    max_bytes_per_token: int | None = None
    max_ms_per_token: float | None = None
    max_dnll: float | None = None
    max_kl: float | None = None
    min_retrieval: float | None = None

    def failures(self, c: "Candidate") -> dict[str, float]:
        """constraint -> by how much ``c`` misses it (only the missed ones, measured ones only)."""
        out = {}
        for name, value, limit, sign in (
                ("max_bytes_per_token", c.bytes_per_token, self.max_bytes_per_token, 1),
                ("max_ms_per_token", c.ms_per_token, self.max_ms_per_token, 1),
                ("max_dnll", c.dnll, self.max_dnll, 1),
                ("max_kl", c.kl, self.max_kl, 1),
                ("min_retrieval", c.retrieval, self.min_retrieval, -1)):
            if limit is None:
                continue
            if value is None:
                out[name] = math.inf  # not measured where it had to be
            elif sign * (value - limit) > 0:
                out[name] = sign * (value - limit)
        return out


@dataclass
class Candidate:
    policy: str
    bytes_per_token: int
    stage: str = "bytes"                  # how far it got: bytes, screen, thorough
    screen_dnll: float | None = None
    dnll: float | None = None
    kl: float | None = None
    ms_per_token: float | None = None
    retrieval: float | None = None
    dropped: str = ""                     # why it left the search

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TuneResult:
    candidates: list[Candidate]
    chosen: Candidate | None
    constraints: Constraints
    settings: dict = field(default_factory=dict)

    @property
    def thorough(self) -> list[Candidate]:
        return [c for c in self.candidates if c.stage == "thorough"]

    def front(self, cost: str = "bytes_per_token") -> list[Candidate]:
        """The thorough candidates on the (``cost`` x delta NLL) Pareto front, by cost."""
        return pareto_front(self.thorough, cost, "dnll")

    def closest(self, count: int = 3) -> list[tuple[Candidate, dict[str, float]]]:
        """The thorough candidates (else all) that miss the fewest constraints by the least."""
        pool = self.thorough or self.candidates
        scored = [(c, self.constraints.failures(c)) for c in pool]
        scored.sort(key=lambda cf: (len(cf[1]), sum(min(v, 1e30) for v in cf[1].values())))
        return scored[:count]


def model_fields(model) -> list[str]:
    """Cache fields the model's attention layers store, in a stable order."""
    names: dict[str, None] = {}
    for layer in model.attention_layers():
        for name in layer.dims.cache_fields:
            names[name] = None
    return list(names)


def candidate_policies(model, formats=SEARCH_FORMATS, tails=(0,), edge_format: str | None = "q8_0") -> list[str]:
    """Every per-field assignment of ``formats`` x ``tails`` (x the edge-layer override when the
    model has more than two attention layers and ``edge_format`` is set)."""
    fields = model_fields(model)
    layers = len(model.attention_layers())
    edges = [None] + ([f"layers=0,{layers - 1}:{edge_format}"] if edge_format and layers > 2 else [])
    out = []
    for combo in itertools.product(formats, repeat=len(fields)):
        base = ",".join(f"{name}={fmt}" for name, fmt in zip(fields, combo))
        for tail in tails:
            text = base + (f",tail={tail}" if tail else "")
            for edge in edges:
                if edge is not None and all(f == edge_format for f in combo):
                    continue  # the override changes nothing
                out.append(text if edge is None else f"{text};{edge}")
    return out


def policy_bytes(model, text: str) -> int:
    policy = CachePolicy.parse(text)
    total = 0
    for i, layer in enumerate(model.attention_layers()):
        p = policy.for_layer(i)
        total += kv_bytes_per_token_layer(layer.dims, {name: p.format_for(name, REFERENCE)
                                                       for name in layer.dims.cache_fields})
    return total


@torch.no_grad()
def decode_ms_per_token(model, policy: CachePolicy, context: int, steps: int = 16, seed: int = 0) -> float:
    """Mean ms per greedy decode step at ``context`` tokens (random prompt), batch 1,
    after one untimed warm-up step (which captures the CUDA graph on a GPU)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=gen).to(device)
    runtime = DecodeRuntime(model, policy, batch=1, max_length=context + steps + 1)
    token = greedy_next(chunked_prefill(runtime, prompt))
    warm_up_step(runtime, token)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        token = greedy_next(runtime.step(token))
    sync(device)
    return (time.perf_counter() - start) * 1000.0 / steps


def retrieval_scorer(model, tokenizer, lengths: list[int], trials: int = 4, kinds=("passkey", "multikey")):
    """policy -> mean exact-match accuracy of the retrieval suite (``kinds``, five depths, ``trials``
    each, no instruction header) at ``lengths``."""
    from attnlab.bench.retrieval import run_retrieval

    def accuracy(policy) -> float:
        rows = run_retrieval(model, tokenizer, kinds=kinds, lengths=lengths, trials=trials, policy=policy, header=False)
        return sum(r["accuracy"] for r in rows) / len(rows)

    return accuracy


def pareto_front(cands: list[Candidate], cost: str, loss: str) -> list[Candidate]:
    """Candidates no other beats on both ``cost`` and ``loss`` (attribute names), by cost;
    candidates missing either measure are left out."""
    rows = sorted((c for c in cands if getattr(c, cost) is not None and getattr(c, loss) is not None),
                  key=lambda c: (getattr(c, cost), getattr(c, loss)))
    front, best = [], math.inf
    for c in rows:
        if getattr(c, loss) < best:
            front.append(c)
            best = getattr(c, loss)
    return front


def tune_cache(model, windows: torch.Tensor, constraints: Constraints, *, screen_windows: torch.Tensor,
               candidates: list[str] | None = None, context: int | None = None, decode_steps: int = 16,
               retrieval=None, screen_slack: float = 2.0, max_thorough: int = 12, progress=print) -> TuneResult:
    """Run the three-stage search (module docstring). ``windows``/``screen_windows``: (N, T + 1)
    held-out token windows; ``retrieval``: a callable policy -> accuracy (the suite at lengths the
    model handles), needed when ``constraints.min_retrieval`` is set."""
    if constraints.min_retrieval is not None and retrieval is None:
        raise ConfigError("min_retrieval", "needs the retrieval suite (a run with a tokenizer)")
    texts = candidates if candidates is not None else candidate_policies(model)
    cands = [Candidate(CachePolicy.parse(t).label, policy_bytes(model, t)) for t in texts]
    # 1. bytes
    alive = []
    for c in cands:
        if constraints.max_bytes_per_token is not None and c.bytes_per_token > constraints.max_bytes_per_token:
            c.dropped = f"bytes {c.bytes_per_token} > {constraints.max_bytes_per_token}"
        else:
            alive.append(c)
    progress(f"tune-cache: {len(cands)} candidates, {len(alive)} within the byte budget")
    # 2. screen
    reference, _ = cached_decode_nll(model, screen_windows, REFERENCE)
    for i, c in enumerate(alive, 1):
        result, _ = cached_decode_nll(model, screen_windows, c.policy)
        c.screen_dnll, c.stage = result.nll - reference.nll, "screen"
        if i % 10 == 0 or i == len(alive):
            progress(f"tune-cache: screened {i}/{len(alive)}")
    limit = None if constraints.max_dnll is None else constraints.max_dnll * screen_slack + 1e-4
    passing = [c for c in alive if limit is None or c.screen_dnll <= limit]
    for c in alive:
        if c not in passing:
            c.dropped = f"screen dNLL {c.screen_dnll:.4f} > {limit:.4f}"
    front = pareto_front(passing, "bytes_per_token", "screen_dnll")[:max_thorough]
    for c in passing:
        if c not in front:
            c.dropped = c.dropped or "dominated on the screen (bytes x dNLL)"
    progress(f"tune-cache: {len(passing)} pass the screen, {len(front)} on its front go to the thorough stage")
    # 3. thorough
    reference, _ = cached_decode_nll(model, windows, REFERENCE)
    ref_policy = CachePolicy.parse(REFERENCE)
    for i, c in enumerate(front, 1):
        policy = CachePolicy.parse(c.policy)
        result, _ = cached_decode_nll(model, windows, policy)
        c.dnll = result.nll - reference.nll
        c.kl = compare_distributions(model, policy, model, ref_policy, windows, top_k=1)["kl_nats_per_token"]
        if context is not None:
            c.ms_per_token = decode_ms_per_token(model, policy, context, decode_steps)
        if retrieval is not None:
            c.retrieval = retrieval(policy)
        c.stage = "thorough"
        progress(f"tune-cache: [{i}/{len(front)}] {c.policy}: {c.bytes_per_token} B/token, dNLL {c.dnll:+.4f}, "
                 f"KL {c.kl:.4f}" + (f", {c.ms_per_token:.2f} ms/token" if c.ms_per_token is not None else "")
                 + (f", retrieval {c.retrieval:.3f}" if c.retrieval is not None else ""))
    ok = [c for c in front if not constraints.failures(c)]
    chosen = min(ok, key=lambda c: (c.bytes_per_token, c.dnll)) if ok else None
    settings = {"reference": REFERENCE, "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1] - 1),
                "screen_windows": int(screen_windows.shape[0]), "screen_seq_len": int(screen_windows.shape[1] - 1),
                "context": context, "decode_steps": decode_steps, "screen_slack": screen_slack,
                "max_thorough": max_thorough, "device": str(next(model.parameters()).device)}
    return TuneResult(cands, chosen, constraints, settings)
