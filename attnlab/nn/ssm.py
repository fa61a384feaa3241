"""A Mamba-2-style selective state space block whose state restarts where told (the SSM that the
Attamba attention variant runs over token chunks to make keys and values).

Per head h (state (P, N), one B/C group shared by all heads):

    state_t = (0 if restart_t else exp(dt_t * A_h)) * state_{t-1} + dt_t * outer(x_t, B_t)
    y_t     = state_t @ C_t + D_h * x_t

``restart_t`` resets the state, and the causal convolution's window, *before* token t is
absorbed: token t starts a new segment that sees no earlier token. The scan math (pure functions,
re-exported from ``kernels.ssd_reference``) runs in float32, or float64 for float64 modules;
``forward`` picks the fused Triton scan on CUDA and the chunked SSD form elsewhere, ``step``
advances one token in place (no allocation that depends on data, no host sync: CUDA-graph safe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.kernels import report_fallback, uses_kernels
from attnlab.kernels.ssd_reference import (causal_conv_segmented, causal_conv_step, expand_restart, math_dtype,
                                           selective_scan_chunked, selective_scan_reference, selective_scan_step)
from attnlab.kernels.ssd_scan import selective_scan_fused, unsupported_reason
from attnlab.nn.norm import RMSNorm

SCANS = ("auto", "chunked", "reference", "kernel")


@dataclass
class SSMState:
    """What ``SelectiveSSM.step`` carries between tokens: ``conv`` (B, conv_dim, conv_width - 1)
    the last conv inputs (oldest first), ``ssm`` (B, H, P, N); float32 (float64 for a float64
    module)."""

    conv: torch.Tensor
    ssm: torch.Tensor

    @classmethod
    def zeros(cls, batch: int, module: SelectiveSSM, device=None, dtype: torch.dtype | None = None) -> SSMState:
        weight = module.out_proj.weight
        dtype = dtype or math_dtype(weight.dtype)
        device = device if device is not None else weight.device
        return cls(conv=torch.zeros(batch, module.conv_dim, module.conv_width - 1, device=device, dtype=dtype),
                   ssm=torch.zeros(batch, module.num_heads, module.head_dim, module.d_state, device=device,
                                   dtype=dtype))


class SelectiveSSM(nn.Module):
    """(B, T, width) -> (B, T, width): in_proj to [z, x, B, C, dt]; a depthwise causal conv + SiLU
    over [x, B, C]; the selective scan with ``num_heads`` heads of ``head_dim = expand * width /
    num_heads``; y * silu(z) through an RMSNorm over d_inner (float32); out_proj."""

    def __init__(self, width: int, *, d_state: int = 16, num_heads: int | None = None, expand: int = 1,
                 conv_width: int = 4, dt_min: float = 1e-3, dt_max: float = 1e-1, norm_eps: float = 1e-5):
        super().__init__()
        d_inner = expand * width
        num_heads = num_heads if num_heads is not None else max(1, width // 16)
        if num_heads <= 0 or d_inner % num_heads:
            raise ValueError(f"SelectiveSSM: d_inner = expand * width = {expand} * {width} = {d_inner} "
                             f"must be divisible by num_heads = {num_heads}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"SelectiveSSM: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.width, self.d_inner, self.d_state, self.num_heads = width, d_inner, d_state, num_heads
        self.head_dim, self.conv_width, self.dt_range = d_inner // num_heads, conv_width, (dt_min, dt_max)
        self.conv_dim = d_inner + 2 * d_state
        self.in_proj = nn.Linear(width, 2 * d_inner + 2 * d_state + num_heads, bias=False)
        self.conv = nn.Conv1d(self.conv_dim, self.conv_dim, conv_width, groups=self.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.D = nn.Parameter(torch.empty(num_heads))
        self.norm = RMSNorm(d_inner, norm_eps)
        self.out_proj = nn.Linear(d_inner, width, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba-2's initialisation: softplus(dt_bias) log-uniform in [dt_min, dt_max], A = -exp(A_log)
        uniform in [-16, -1], D = 1, norm weight 1, torch's default for the projections and conv."""
        self.in_proj.reset_parameters()
        self.conv.reset_parameters()
        self.out_proj.reset_parameters()
        self.norm.weight.fill_(1.0)
        self.D.fill_(1.0)
        lo, hi = (math.log(v) for v in self.dt_range)
        dt = torch.exp(torch.rand(self.num_heads, dtype=torch.float64) * (hi - lo) + lo).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus
        self.A_log.copy_(torch.empty(self.num_heads, dtype=torch.float64).uniform_(1.0, 16.0).log())

    # ------------------------------------------------------------------ pieces shared by forward and step
    def _conv_weight(self) -> torch.Tensor:
        return self.conv.weight[:, 0]  # (conv_dim, conv_width)

    def _scan_inputs(self, xbc: torch.Tensor, dt: torch.Tensor):
        """conv output (..., conv_dim) and raw dt (..., H) -> x (..., H, P), dt, A, B, C (scan dtype
        for dt and A)."""
        x, Bm, Cm = torch.split(F.silu(xbc), [self.d_inner, self.d_state, self.d_state], dim=-1)
        dtype = math_dtype(dt.dtype)
        dt = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype))
        A = -torch.exp(self.A_log.to(dtype))
        return x.unflatten(-1, (self.num_heads, self.head_dim)), dt, A, Bm, Cm

    def _output(self, y: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Gated RMSNorm (float32 or float64) then out_proj; y (..., H, P), z (..., d_inner)."""
        acc = math_dtype(z.dtype)
        gated = y.flatten(-2).to(acc) * F.silu(z.to(acc))
        return self.out_proj(self.norm(gated).to(dtype))

    def _split_projection(self, u: torch.Tensor):
        return torch.split(self.in_proj(u), [self.d_inner, self.conv_dim, self.num_heads], dim=-1)

    def _scan(self, name: str, x: torch.Tensor):
        if name not in SCANS:
            raise ValueError(f"SelectiveSSM: scan must be one of {SCANS}, got {name!r}")
        if name == "reference":
            return selective_scan_reference
        if name == "chunked" or (name == "auto" and not uses_kernels(x)):
            return selective_scan_chunked
        reason = unsupported_reason(x, self.d_state)
        if reason is None:
            return selective_scan_fused
        if name == "kernel":
            raise ValueError(f"SelectiveSSM: scan='kernel' is not available: {reason}")
        report_fallback(f"selective scan: {reason}")
        return selective_scan_chunked

    # ------------------------------------------------------------------ full sequences
    def forward(self, u: torch.Tensor, restart: torch.Tensor, *, scan: str = "auto", state: SSMState | None = None,
                return_state: bool = False):
        """u (B, T, width), restart (B, T) or (T,) bool -> (B, T, width) [, the ``SSMState`` after
        the last token]. ``scan``: "auto" (the fused kernel where ``kernels.uses_kernels`` says so and
        it can serve, else chunked), "chunked", "reference" (the sequential loop) or "kernel".
        ``state``: the state before token 0 (then ``restart[:, 0]`` is honoured; without it token 0
        starts a segment)."""
        batch, length, _ = u.shape
        restart = expand_restart(restart, batch, length, first=state is None)
        z, xbc, dt = self._split_projection(u)
        xbc, conv_state = causal_conv_segmented(xbc, self._conv_weight(), self.conv.bias, restart,
                                                initial_state=None if state is None else state.conv,
                                                return_final_state=True)
        x, dt, A, Bm, Cm = self._scan_inputs(xbc, dt)
        y, ssm_state = self._scan(scan, x)(x, dt, A, Bm, Cm, self.D, restart, return_final_state=True,
                                           initial_state=None if state is None else state.ssm)
        out = self._output(y, z, u.dtype)
        if not return_state:
            return out
        dtype = math_dtype(self.out_proj.weight.dtype)
        return out, SSMState(conv=conv_state.to(dtype), ssm=ssm_state.to(dtype))

    # ------------------------------------------------------------------ one token
    def zero_state(self, batch: int, device=None) -> SSMState:
        return SSMState.zeros(batch, self, device)

    def step(self, u_t: torch.Tensor, state: SSMState, restart_t: torch.Tensor) -> torch.Tensor:
        """One token: u_t (B, width), restart_t (B,) bool (True: clear the conv window and the SSM
        state before this token) -> y_t (B, width); ``state`` is updated in place."""
        z, xbc, dt = self._split_projection(u_t)
        xbc, window = causal_conv_step(state.conv, xbc, self._conv_weight(), self.conv.bias, restart_t)
        x, dt, A, Bm, Cm = self._scan_inputs(xbc, dt)
        ssm, y = selective_scan_step(state.ssm, x, dt, A, Bm, Cm, self.D, restart_t)
        state.conv.copy_(window)
        state.ssm.copy_(ssm)
        return self._output(y, z, u_t.dtype)


__all__ = ["SCANS", "SSMState", "SelectiveSSM", "causal_conv_segmented", "selective_scan_chunked",
           "selective_scan_reference"]
