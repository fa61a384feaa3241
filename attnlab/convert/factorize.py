"""Linear algebra of attention surgery (float64): RoPE pair bookkeeping, pair energies, the
GQA-shared low-rank factorization of bilinear forms, and the seed's truncated-SVD split.

Notation: a projection weight is ``W`` (rows, D); with biases the surgery works on the augmented
``[W | b]`` and inputs ``[x; 1]``, so every formula below holds for biased layers unchanged.
``sigma`` is the second moment ``E[x x^T]`` of the layer input (``None``: the identity).

Shared-key factorization. Query head h of a GQA group g owns the bilinear form
``B_h = Q_h^T K`` (Q_h: query rows (m, D_l), K: the group's key rows (m, D_r)). We look for
one key-side factor C (r, D_r) per group and one query-side A_h (r, D_l) per head minimizing

    sum_h || Sl^{1/2} (B_h - A_h^T C) Sr^{1/2} ||_F^2.

With M_h = Sl^{1/2} B_h Sr^{1/2} and C~ = C Sr^{1/2} having orthonormal rows (only its row space
matters: A_h absorbs the rest), the best A_h leaves the residual ||M_h (I - C~^T C~)||^2, so C~
spans the top-r eigenvectors of sum_h M_h^T M_h, i.e. the top-r right singular subspace of the
stacked [M_h]_h. That D_r x D_r matrix is L^T N L with L = K Sr^{1/2} and N = sum_h Q_h Sl Q_h^T
(m x m). Writing the Gram matrix K Sr K^T = P S^2 P^T (m x m, zero directions dropped), L = P S W^T
and L^T N L = W (S P^T N P S) W^T, so everything follows from the small m x m eigenproblem
E = S P^T N P S = V diag(lambda) V^T:

    C   = V_r^T S^{-1} P^T K        (a combination of the group's key rows; C~ = V_r^T W^T)
    A_h = V_r^T S P^T Q_h           (the least-squares partner of C; no inverse of Sl needed)

and the lambdas are the squared singular values of the stacked [M_h] (energy kept:
sum(lambda[:r]) / sum(lambda)). At r >= rank(K Sr K^T) the factorization is exact on the support
of the weighting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


# ---------------------------------------------------------------- RoPE pairs
def pair_rows(style: str, head_dim: int, pairs: list[int]) -> list[int]:
    """Rows of one head holding rotary ``pairs``, in the layout a head of ``2 * len(pairs)`` dims
    with the same style rotates: ``half`` -> all first components, then all second components;
    ``interleaved`` -> (first, second) adjacent. Pair i is rows (i, i + d/2) of a half-style head
    and (2i, 2i + 1) of an interleaved one."""
    if style == "half":
        return [i for i in pairs] + [i + head_dim // 2 for i in pairs]
    return [r for i in pairs for r in (2 * i, 2 * i + 1)]


def row_energy(w: Tensor, sigma: Tensor | None) -> Tensor:
    """E[(w_j . x)^2] for every row j of ``w``: diag(W sigma W^T)."""
    if sigma is None:
        return (w * w).sum(-1)
    return ((w @ sigma) * w).sum(-1)


def pair_energy(w_head: Tensor, style: str, sigma: Tensor | None) -> Tensor:
    """E[||pair i of this head's projection||^2] for each rotary pair i: (head_dim // 2,)."""
    head_dim = w_head.shape[0]
    e = row_energy(w_head, sigma)
    if style == "half":
        return e[: head_dim // 2] + e[head_dim // 2:]
    return e.view(-1, 2).sum(-1)


def pair_scores(wq: Tensor, wk: Tensor, num_heads: int, num_kv_heads: int, style: str,
                sigma: Tensor | None) -> Tensor:
    """Energy of every rotary pair in the attention logits of each kv group: (KV, head_dim // 2).

    score[g, i] = sum_{h in g} E[||q_{h,i}||^2] * E[||k_{g,i}||^2]. For independent query and key
    tokens and a relative rotation uniform over the circle this is exactly twice the pair's mean
    squared logit contribution (the traceless parts of the 2x2 moments average out under
    rotation), so it ranks pairs by their share of the logit energy.
    """
    head_dim = wq.shape[0] // num_heads
    group = num_heads // num_kv_heads
    eq = torch.stack([pair_energy(wq[h * head_dim:(h + 1) * head_dim], style, sigma) for h in range(num_heads)])
    ek = torch.stack([pair_energy(wk[g * head_dim:(g + 1) * head_dim], style, sigma) for g in range(num_kv_heads)])
    return eq.view(num_kv_heads, group, -1).sum(1) * ek


def mean_rotation(freqs: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """(E[cos w D], E[sin w D]) for every frequency w, over the causal (query, key) pairs of a
    window of ``context`` tokens: distance D = query - key in 0..context-1 with weight
    context - D. ``1 - c^2 - s^2`` is the share of a pair's logit energy that no position-free
    term can reproduce (for a uniformly distributed phase), 0 for w = 0."""
    dist = torch.arange(context, dtype=torch.float64, device=freqs.device)
    weight = (context - dist) / (context - dist).sum()
    angles = freqs.double()[..., None] * dist
    return (angles.cos() * weight).sum(-1), (angles.sin() * weight).sum(-1)


def rotate_key_pairs(k: Tensor, style: str, cos: Tensor, sin: Tensor) -> Tensor:
    """Apply the mean relative rotation to key rows laid out by :func:`pair_rows` (n pairs,
    ``cos``/``sin`` (n,)). A query at distance D after the key sees pair (k1, k2) rotated by -w D:
    q . R(-w D) k; its average over D is q . Rbar k with Rbar = [[c, s], [-s, c]]."""
    n = cos.numel()
    c, s = cos[:, None], sin[:, None]
    if style == "half":
        k1, k2 = k[:n], k[n:]
        return torch.cat([c * k1 + s * k2, c * k2 - s * k1])
    k1, k2 = k[0::2], k[1::2]
    return torch.stack([c * k1 + s * k2, c * k2 - s * k1], 1).flatten(0, 1)


def top_pairs(scores: Tensor, count: int) -> list[list[int]]:
    """The ``count`` highest-scoring pairs of each row (ties: the lower index), ascending."""
    out = []
    for row in scores:
        order = sorted(range(row.numel()), key=lambda i: (-float(row[i]), i))
        out.append(sorted(order[:count]))
    return out


# ---------------------------------------------------------------- shared-key factorization
@dataclass
class SharedFactor:
    """``A[h]`` (r, D_l) per query head of the group, ``C`` (r, D_r), and the eigenvalues
    (squared singular values of the stacked weighted forms), descending."""

    A: list[Tensor]
    C: Tensor
    eigvals: Tensor

    @property
    def energy_kept(self) -> float:
        total = float(self.eigvals.sum())
        r = self.C.shape[0]
        return 1.0 if total <= 0 else float(self.eigvals[:r].sum()) / total


def shared_right_factor(lefts: list[Tensor], right: Tensor, rank: int, *,
                        sigma_right: Tensor | None = None, sigma_left: Tensor | None = None,
                        rtol: float = 1e-12) -> SharedFactor:
    """Best rank-``rank`` factorization ``Q_h^T K ~= A_h^T C`` with C shared by all h (see the
    module docstring). ``lefts``: Q_h (m, D_l); ``right``: K (m, D_r); float64 in, float64 out.
    Rows of C and A_h past the rank of the problem are zero."""
    k = right.double()
    qs = [q.double() for q in lefts]
    gram = k @ (k.T if sigma_right is None else sigma_right @ k.T)  # K Sr K^T (m, m)
    n = sum(q @ (q.T if sigma_left is None else sigma_left @ q.T) for q in qs)  # sum_h Q_h Sl Q_h^T
    s2, p = torch.linalg.eigh(gram)
    keep = s2 > rtol * max(float(s2.max()), 0.0) if s2.numel() else s2 > 0
    s2, p = s2[keep], p[:, keep]
    d_l, d_r = qs[0].shape[1], k.shape[1]
    a = [torch.zeros(rank, d_l, dtype=torch.float64, device=k.device) for _ in qs]
    c = torch.zeros(rank, d_r, dtype=torch.float64, device=k.device)
    if s2.numel() == 0:
        return SharedFactor(a, c, torch.zeros(0, dtype=torch.float64))
    s = s2.sqrt()
    e = s[:, None] * (p.T @ n @ p) * s[None, :]  # S P^T N P S
    lam, v = torch.linalg.eigh((e + e.T) / 2)
    lam, v = lam.flip(0).clamp_min(0), v.flip(1)
    r = min(rank, v.shape[1])
    vr = v[:, :r]  # (k, r)
    c[:r] = (vr.T / s[None, :]) @ p.T @ k
    for h, q in enumerate(qs):
        a[h][:r] = (vr.T * s[None, :]) @ p.T @ q
    return SharedFactor(a, c, lam)


# ---------------------------------------------------------------- the seed's ablation
def svd_band(w: Tensor, start: int, count: int, rows: int) -> Tensor:
    """The first ``rows`` rows of W's reconstruction from singular triplets start..start+count-1
    (zero rows where W has fewer): the seed's ``U[:, a:b] diag(S[a:b]) Vh[a:b]`` split."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    end = min(start + count, s.numel())
    out = torch.zeros(rows, w.shape[1], dtype=torch.float64, device=w.device)
    if end > start:
        recon = (u[:, start:end] * s[start:end]) @ vh[start:end]
        n = min(rows, recon.shape[0])
        out[:n] = recon[:n]
    return out
