"""Pure torch math of a Mamba-2-style selective state space scan with restarts, and of the
depthwise causal convolution in front of it (the references for ``ssd_scan``'s fused kernel; the
layer ``nn.ssm.SelectiveSSM`` re-exports them).

Shapes: x (B, T, H, P), dt (B, T, H) positive (after softplus), A (H,) negative, Bm / Cm
(B, T, N) (one group shared by every head), D (H,), restart (B, T) or (T,) bool. Per head h the
state (P, N) follows

    state_t = (0 if restart_t else exp(dt_t * A_h)) * state_{t-1} + dt_t * outer(x_t, Bm_t)
    y_t     = state_t @ Cm_t + D_h * x_t

``restart[b, t]`` resets the state to zero *before* token t is absorbed, so token t starts a new
segment and no earlier token influences it. The state before token 0 is ``initial_state``
(B, H, P, N) when given (then ``restart[:, 0]`` is honoured: False carries it in), else zero (then
``restart[:, 0]`` is taken as True). Scan math runs in float32, or float64 for float64 inputs,
with autocast off; y comes back in x's dtype, states in the math dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def expand_restart(restart: torch.Tensor, batch: int, length: int, *, first: bool) -> torch.Tensor:
    """(B, T) bool from (B, T) or (T,); ``first``: also mark position 0 (no state comes in)."""
    restart = restart.to(torch.bool).expand(batch, length)
    if first:
        restart = restart.clone()
        restart[:, 0] = True
    return restart


def segment_ids(restart: torch.Tensor) -> torch.Tensor:
    """(B, T) int64: the number of restarts at or before each position (0 = the incoming
    state's segment); two positions interact iff their ids are equal."""
    return torch.cumsum(restart.to(torch.int64), dim=1)


# ------------------------------------------------------------------ one step
def selective_scan_step(state, x_t, dt_t, A, B_t, C_t, D, restart_t):
    """One token of the recurrence, out of place: state (B, H, P, N), x_t (B, H, P), dt_t (B, H),
    B_t / C_t (B, N), restart_t (B,) bool -> (new state, y_t (B, H, P)), both in state's dtype."""
    dtype = state.dtype
    x_t, dt_t, B_t, C_t = (t.to(dtype) for t in (x_t, dt_t, B_t, C_t))
    keep = torch.exp(dt_t * A.to(dtype)) * (~restart_t).to(dtype)[:, None]  # (B, H)
    state = keep[..., None, None] * state + (dt_t[..., None] * x_t)[..., None] * B_t[:, None, None, :]
    y_t = torch.einsum("bhpn,bn->bhp", state, C_t) + D.to(dtype)[:, None] * x_t
    return state, y_t


def causal_conv_step(window, x_t, weight, bias, restart_t):
    """One token of ``causal_conv_segmented``: window (B, C, W-1) the last inputs (oldest first),
    x_t (B, C) -> (out_t (B, C), new window), in window's dtype."""
    dtype = window.dtype
    keep = (~restart_t).to(dtype)[:, None, None]
    full = torch.cat([window * keep, x_t.to(dtype)[..., None]], dim=-1)  # (B, C, W)
    out_t = (full * weight.to(dtype)).sum(-1) + bias.to(dtype)
    return out_t, full[..., 1:]


# ------------------------------------------------------------------ sequential reference
def selective_scan_reference(x, dt, A, Bm, Cm, D, restart, *, initial_state=None, return_final_state=False):
    """The plain loop over t (see the module docstring); y (B, T, H, P) [, final state]."""
    batch, length, heads, head_dim = x.shape
    dtype = math_dtype(x.dtype)
    restart = expand_restart(restart, batch, length, first=False)
    if initial_state is None:
        state = x.new_zeros(batch, heads, head_dim, Bm.shape[-1], dtype=dtype)
    else:
        state = initial_state.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        ys = []
        for t in range(length):
            state, y_t = selective_scan_step(state, x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], D, restart[:, t])
            ys.append(y_t)
        y = torch.stack(ys, dim=1).to(x.dtype)
    return (y, state) if return_final_state else y


# ------------------------------------------------------------------ chunked (SSD) form
def segment_decay(log_decay: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """(..., n) log decays and segment ids -> (..., n, n) weights
    ``W[i, j] = exp(log_decay[j+1] + ... + log_decay[i])`` for j <= i in the same segment, exactly
    0 otherwise. Sums are taken directly (masked cumsum, as Mamba-2's ``segsum``), never as a
    difference of long cumulative sums, and masked before the exp: no overflow, no NaN."""
    n = log_decay.shape[-1]
    below = torch.ones(n, n, dtype=torch.bool, device=log_decay.device).tril(-1)
    sums = torch.cumsum(log_decay[..., :, None].expand(*log_decay.shape, n).masked_fill(~below, 0), dim=-2)
    visible = below | torch.eye(n, dtype=torch.bool, device=log_decay.device)
    visible = visible & (seg[..., :, None] == seg[..., None, :])
    return torch.exp(sums.masked_fill(~visible, float("-inf")))


def selective_scan_chunked(x, dt, A, Bm, Cm, D, restart, *, chunk=64, initial_state=None,
                           return_final_state=False):
    """The same scan in Mamba-2's SSD form ("ssd_minimal"): within each scan chunk of ``chunk``
    tokens a masked quadratic form, between chunks the chunk-end states, every decay masked by
    segment ids so that nothing crosses a restart (exact zeros). T need not be a multiple of
    ``chunk`` (padded with dt = 0, which changes no state). Differentiable by autograd. Restarts,
    ``initial_state`` and the returned final state as in the module docstring."""
    batch, length, heads, head_dim = x.shape
    out_dtype, dtype = x.dtype, math_dtype(x.dtype)
    restart = expand_restart(restart, batch, length, first=initial_state is None)
    pad = (-length) % chunk
    num_chunks = (length + pad) // chunk
    with torch.autocast(x.device.type, enabled=False):
        x, dt, Bm, Cm = (F.pad(t.to(dtype), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, Bm, Cm))
        seg = segment_ids(restart)
        seg = torch.cat([seg, seg[:, -1:].expand(batch, pad)], dim=1).view(batch, num_chunks, chunk)
        x = x.view(batch, num_chunks, chunk, heads, head_dim)
        dt = dt.view(batch, num_chunks, chunk, heads)
        Bm, Cm = (t.view(batch, num_chunks, chunk, -1) for t in (Bm, Cm))
        log_decay = (dt * A.to(dtype)).permute(0, 3, 1, 2)  # (B, H, c, L)

        # per chunk, one leading slot for the incoming state (segment of the previous chunk's end)
        seg_in = F.pad(seg[:, :-1, -1], (1, 0))  # (B, c)
        w = segment_decay(F.pad(log_decay, (1, 0)), torch.cat([seg_in[..., None], seg], -1)[:, None])
        intra, from_start, to_end = w[..., 1:, 1:], w[..., 1:, 0], w[..., -1, 1:]  # (B,H,c,L,L) (B,H,c,L) x2

        xdt = x * dt[..., None]  # (B, c, L, H, P)
        scores = torch.einsum("bcln,bcsn->bcls", Cm, Bm)[:, None] * intra  # (B, H, c, L, L)
        y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)
        chunk_states = torch.einsum("bhcs,bcshp,bcsn->bchpn", to_end, xdt, Bm)  # (B, c, H, P, N)

        # states between chunks: chunk c's end state feeds c+1 unless a restart lies in between
        if initial_state is None:
            initial_state = x.new_zeros(batch, heads, head_dim, Bm.shape[-1])
        states = torch.cat([initial_state.to(dtype)[:, None], chunk_states], dim=1)  # (B, c+1, H, P, N)
        carry = segment_decay(F.pad(log_decay.sum(-1), (1, 0)), F.pad(seg[:, :, -1], (1, 0))[:, None])
        states = torch.einsum("bhzc,bchpn->bzhpn", carry, states)
        incoming, final_state = states[:, :-1], states[:, -1]
        y = y + torch.einsum("bcln,bhcl,bchpn->bclhp", Cm, from_start, incoming)
        y = y.reshape(batch, num_chunks * chunk, heads, head_dim)[:, :length]
        y = (y + D.to(dtype)[:, None] * x.view(batch, -1, heads, head_dim)[:, :length]).to(out_dtype)
    return (y, final_state) if return_final_state else y


# ------------------------------------------------------------------ convolution
def causal_conv_segmented(x, weight, bias, restart, *, initial_state=None, return_final_state=False):
    """Depthwise causal convolution that does not look across restarts: x (B, T, C), weight (C, W),
    bias (C,) -> (B, T, C) with ``out_t = bias + sum_j weight[:, W-1-j] * x_{t-j}`` (torch Conv1d's
    orientation), where x_{t-j} counts only if no restart lies in (t-j, t]. Inputs before token 0
    come from ``initial_state`` (B, C, W-1: the last W-1 inputs, oldest first; zero when None)
    while no restart lies in [0, t]. ``return_final_state`` also returns the window after the last
    token (B, C, W-1): the last W-1 inputs of the current segment, zero where it is shorter."""
    batch, length, channels = x.shape
    width = weight.shape[1]
    restart = expand_restart(restart, batch, length, first=initial_state is None)
    if initial_state is None:
        initial_state = x.new_zeros(batch, channels, width - 1)
    seg = F.pad(segment_ids(restart), (width - 1, 0))  # (B, W-1+T): 0 before token 0
    padded = torch.cat([initial_state.to(x.dtype).transpose(1, 2), x], dim=1)  # (B, W-1+T, C)
    windows = padded.unfold(1, width, 1)  # (B, T, C, W): inputs t-W+1 .. t
    same = seg.unfold(1, width, 1) == seg[:, width - 1:, None]  # (B, T, W)
    windows = windows * same[:, :, None, :].to(x.dtype)
    out = torch.einsum("btcw,cw->btc", windows, weight.to(x.dtype)) + bias.to(x.dtype)
    return (out, windows[:, -1, :, 1:]) if return_final_state else out


__all__ = ["causal_conv_segmented", "causal_conv_step", "expand_restart", "math_dtype", "segment_decay",
           "segment_ids", "selective_scan_chunked", "selective_scan_reference", "selective_scan_step"]
