"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) with a small draft model over
KV caches. Batch size 1.

Each round the draft proposes ``k`` tokens ``x_i ~ q_i`` (its filtered sampling distribution),
the target scores them in one cached forward, and token i is accepted with probability
``min(1, p_i(x_i) / q_i(x_i))``. At the first rejection a token is drawn from
``normalize(max(0, p_i - q_i))`` and the round ends; if all ``k`` are accepted a bonus token is
drawn from ``p_{k+1}``. ``p`` is exactly the distribution plain sampling uses
(``filtered_probs``: temperature, top-k, top-p), so the output is distributed as plain sampling
from the target. Temperature 0 is the greedy special case: accept iff the draft token is the
target's argmax, otherwise emit that argmax.

Cache bookkeeping: both caches hold a prefix of the committed sequence; the committed tokens they
lack (the previous round's last token, plus the draft's last proposal after a full accept) are
fed at the start of the next round. The target's single forward per round is therefore
``[pending token, x_1 .. x_k]``: its first row gives ``p_1`` (the distribution after the
committed sequence), so no separate forward is needed for it. Rejected positions are rolled back
with ``DecodeRuntime.truncate``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attnlab.cache import CachePolicy, CacheReport
from attnlab.errors import InputError
from attnlab.infer.generate import GREEDY, check_max_new_tokens, device_sync, format_cache, model_device
from attnlab.infer.inputs import check_chunk_size, check_prompts
from attnlab.infer.runtime import DecodeRuntime
from attnlab.infer.sampling import SamplingConfig, filtered_probs


# ---------------------------------------------------------------- the rule, as pure functions
def accept_or_resample(p: torch.Tensor, q: torch.Tensor, draft_token: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One speculative step, vectorised over leading dims. ``p``, ``q``: (..., V) target and draft
    probabilities; ``draft_token`` (...) drawn from ``q``. Returns ``(accepted (...) bool,
    token (...))``: the draft token where accepted, else a draw from ``normalize(max(0, p - q))``.
    The returned token is distributed exactly as ``p``."""
    p, q = p.float(), q.float()
    idx = draft_token.long().unsqueeze(-1)
    p_x, q_x = p.gather(-1, idx).squeeze(-1), q.gather(-1, idx).squeeze(-1)
    u = torch.rand(p_x.shape, generator=generator, device=p.device, dtype=p.dtype)
    accepted = u * q_x < p_x  # u < p/q without dividing; q_x > 0 for a token drawn from q
    residual = (p - q).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    # mass == 0 only when p == q, where rejection has probability 0: any fallback will do
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p)
    flat = residual.reshape(-1, residual.shape[-1])
    resampled = torch.multinomial(flat, 1, generator=generator).view(p_x.shape)
    return accepted, torch.where(accepted, draft_token.long(), resampled)


def speculative_step_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Exact output distribution (..., V) of ``accept_or_resample`` when the draft token is drawn
    from ``q``: ``q * min(1, p/q) + P(reject) * normalize(max(0, p - q))`` (equals ``p``)."""
    p, q = p.double(), q.double()
    accept_part = torch.minimum(p, q)  # q(x) * min(1, p(x)/q(x))
    reject = 1 - accept_part.sum(-1, keepdim=True)
    residual = (p - q).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    return accept_part + torch.where(mass > 0, reject * residual / mass.clamp_min(1e-300), torch.zeros_like(p))


# ---------------------------------------------------------------- results
@dataclass
class SpeculativeStats:
    prompt_tokens: int
    new_tokens: int
    rounds: int
    proposed: int              # draft tokens proposed over all rounds
    accepted: int              # of those, accepted by the target
    prefill_seconds: float
    decode_seconds: float
    target_cache: CacheReport
    draft_cache: CacheReport

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def tokens_per_round(self) -> float:
        return self.new_tokens / self.rounds if self.rounds else float("nan")

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of the decode phase (after both prefills)."""
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")

    @property
    def decode_ms_per_token(self) -> float:
        return 1000 * self.decode_seconds / self.new_tokens if self.new_tokens else float("nan")

    def summary(self, policy: str | None = None) -> str:
        """Two lines for logs / the CLI's stderr (``policy``: the target cache's policy label)."""
        return (f"prefill {self.prompt_tokens} tokens: {self.prefill_tokens_per_s:,.0f} tok/s | decode "
                f"{self.new_tokens} tokens: {self.decode_ms_per_token:.2f} ms/token, {self.tokens_per_s:,.0f} "
                f"tok/s | {format_cache(self.target_cache, policy)}\n"
                f"speculative: {self.rounds} rounds, {self.accepted}/{self.proposed} draft tokens accepted "
                f"(acceptance rate {self.acceptance_rate:.2f}), {self.tokens_per_round:.2f} tokens/round")


@dataclass
class SpeculativeResult:
    tokens: list[int]          # new ids (a final stop id included)
    stats: SpeculativeStats


# ---------------------------------------------------------------- decoding
class _Stream:
    """One model's decode runtime plus how much of the committed sequence it holds."""

    def __init__(self, model, policy, prompt: list[int], chunk: int | None, max_length: int):
        self.device = model_device(model)
        self.runtime = DecodeRuntime(model, policy, batch=1, max_length=max_length)
        if len(prompt) > 1:  # the last prompt token stays pending: the first round feeds it
            self.runtime.prefill([prompt[:-1]], chunk)

    @property
    def length(self) -> int:
        return self.runtime.host_lengths[0]

    def forward(self, ids: list[int]) -> torch.Tensor:
        """Append ``ids`` to the cache; logits (len(ids), V) (one token: a runtime step)."""
        if len(ids) == 1:
            return self.runtime.step(torch.tensor(ids, device=self.device))
        return self.runtime.forward(torch.tensor([ids], device=self.device))[0]


@torch.no_grad()
def speculative_generate(target, draft, prompt: list[int], max_new_tokens: int,
                         sampling: SamplingConfig = GREEDY, *, k: int = 4,
                         target_policy: CachePolicy | str | dict | None = None,
                         draft_policy: CachePolicy | str | dict | None = None, seed: int | None = None,
                         stop_ids: Sequence[int] = (), prefill_chunk: int | None = None) -> SpeculativeResult:
    """New tokens after ``prompt`` (one sequence), distributed as plain sampling from ``target``
    with ``sampling`` (greedy: identical to the target's greedy output, up to float ties).
    ``draft`` must share the target's vocabulary. Stops after a stop id (included) or
    ``max_new_tokens``. Draws come from one generator on the target's device seeded with ``seed``."""
    prompt = check_prompts(target, [prompt])[0]
    if draft.config.vocab_size != target.config.vocab_size:
        raise InputError(f"draft vocab size {draft.config.vocab_size} differs from the target's "
                         f"{target.config.vocab_size}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"speculative k (draft tokens per round) must be an integer >= 1, got {k!r}")
    for name, model, width in (("target", target, k + 1), ("draft", draft, 2)):
        if width > model.config.block_size:
            raise InputError(f"speculative k={k}: the {name} would score {width} tokens in one forward, "
                             f"more than its block_size {model.config.block_size}")
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    check_chunk_size(target, prefill_chunk)
    check_chunk_size(draft, prefill_chunk)
    for name, policy in (("target", target_policy), ("draft", draft_policy)):
        policy = CachePolicy.parse(policy)
        if policy.tail and policy.rollback < k:
            raise InputError(f"{name} cache policy keeps rollback={policy.rollback} exact tail tokens; "
                             f"speculative decoding with k={k} needs rollback >= {k}")
    stop = {int(t) for t in stop_ids}
    device = model_device(target)
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)

    device_sync(device)
    t0 = time.perf_counter()
    room = len(prompt) + max_new_tokens + k + 1  # a round may score k + 1 tokens past the committed ones
    tgt = _Stream(target, target_policy, prompt, prefill_chunk, room)
    dft = _Stream(draft, draft_policy, prompt, prefill_chunk, room)
    device_sync(device)
    t1 = time.perf_counter()

    seq = list(prompt)  # committed tokens; caches hold prefixes of it
    out: list[int] = []
    rounds = proposed = accepted_total = 0
    while len(out) < max_new_tokens and not (out and out[-1] in stop):
        n = len(seq)
        k_round = min(k, max_new_tokens - len(out) - 1)  # a round emits up to k + 1 tokens
        # --- draft proposes k_round tokens
        xs: list[int] = []
        q_rows = []
        if k_round > 0:
            logits = dft.forward(seq[dft.length:])[-1]
            for i in range(k_round):
                if sampling.greedy:
                    x = int(logits.argmax())
                else:
                    q = filtered_probs(logits[None].to(device), sampling)[0]  # (V,) on the generator's device
                    q_rows.append(q)
                    x = int(torch.multinomial(q, 1, generator=generator))
                xs.append(x)
                if i + 1 < k_round:
                    logits = dft.forward([x])[-1]
        # --- target scores the pending tokens and all proposals in one forward
        pending = seq[tgt.length:]
        p_logits = tgt.forward(pending + xs)[len(pending) - 1:]  # (k_round + 1, V): p_1 .. p_{k+1}
        if sampling.greedy:
            best = p_logits.argmax(-1).tolist()
            a = 0
            while a < k_round and xs[a] == best[a]:
                a += 1
            new = xs[:a] + [best[a]]
        else:
            p = filtered_probs(p_logits, sampling)  # (k_round + 1, V)
            if k_round:
                q = torch.stack(q_rows)
                ok, tokens = accept_or_resample(p[:k_round], q, torch.tensor(xs, device=p.device), generator)
                ok, tokens = ok.tolist(), tokens.tolist()
                a = next((i for i, flag in enumerate(ok) if not flag), k_round)
            else:
                a, tokens = 0, []
            last = tokens[a] if a < k_round else int(torch.multinomial(p[k_round], 1, generator=generator))
            new = xs[:a] + [last]
        rounds += 1
        proposed += k_round
        accepted_total += a
        # --- roll both caches back to the accepted prefix (seq + x_1 .. x_a)
        keep = n + a
        tgt.runtime.truncate(min(keep, tgt.length))
        dft.runtime.truncate(min(keep, dft.length))
        for t in new:
            seq.append(t)
            out.append(t)
            if t in stop or len(out) >= max_new_tokens:
                break
    device_sync(device)
    t2 = time.perf_counter()

    stats = SpeculativeStats(prompt_tokens=len(prompt), new_tokens=len(out), rounds=rounds, proposed=proposed,
                             accepted=accepted_total, prefill_seconds=t1 - t0, decode_seconds=t2 - t1,
                             target_cache=tgt.runtime.report(), draft_cache=dft.runtime.report())
    return SpeculativeResult(out, stats)
