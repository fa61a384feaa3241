"""Triton device code of the chunked-prefill attention kernel (host side and design notes:
``prefill``).

One program: sequence b, kv head kvh, a block of TM query tokens; its ROWS = GP x TM rows are
(query head g of the kv group, token t), row r = g * TM + t. Key fields 0..NF-1 (NF <= 3) and
the value field each come with a format code ``F*`` (0 float, 1 q8_0, 2 q4_0, 3 nf4), the head
dim ``HD*`` (padded to ``HDP*`` lanes, a power of two >= 16), the block size ``QK*``, ``SONE*``
(every head lies inside one block: one scale per row) and ``EX*`` (the exact tail of this field
differs from its stored values, so it is read from the ring / fresh rows).
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnlab.kernels.triton_common import cast as _cast
from attnlab.kernels.triton_common import dot as _dot


@triton.jit
def _dot_acc(a, b, acc, DOT_T: tl.constexpr):
    """acc + a x b (fp32 accumulator)."""
    if DOT_T == 0:
        c = tl.dot(a, b, acc=acc, input_precision="ieee")
    else:
        c = tl.dot(a, b, acc=acc)
    return c


@triton.jit
def _q_tile(Q, sq_b, sq_h, sq_t, b, h, t, row_ok, HD: tl.constexpr, HDP: tl.constexpr):
    """Queries of rows (head h, token t) (ROWS,) -> (ROWS, HDP) fp32, zero outside the head."""
    d = tl.arange(0, HDP)
    ptr = Q + b.to(tl.int64) * sq_b + (h * sq_h + t * sq_t)[:, None] + d[None, :]
    return tl.load(ptr, mask=row_ok[:, None] & (d < HD)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _null_score(q, NK, kvh, HD: tl.constexpr, HDP: tl.constexpr):
    d = tl.arange(0, HDP)
    nk = tl.load(NK + kvh * HD + d, mask=d < HD, other=0.0).to(tl.float32)
    return tl.sum(q * nk[None, :], axis=1)


@triton.jit
def _load(ptr, mask, USE_MASK: tl.constexpr):
    if USE_MASK:
        x = tl.load(ptr, mask=mask, other=0)
    else:
        x = tl.load(ptr)
    return x


@triton.jit
def _raw(D, S, rowd, rows, e0, ok, FMT: tl.constexpr, HD: tl.constexpr, HDP: tl.constexpr, QK: tl.constexpr,
         SONE: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """The stored bytes (or float values) of head elements e0 .. e0 + HD - 1 of BLOCK_N rows
    (``rowd``/``rows``: the rows' offsets into the codes or data / the scales) and their block
    scales: (raw, scale). ``ok`` masks rows (only when MASKED); lanes >= HD load as zero. Loads
    are unmasked where nothing needs masking (full blocks, head dims that are powers of two)."""
    d = tl.arange(0, HDP)
    dm = d < HD
    if MASKED:
        m2 = ok[:, None] & dm[None, :]
    else:
        m2 = tl.broadcast_to(dm[None, :], (BLOCK_N, HDP))
    if FMT <= 1:  # float values / q8_0 bytes in element order
        raw = _load(D + rowd[:, None] + (e0 + d)[None, :], m2, MASKED or HD != HDP)
    elif HD % 2 == 0:  # 4-bit, whole bytes: byte i = code[2i] | code[2i + 1] << 4
        half: tl.constexpr = HDP // 2
        i = tl.arange(0, half)
        if MASKED:
            mb = ok[:, None] & (i < HD // 2)[None, :]
        else:
            mb = tl.broadcast_to((i < HD // 2)[None, :], (BLOCK_N, half))
        raw = _load(D + rowd[:, None] + (e0 // 2 + i)[None, :], mb, MASKED or HD // 2 != half)
    else:  # 4-bit, odd head dims: heads start inside bytes; one byte per element
        raw = _load(D + rowd[:, None] + ((e0 + d) >> 1)[None, :], m2, MASKED or HD != HDP)
    if FMT == 0:
        sc = tl.zeros([BLOCK_N], tl.float16)                                    # unused
    elif SONE:  # the head inside one block: one scale per row
        sc = _load(S + rows + e0 // QK, ok, MASKED)
    else:
        sc = _load(S + rows[:, None] + ((e0 + d) // QK)[None, :], m2, MASKED or HD != HDP)
    return raw, sc


@triton.jit
def _deq(raw, sc, e0, CB, FMT: tl.constexpr, HD: tl.constexpr, HDP: tl.constexpr, SONE: tl.constexpr,
         BLOCK_N: tl.constexpr):
    """(raw, scale) -> the (BLOCK_N, HDP) values (float formats: as stored; else fp32, zero in
    lanes >= HD). Codes become floats without the (quarter-rate) int->float converter:
    bits(0x4B000000 | u) = 2**23 + u."""
    if FMT == 0:
        x = raw
    else:
        u = raw.to(tl.int32)
        if FMT == 1:  # uint8 byte of an int8 code: (u ^ 0x80) = q + 128
            v = (u ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        else:
            if HD % 2 == 0:
                c = tl.reshape(tl.join(u & 15, u >> 4), (BLOCK_N, HDP))          # element order
            else:
                e = e0 + tl.arange(0, HDP)
                c = (u >> ((e & 1) * 4)[None, :]) & 15
            if FMT == 2:  # q4_0: code - 8
                v = (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            else:         # nf4 codebook levels
                v = tl.load(CB + c)
        if SONE:
            x = v * sc.to(tl.float32)[:, None]
            if HD != HDP:
                x = tl.where((tl.arange(0, HDP) < HD)[None, :], x, 0.0)
        else:
            x = v * sc.to(tl.float32)
    return x


@triton.jit
def _exact(R, F, rr, rf, in_ring, in_fresh, e0, HD: tl.constexpr, HDP: tl.constexpr):
    """Full-precision values (BLOCK_N, HDP) fp32: ring rows (offsets ``rr``) where ``in_ring``,
    this chunk's fresh rows (offsets ``rf``) where ``in_fresh``, zero elsewhere."""
    d = tl.arange(0, HDP)
    dm = (d < HD)[None, :]
    cols = (e0 + d)[None, :]
    x = tl.load(R + rr[:, None] + cols, mask=in_ring[:, None] & dm, other=0.0).to(tl.float32)
    x += tl.load(F + rf[:, None] + cols, mask=in_fresh[:, None] & dm, other=0.0).to(tl.float32)
    return x


@triton.jit
def prefill_kernel(
        Q0, sq0_b, sq0_h, sq0_t, Q1, sq1_b, sq1_h, sq1_t, Q2, sq2_b, sq2_h, sq2_t, c0, c1, c2,
        D0, S0, sd0_b, sd0_t, ss0_b, ss0_t, D1, S1, sd1_b, sd1_t, ss1_b, ss1_t,
        D2, S2, sd2_b, sd2_t, ss2_b, ss2_t, DV, SV, sdv_b, sdv_t, ssv_b, ssv_t,
        R0, sr0_b, sr0_t, R1, sr1_b, sr1_t, R2, sr2_b, sr2_t, RV, srv_b, srv_t,
        F0, sf0_b, sf0_t, F1, sf1_b, sf1_t, F2, sf2_b, sf2_t, FV, sfv_b, sfv_t,
        NK0, NK1, NK2, NV, OFF, LENS, OUT, so_b, so_h, so_t, CB, T, RING, TAIL,
        KV: tl.constexpr, G: tl.constexpr, NF: tl.constexpr, HAS_NULL: tl.constexpr, HAS_TAIL: tl.constexpr,
        FM0: tl.constexpr, HD0: tl.constexpr, HDP0: tl.constexpr, QK0: tl.constexpr, SONE0: tl.constexpr,
        EX0: tl.constexpr,
        FM1: tl.constexpr, HD1: tl.constexpr, HDP1: tl.constexpr, QK1: tl.constexpr, SONE1: tl.constexpr,
        EX1: tl.constexpr,
        FM2: tl.constexpr, HD2: tl.constexpr, HDP2: tl.constexpr, QK2: tl.constexpr, SONE2: tl.constexpr,
        EX2: tl.constexpr,
        FMV: tl.constexpr, HDV: tl.constexpr, HDPV: tl.constexpr, QKV: tl.constexpr, SONEV: tl.constexpr,
        EXV: tl.constexpr,
        ROWS: tl.constexpr, TM: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr, DOT_T: tl.constexpr,
        PREFETCH: tl.constexpr):
    """Grid (cdiv(T, TM), B * KV). Online softmax (log2 domain; c* = scale * log2 e) of the block's
    rows over keys 0 .. min(length, last position + 1) - 1 in two passes: keys every row sees as
    stored (no masks), then the last ``tail + TM`` or so (causal and length masks, per-row select
    between stored and exact scores / values)."""
    mb = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // KV
    kvh = pid % KV
    off = tl.load(OFF + b)
    length = tl.load(LENS + b)
    t0 = mb * TM
    r = tl.arange(0, ROWS)
    g = r // TM
    t = t0 + r % TM
    row_ok = (g < G) & (t < T)
    h = kvh * G + g
    pos = off + t                                                              # (ROWS,) query positions
    p0 = off + t0
    end = tl.where(t0 < length - off, tl.minimum(length, p0 + TM), 0)          # keys any row sees
    if HAS_TAIL:
        lo_exact = tl.maximum(p0 - TAIL + 1, 0)                                # no row reads older keys exactly
    else:
        lo_exact = p0
    a_end = (tl.maximum(tl.minimum(lo_exact, end), 0) // BLOCK_N) * BLOCK_N    # pass 1: [0, a_end)

    # queries times scale_f * log2(e) (rounded once to the dot dtype); the null token's score
    q0 = _q_tile(Q0, sq0_b, sq0_h, sq0_t, b, h, t, row_ok, HD0, HDP0) * c0
    if HAS_NULL:
        m_i = _null_score(q0, NK0, kvh, HD0, HDP0)
    q0 = _cast(q0, DOT_T)
    if NF > 1:
        q1 = _q_tile(Q1, sq1_b, sq1_h, sq1_t, b, h, t, row_ok, HD1, HDP1) * c1
        if HAS_NULL:
            m_i += _null_score(q1, NK1, kvh, HD1, HDP1)
        q1 = _cast(q1, DOT_T)
    if NF > 2:
        q2 = _q_tile(Q2, sq2_b, sq2_h, sq2_t, b, h, t, row_ok, HD2, HDP2) * c2
        if HAS_NULL:
            m_i += _null_score(q2, NK2, kvh, HD2, HDP2)
        q2 = _cast(q2, DOT_T)
    dv = tl.arange(0, HDPV)
    if HAS_NULL:  # the null token: one more key, always visible
        l_i = tl.full([ROWS], 1.0, tl.float32)
        nv = tl.load(NV + kvh * HDV + dv, mask=dv < HDV, other=0.0).to(tl.float32)
        acc = tl.zeros([ROWS, HDPV], tl.float32) + nv[None, :]
    else:
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HDPV], tl.float32)

    bb = b.to(tl.int64)
    D0 += bb * sd0_b
    S0 += bb * ss0_b
    D1 += bb * sd1_b
    S1 += bb * ss1_b
    D2 += bb * sd2_b
    S2 += bb * ss2_b
    DV += bb * sdv_b
    SV += bb * ssv_b
    R0 += bb * sr0_b
    R1 += bb * sr1_b
    R2 += bb * sr2_b
    RV += bb * srv_b
    F0 += bb * sf0_b
    F1 += bb * sf1_b
    F2 += bb * sf2_b
    FV += bb * sfv_b
    e0 = kvh * HD0
    e1 = kvh * HD1
    e2 = kvh * HD2
    ev = kvh * HDV

    for phase in tl.static_range(2):
        lo = a_end * phase
        hi = a_end + (end - a_end) * phase
        if phase == 0 and PREFETCH:  # pass 1 loads the next tile's bytes before using the current one
            jn = tl.maximum(tl.minimum(tl.arange(0, BLOCK_N), a_end - 1), 0)
            if WIDE:
                jn = jn.to(tl.int64)
            nk0, ns0 = _raw(D0, S0, jn * sd0_t, jn * ss0_t, e0, jn, FM0, HD0, HDP0, QK0, SONE0, False, BLOCK_N)
            if NF > 1:
                nk1, ns1 = _raw(D1, S1, jn * sd1_t, jn * ss1_t, e1, jn, FM1, HD1, HDP1, QK1, SONE1, False, BLOCK_N)
            if NF > 2:
                nk2, ns2 = _raw(D2, S2, jn * sd2_t, jn * ss2_t, e2, jn, FM2, HD2, HDP2, QK2, SONE2, False, BLOCK_N)
            nkv, nsv = _raw(DV, SV, jn * sdv_t, jn * ssv_t, ev, jn, FMV, HDV, HDPV, QKV, SONEV, False, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            j = n0 + tl.arange(0, BLOCK_N)
            ok = j < end
            if phase == 0 and PREFETCH:
                rk0, rs0 = nk0, ns0
                if NF > 1:
                    rk1, rs1 = nk1, ns1
                if NF > 2:
                    rk2, rs2 = nk2, ns2
                rkv, rsv = nkv, nsv
                jn = tl.minimum(j + BLOCK_N, a_end - 1)                        # the last one re-reads a row
                if WIDE:
                    jn = jn.to(tl.int64)
                nk0, ns0 = _raw(D0, S0, jn * sd0_t, jn * ss0_t, e0, ok, FM0, HD0, HDP0, QK0, SONE0, False, BLOCK_N)
                if NF > 1:
                    nk1, ns1 = _raw(D1, S1, jn * sd1_t, jn * ss1_t, e1, ok, FM1, HD1, HDP1, QK1, SONE1, False,
                                    BLOCK_N)
                if NF > 2:
                    nk2, ns2 = _raw(D2, S2, jn * sd2_t, jn * ss2_t, e2, ok, FM2, HD2, HDP2, QK2, SONE2, False,
                                    BLOCK_N)
                nkv, nsv = _raw(DV, SV, jn * sdv_t, jn * ssv_t, ev, ok, FMV, HDV, HDPV, QKV, SONEV, False, BLOCK_N)
            else:
                jr = j
                if WIDE:
                    jr = j.to(tl.int64)
                rk0, rs0 = _raw(D0, S0, jr * sd0_t, jr * ss0_t, e0, ok, FM0, HD0, HDP0, QK0, SONE0, phase == 1,
                                BLOCK_N)
                if NF > 1:
                    rk1, rs1 = _raw(D1, S1, jr * sd1_t, jr * ss1_t, e1, ok, FM1, HD1, HDP1, QK1, SONE1, phase == 1,
                                    BLOCK_N)
                if NF > 2:
                    rk2, rs2 = _raw(D2, S2, jr * sd2_t, jr * ss2_t, e2, ok, FM2, HD2, HDP2, QK2, SONE2, phase == 1,
                                    BLOCK_N)
                rkv, rsv = _raw(DV, SV, jr * sdv_t, jr * ssv_t, ev, ok, FMV, HDV, HDPV, QKV, SONEV, phase == 1,
                                BLOCK_N)
            if phase == 1 and HAS_TAIL:
                ex_ok = ok & (j >= lo_exact)                                   # some row reads j exactly
                in_fresh = ex_ok & (j >= off)
                in_ring = ex_ok & (j < off)
                jring = j % RING
                jfresh = j - off
                if WIDE:
                    jring = jring.to(tl.int64)
                    jfresh = jfresh.to(tl.int64)
            # scores (ROWS, BLOCK_N), log2 units: stored (s) and, in the tail, exact (s_ex)
            kt = tl.trans(_cast(_deq(rk0, rs0, e0, CB, FM0, HD0, HDP0, SONE0, BLOCK_N), DOT_T))
            s = _dot(q0, kt, DOT_T)
            if phase == 1 and HAS_TAIL:
                if EX0:
                    x = _exact(R0, F0, jring * sr0_t, jfresh * sf0_t, in_ring, in_fresh, e0, HD0, HDP0)
                    s_ex = _dot(q0, tl.trans(_cast(x, DOT_T)), DOT_T)
                else:
                    s_ex = s
            if NF > 1:
                kt = tl.trans(_cast(_deq(rk1, rs1, e1, CB, FM1, HD1, HDP1, SONE1, BLOCK_N), DOT_T))
                if phase == 1 and HAS_TAIL:
                    if EX1:
                        x = _exact(R1, F1, jring * sr1_t, jfresh * sf1_t, in_ring, in_fresh, e1, HD1, HDP1)
                        s_ex = _dot_acc(q1, tl.trans(_cast(x, DOT_T)), s_ex, DOT_T)
                    else:
                        s_ex = _dot_acc(q1, kt, s_ex, DOT_T)
                s = _dot_acc(q1, kt, s, DOT_T)
            if NF > 2:
                kt = tl.trans(_cast(_deq(rk2, rs2, e2, CB, FM2, HD2, HDP2, SONE2, BLOCK_N), DOT_T))
                if phase == 1 and HAS_TAIL:
                    if EX2:
                        x = _exact(R2, F2, jring * sr2_t, jfresh * sf2_t, in_ring, in_fresh, e2, HD2, HDP2)
                        s_ex = _dot_acc(q2, tl.trans(_cast(x, DOT_T)), s_ex, DOT_T)
                    else:
                        s_ex = _dot_acc(q2, kt, s_ex, DOT_T)
                s = _dot_acc(q2, kt, s, DOT_T)
            if phase == 1:
                if HAS_TAIL:
                    exm = j[None, :] > (pos - TAIL)[:, None]                   # read exactly by this row
                    s = tl.where(exm, s_ex, s)
                vis = (j[None, :] <= pos[:, None]) & (j < length)[None, :]
                s = tl.where(vis, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)          # rows that see nothing yet
            else:
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = m_new
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
            v = _cast(_deq(rkv, rsv, ev, CB, FMV, HDV, HDPV, SONEV, BLOCK_N), DOT_T)
            acc = acc * alpha[:, None]
            if phase == 1 and HAS_TAIL:
                if EXV:  # the softmax weights split between stored and exact values
                    x = _cast(_exact(RV, FV, jring * srv_t, jfresh * sfv_t, in_ring, in_fresh, ev, HDV, HDPV),
                              DOT_T)
                    acc = _dot_acc(_cast(tl.where(exm, 0.0, p), DOT_T), v, acc, DOT_T)
                    acc = _dot_acc(_cast(tl.where(exm, p, 0.0), DOT_T), x, acc, DOT_T)
                else:
                    acc = _dot_acc(_cast(p, DOT_T), v, acc, DOT_T)
            else:
                acc = _dot_acc(_cast(p, DOT_T), v, acc, DOT_T)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]                        # rows with no keys: 0
    ptr = OUT + bb * so_b + (h * so_h + t * so_t)[:, None] + dv[None, :]
    tl.store(ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (dv < HDV)[None, :])
