"""Triton device code of the fused selective scan (host side: ``kernels.ssd_scan``; semantics:
``kernels.ssd_reference.selective_scan_reference``).

Grid ``(B, H, cdiv(P, BLOCK_P))``: one program per sequence, head and block of head dims walks
the T tokens in order with its (BLOCK_P, N) slice of the state in registers (fp32):

    state = (restart_t ? 0 : exp(dt_t * A_h)) * state + dt_t * outer(x_t, B_t)
    y_t   = state @ C_t + D_h * x_t

Inputs may be fp32, fp16 or bf16 (widened on load); y is stored in Y's dtype; the state after the
last token goes to FINAL (fp32) when ``HAS_FINAL``; ``HAS_INIT`` reads the incoming state from
INIT (fp32), else it starts at zero. Pointers advance by the token strides, so offsets never
overflow 32 bits.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ssd_scan_kernel(
        X, s_xb, s_xt, s_xh, s_xp, DT, s_db, s_dt, s_dh, A, BM, s_bb, s_bt, s_bn, CM, s_cb, s_ct, s_cn, D,
        RESTART, s_rb, s_rt, Y, s_yb, s_yt, s_yh, s_yp, INIT, FINAL, T,
        P: tl.constexpr, N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_INIT: tl.constexpr, HAS_FINAL: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    pm = p < P
    nm = n < N
    state_off = ((b * tl.num_programs(1) + h) * P + p[:, None]) * N + n[None, :]  # (B, H, P, N) contiguous
    state_mask = pm[:, None] & nm[None, :]
    if HAS_INIT:
        state = tl.load(INIT + state_off, mask=state_mask, other=0.0)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    a = tl.load(A + h).to(tl.float32)
    d = tl.load(D + h).to(tl.float32)

    x_ptr = X + b * s_xb + h * s_xh + p * s_xp
    y_ptr = Y + b * s_yb + h * s_yh + p * s_yp
    dt_ptr = DT + b * s_db + h * s_dh
    b_ptr = BM + b * s_bb + n * s_bn
    c_ptr = CM + b * s_cb + n * s_cn
    r_ptr = RESTART + b * s_rb
    for _ in range(T):
        restart = tl.load(r_ptr)
        dt = tl.load(dt_ptr).to(tl.float32)
        x = tl.load(x_ptr, mask=pm, other=0.0).to(tl.float32)
        bv = tl.load(b_ptr, mask=nm, other=0.0).to(tl.float32)
        cv = tl.load(c_ptr, mask=nm, other=0.0).to(tl.float32)
        keep = tl.where(restart != 0, 0.0, tl.exp(dt * a))
        state = state * keep + (dt * x)[:, None] * bv[None, :]
        y = tl.sum(state * cv[None, :], axis=1) + d * x
        tl.store(y_ptr, y.to(Y.dtype.element_ty), mask=pm)
        x_ptr += s_xt
        y_ptr += s_yt
        dt_ptr += s_dt
        b_ptr += s_bt
        c_ptr += s_ct
        r_ptr += s_rt
    if HAS_FINAL:
        tl.store(FINAL + state_off, state, mask=state_mask)
