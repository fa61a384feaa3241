"""Host side of the fused selective scan (device code: ``ssd_scan_jit``; semantics and the torch
paths: ``ssd_reference``).

``unsupported_reason(x, d_state)`` says why a call must take a torch path instead (no Triton,
not on CUDA nor in the interpreter, float64, d_state over ``MAX_D_STATE``,
``ATTNLAB_DECODE_KERNEL=reference``). ``selective_scan_fused`` launches the forward kernel once;
it is an autograd function whose backward recomputes the forward through
``selective_scan_chunked`` and differentiates that (so its gradients are the chunked path's).
"""

from __future__ import annotations

import os

import torch

from attnlab.kernels import triton_missing
from attnlab.kernels.ssd_reference import expand_restart, selective_scan_chunked

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_D_STATE = 256
STATE_ELEMENTS = 4096  # BLOCK_P * BLOCK_N: one program's state slice, kept in registers


def unsupported_reason(x: torch.Tensor, d_state: int | None = None) -> str | None:
    """Why the fused scan cannot serve x (B, T, H, P) with this state size; None when it can."""
    if os.environ.get("ATTNLAB_DECODE_KERNEL", "") == "reference":
        return "ATTNLAB_DECODE_KERNEL=reference"
    missing = triton_missing()
    if missing:
        return missing
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return f"ssd scan kernel: {x.device} tensor without TRITON_INTERPRET=1"
    if x.dtype not in KERNEL_DTYPES:
        return f"ssd scan kernel: dtype {x.dtype}"
    if d_state is not None and d_state > MAX_D_STATE:
        return f"ssd scan kernel: d_state {d_state} > {MAX_D_STATE}"
    return None


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _scan_forward(x, dt, A, Bm, Cm, D, restart, initial_state):
    """One launch: (y (B, T, H, P) in x's dtype, final state (B, H, P, N) fp32)."""
    from attnlab.kernels.ssd_scan_jit import ssd_scan_kernel
    from attnlab.kernels.triton_compat import interpreter_compat

    interpreter_compat()
    batch, length, heads, head_dim = x.shape
    d_state = Bm.shape[-1]
    restart = expand_restart(restart, batch, length, first=initial_state is None).to(torch.int32)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    final = x.new_empty(batch, heads, head_dim, d_state, dtype=torch.float32)
    init = final if initial_state is None else initial_state.to(torch.float32).contiguous()
    A, D = (t.to(torch.float32).contiguous() for t in (A, D))
    block_n = _next_power_of_2(d_state)
    block_p = min(_next_power_of_2(head_dim), max(1, STATE_ELEMENTS // block_n))
    grid = (batch, heads, -(-head_dim // block_p))
    ssd_scan_kernel[grid](
        x, *x.stride(), dt, *dt.stride(), A, Bm, *Bm.stride(), Cm, *Cm.stride(), D,
        restart, *restart.stride(), y, *y.stride(), init, final, length,
        P=head_dim, N=d_state, BLOCK_P=block_p, BLOCK_N=block_n,
        HAS_INIT=initial_state is not None, HAS_FINAL=True)
    return y, final


class _FusedScan(torch.autograd.Function):
    """Forward: the Triton kernel. Backward: the chunked torch scan, recomputed and differentiated."""

    @staticmethod
    def forward(ctx, x, dt, A, Bm, Cm, D, restart, initial_state):
        ctx.save_for_backward(x, dt, A, Bm, Cm, D, restart, initial_state)
        return _scan_forward(x, dt, A, Bm, Cm, D, restart, initial_state)

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        needs = ctx.needs_input_grad
        with torch.enable_grad():
            args = [t.detach().requires_grad_() if need else t for t, need in zip(ctx.saved_tensors, needs)]
            x, dt, A, Bm, Cm, D, restart, initial_state = args
            y, final = selective_scan_chunked(x, dt, A, Bm, Cm, D, restart, initial_state=initial_state,
                                              return_final_state=True)
            wanted = [t for t, need in zip(args, needs) if need]
            grads = iter(torch.autograd.grad((y, final), wanted, (grad_y, grad_final), allow_unused=True))
        return tuple(next(grads) if need else None for need in needs)


def selective_scan_fused(x, dt, A, Bm, Cm, D, restart, *, initial_state=None, return_final_state=False):
    """``selective_scan_reference``'s contract in one Triton launch (fp32 state, fp32/fp16/bf16
    inputs; y in x's dtype, the final state fp32). Differentiable: the backward is the chunked
    torch path's (``selective_scan_chunked``, recomputed)."""
    y, final = _FusedScan.apply(x, dt, A, Bm, Cm, D, restart, initial_state)
    return (y, final) if return_final_state else y


__all__ = ["MAX_D_STATE", "selective_scan_fused", "unsupported_reason"]
