"""Triton device code of the fused quantize-on-write kernel (host side and design notes:
``cache_write``).

Grid ``(B * T, chunks)``: axis 0 is one token (b, t); axis 1 walks the chunks of every field
(field k owns chunks ``[START_k, START_k + NCH_k)``, ``CH_k`` row elements each, whole blocks).
Up to 4 fields per launch (slots 0-3, ``NF`` used). Format codes (``FMT``): 0 fp32, 1 fp16,
2 bf16 (stored as int16 bits), 3 q8_0, 4 q4_0, 5 nf4.

Exactness. Every quotient is ``tl.math.div_rn`` (IEEE division; Triton's ``/`` is
``div.full.f32``, ~2 ulp) and the host launches with ``enable_fp_fusion=False`` so that q4_0's
``x * id + 8.5`` is not contracted into an fma (the sm_90 PTX then holds div.rn / mul.rn / add.rn
only: tests/kernels/test_kernels_cache_write.py compiles it and checks). The only ftz instruction
is floor's ``cvt.rmi.ftz`` (libdevice), applied to values >= 0 where flushing a subnormal to 0
gives the same floor. fp32 -> bf16 is done on the bits (round to nearest even, NaN stays NaN),
because Triton's CPU interpreter truncates in its bf16 casts; bf16 inputs are read as int16 bits
and widened by a shift, for the same reason.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnlab.quant.nf4 import NF4_MIDPOINTS

# nf4 decision boundaries: attnlab.quant.nf4.NF4_MIDPOINTS rounded to fp32 (the reference
# compares in fp32), held as Python floats that fp32 represents exactly.
_MIDS = torch.tensor(NF4_MIDPOINTS, dtype=torch.float32).tolist()
_M0, _M1, _M2, _M3, _M4, _M5, _M6, _M7, _M8, _M9, _M10, _M11, _M12, _M13, _M14 = (tl.constexpr(m) for m in _MIDS)


@triton.jit
def _bf16_bits(x):
    """fp32 -> bf16 bits (int16), round to nearest even; NaN -> 0x7FC0 (NaN stays NaN; torch's
    NaN bits differ between its CPU and CUDA casts, so NaN is not matched bit for bit)."""
    u = x.to(tl.int32, bitcast=True)
    r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.int16)


@triton.jit
def _to_store(x, FMT: tl.constexpr):
    """fp32 values -> what a float field of format FMT (0 fp32, 1 fp16, 2 bf16 bits) stores."""
    if FMT == 2:
        y = _bf16_bits(x)
    elif FMT == 1:
        y = x.to(tl.float16)
    else:
        y = x
    return y


@triton.jit
def _load_rows(X, sx_b, sx_t, sx_h, sx_d, b, t, e, N: tl.constexpr, HD: tl.constexpr, IN_BF16: tl.constexpr):
    """Row elements ``e`` (any shape) of token (b, t) as fp32, zero at e >= N. Element e is
    (head e // HD, dim e % HD) of a (B, T, heads, HD) view."""
    h = e // HD
    off = b.to(tl.int64) * sx_b + t.to(tl.int64) * sx_t + h * sx_h + (e - h * HD) * sx_d
    raw = tl.load(X + off, mask=e < N, other=0)
    if IN_BF16:
        x = (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = raw.to(tl.float32)
    return x


@triton.jit
def _recip(d):
    """1 / d as an IEEE fp32 division, 0 where d == 0."""
    safe = tl.where(d == 0, 1.0, d)
    return tl.where(d == 0, 0.0, tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), safe))


@triton.jit
def _nf4_codes(v):
    """Number of nf4 midpoints strictly below v (torch.bucketize(v, midpoints, right=False))."""
    c = (v > _M0).to(tl.int32) + (v > _M1).to(tl.int32) + (v > _M2).to(tl.int32)
    c += (v > _M3).to(tl.int32) + (v > _M4).to(tl.int32) + (v > _M5).to(tl.int32)
    c += (v > _M6).to(tl.int32) + (v > _M7).to(tl.int32) + (v > _M8).to(tl.int32)
    c += (v > _M9).to(tl.int32) + (v > _M10).to(tl.int32) + (v > _M11).to(tl.int32)
    c += (v > _M12).to(tl.int32) + (v > _M13).to(tl.int32) + (v > _M14).to(tl.int32)
    return c


@triton.jit
def _field(X, sx_b, sx_t, sx_h, sx_d, O, so_b, so_p, so_e, S, ss_b, ss_p, ss_k, cap,
           RG, sr_b, sr_s, sr_e, b, t, pos, slot, tok_ok, ring_ok, chunk,
           FMT: tl.constexpr, N: tl.constexpr, HD: tl.constexpr, IN_BF16: tl.constexpr, CH: tl.constexpr,
           HAS_RING: tl.constexpr, RING_FMT: tl.constexpr):
    """Chunk ``chunk`` (CH row elements) of one field of token (b, t): the stored form at
    position ``pos`` (if tok_ok and 0 <= pos < cap) and the exact copy in ring slot ``slot``
    (if ring_ok)."""
    store_ok = tok_ok & (pos >= 0) & (pos < cap)
    if HAS_RING:
        any_ok = store_ok | ring_ok
    else:
        any_ok = store_ok
    if any_ok:
        # masks as one comparison against a limit that is 0 when nothing may be written (the CPU
        # interpreter mis-types `tensor & scalar` of booleans)
        n_store = tl.where(store_ok, N, 0)
        row_o = b.to(tl.int64) * so_b + pos * so_p
        if FMT <= 2:
            e = chunk * CH + tl.arange(0, CH)
            x = _load_rows(X, sx_b, sx_t, sx_h, sx_d, b, t, e, N, HD, IN_BF16)
            tl.store(O + row_o + e * so_e, _to_store(x, FMT), mask=e < n_store)
        else:
            QK: tl.constexpr = 64 if FMT == 5 else 32
            P: tl.constexpr = 1 if FMT == 3 else 2        # codes per byte
            NBC: tl.constexpr = CH // QK                   # blocks in this chunk
            NB: tl.constexpr = (N + QK - 1) // QK          # blocks of the row
            blk = chunk * NBC + tl.arange(0, NBC)                                   # (NBC,)
            j = tl.arange(0, QK // P)[None, :, None] * P + tl.arange(0, P)[None, None, :]  # (1, QK/P, P)
            e = blk[:, None, None] * QK + j                                         # (NBC, QK/P, P)
            x = _load_rows(X, sx_b, sx_t, sx_h, sx_d, b, t, e, N, HD, IN_BF16)
            ax = tl.abs(x)
            amax = tl.max(tl.max(ax, axis=2), axis=1)                               # (NBC,)
            if FMT == 3:     # q8_0: d = amax / 127, q = round_half_away(x * (1 / d))
                d = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))
                v = x * _recip(d)[:, None, None]
                a = tl.abs(v)
                f = tl.floor(a)
                r = f + tl.floor(2.0 * (a - f))
                q = tl.where(v < 0, -r, r).to(tl.int32)
                code = q & 255
            elif FMT == 4:   # q4_0: m = first signed max magnitude, d = m / -8
                first = tl.min(tl.min(tl.where(ax == amax[:, None, None], j, QK), axis=2), axis=1)
                m = tl.max(tl.max(tl.where(j == first[:, None, None], x, float("-inf")), axis=2), axis=1)
                d = tl.math.div_rn(m, tl.full(m.shape, -8.0, tl.float32))
                v = x * _recip(d)[:, None, None] + 8.5
                code = tl.minimum(v.to(tl.int32), 15)      # v > -1: truncation == trunc()
            else:            # nf4: s = fp16(min(amax, 65504)), code = #midpoints < x * (1 / s)
                d = tl.minimum(amax, 65504.0).to(tl.float16).to(tl.float32)
                code = _nf4_codes(x * _recip(d)[:, None, None])
            if P == 2:
                byte = tl.sum(code << (4 * tl.arange(0, 2)[None, None, :]), axis=2)  # c[2i] | c[2i+1] << 4
            else:
                byte = tl.sum(code, axis=2)
            bi = blk[:, None] * (QK // P) + tl.arange(0, QK // P)[None, :]           # (NBC, QK/P)
            tl.store(O + row_o + bi * so_e, byte.to(tl.uint8), mask=bi < tl.where(store_ok, NB * (QK // P), 0))
            tl.store(S + b.to(tl.int64) * ss_b + pos * ss_p + blk * ss_k, d.to(tl.float16),
                     mask=blk < tl.where(store_ok, NB, 0))
        if HAS_RING:   # the exact copy, from the same tile (e, x)
            tl.store(RG + b.to(tl.int64) * sr_b + slot * sr_s + e * sr_e, _to_store(x, RING_FMT),
                     mask=e < tl.where(ring_ok, N, 0))


@triton.jit
def cache_write_kernel(
        OFFSETS, VALID, T, RPOS, srp_b, srp_s, R,
        X0, x0b, x0t, x0h, x0d, O0, o0b, o0p, o0e, S0, s0b, s0p, s0k, cap0, RG0, r0b, r0s, r0e,
        X1, x1b, x1t, x1h, x1d, O1, o1b, o1p, o1e, S1, s1b, s1p, s1k, cap1, RG1, r1b, r1s, r1e,
        X2, x2b, x2t, x2h, x2d, O2, o2b, o2p, o2e, S2, s2b, s2p, s2k, cap2, RG2, r2b, r2s, r2e,
        X3, x3b, x3t, x3h, x3d, O3, o3b, o3p, o3e, S3, s3b, s3p, s3k, cap3, RG3, r3b, r3s, r3e,
        NF: tl.constexpr, ANY_RING: tl.constexpr, WRITE_POS: tl.constexpr,
        FMT0: tl.constexpr, N0: tl.constexpr, HD0: tl.constexpr, BF0: tl.constexpr, CH0: tl.constexpr,
        ST0: tl.constexpr, NCH0: tl.constexpr, RING0: tl.constexpr, RF0: tl.constexpr,
        FMT1: tl.constexpr, N1: tl.constexpr, HD1: tl.constexpr, BF1: tl.constexpr, CH1: tl.constexpr,
        ST1: tl.constexpr, NCH1: tl.constexpr, RING1: tl.constexpr, RF1: tl.constexpr,
        FMT2: tl.constexpr, N2: tl.constexpr, HD2: tl.constexpr, BF2: tl.constexpr, CH2: tl.constexpr,
        ST2: tl.constexpr, NCH2: tl.constexpr, RING2: tl.constexpr, RF2: tl.constexpr,
        FMT3: tl.constexpr, N3: tl.constexpr, HD3: tl.constexpr, BF3: tl.constexpr, CH3: tl.constexpr,
        ST3: tl.constexpr, NCH3: tl.constexpr, RING3: tl.constexpr, RF3: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.program_id(1)
    b = pid // T
    t = pid - b * T
    pos = tl.load(OFFSETS + b).to(tl.int64) + t
    n_valid = tl.minimum(tl.load(VALID + b).to(tl.int64), T)
    tok_ok = t < n_valid
    if ANY_RING:   # only the newest R valid tokens of the chunk: distinct slots, no two writers
        ring_ok = tok_ok & (t >= n_valid - R) & (pos >= 0)
        slot = pos % R
        if WRITE_POS:  # one program per token writes the layer's slot position
            if c == 0:
                tl.store(RPOS + b.to(tl.int64) * srp_b + slot * srp_s, pos, mask=ring_ok)
    else:
        ring_ok = tok_ok & False
        slot = pos
    if c < ST0 + NCH0:
        _field(X0, x0b, x0t, x0h, x0d, O0, o0b, o0p, o0e, S0, s0b, s0p, s0k, cap0, RG0, r0b, r0s, r0e,
               b, t, pos, slot, tok_ok, ring_ok, c - ST0, FMT0, N0, HD0, BF0, CH0, RING0, RF0)
    if NF > 1:
        if (c >= ST1) & (c < ST1 + NCH1):
            _field(X1, x1b, x1t, x1h, x1d, O1, o1b, o1p, o1e, S1, s1b, s1p, s1k, cap1, RG1, r1b, r1s, r1e,
                   b, t, pos, slot, tok_ok, ring_ok, c - ST1, FMT1, N1, HD1, BF1, CH1, RING1, RF1)
    if NF > 2:
        if (c >= ST2) & (c < ST2 + NCH2):
            _field(X2, x2b, x2t, x2h, x2d, O2, o2b, o2p, o2e, S2, s2b, s2p, s2k, cap2, RG2, r2b, r2s, r2e,
                   b, t, pos, slot, tok_ok, ring_ok, c - ST2, FMT2, N2, HD2, BF2, CH2, RING2, RF2)
    if NF > 3:
        if c >= ST3:
            _field(X3, x3b, x3t, x3h, x3d, O3, o3b, o3p, o3e, S3, s3b, s3p, s3k, cap3, RG3, r3b, r3s, r3e,
                   b, t, pos, slot, tok_ok, ring_ok, c - ST3, FMT3, N3, HD3, BF3, CH3, RING3, RF3)
