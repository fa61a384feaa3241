"""Triton device code of the fused decode kernel (host side and design notes: ``triton_decode``).

Tiles. A field's head in one program is a (BLOCK_N, NBHP, QH) tile: NBHP blocks of the row (real
quantized blocks, or "virtual" blocks of a float field) times QH lanes; 4-bit formats give two
such tiles (low / high nibble halves). Format codes (``FMT``): 0 float, 1 q8_0, 2 q4_0, 3 nf4,
4-6 the same three when every head lies inside one block (half), read as a QH = head-dim slice.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------- tile loads


@triton.jit
def _head_blocks(e0, FMT: tl.constexpr, HD: tl.constexpr, QK: tl.constexpr, NBH: tl.constexpr):
    """First block, number of blocks, sub-block byte offset and nibble shift of the head whose
    elements start at row element ``e0``."""
    blk0 = e0 // QK
    sub = 0
    shift = 0
    if FMT == 0:
        nblk = NBH
    elif FMT >= 4:
        nblk = 1
        r = e0 % QK
        if FMT == 4:
            sub = r
        else:
            sub = r % (QK // 2)
            shift = (r // (QK // 2)) * 4
    else:
        nblk = (e0 + HD - 1) // QK - blk0 + 1
    return blk0, nblk, sub, shift


@triton.jit
def _load_raw(base, base_h, tok_off, blk0, nblk, sub,
              FMT: tl.constexpr, QK: tl.constexpr, BB: tl.constexpr, QH: tl.constexpr, NBHP: tl.constexpr):
    """Raw bytes (or float values) of blocks blk0 .. blk0 + nblk - 1 of the rows at ``tok_off``
    (BLOCK_N,): a (BLOCK_N, NBHP, QH) tile and the fp16 block scales (BLOCK_N, NBHP). Loads are
    unmasked: callers clamp rows to valid ones and padding blocks repeat the head's last block
    (their query lanes are zero and their value lanes are never stored)."""
    blk = tl.minimum(blk0 + tl.arange(0, NBHP), blk0 + nblk - 1)
    jj = tl.arange(0, QH)
    if FMT == 0:
        raw = tl.load(base + (tok_off[:, None, None] + (blk * QK)[None, :, None] + jj[None, None, :]))
        scale = tl.zeros([tok_off.shape[0], NBHP], tl.float16)
    else:
        boff = tok_off[:, None] + (blk * BB)[None, :]                          # (N, NBHP) block starts
        scale = tl.load(base_h + (boff >> 1))                                  # boff >= 0 and even
        if FMT >= 4:
            raw = tl.load(base + (boff[:, :, None] + 2 + sub + jj[None, None, :]))
        else:
            raw = tl.load(base + (boff[:, :, None] + 2 + jj[None, None, :]))
    return raw, scale


@triton.jit
def _decode(raw, shift, CB, FMT: tl.constexpr):
    """Raw tile -> (lo, hi) fp32 values before the block scale. Quants become floats without the
    int->float converter: bits(0x4B000000 | u) = 2**23 + u."""
    if FMT == 0:
        lo = raw.to(tl.float32)
        hi = lo
    else:
        u = raw.to(tl.int32)
        if FMT >= 5:
            u = u >> shift
        if FMT == 1 or FMT == 4:   # int8 two's complement: 0x4B000080 ^ u = 2**23 + 128 + q
            lo = (u ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
            hi = lo
        elif FMT == 5:             # q4_0 nibble n encodes n - 8
            lo = ((u & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            hi = lo
        elif FMT == 6:
            lo = tl.load(CB + (u & 15))
            hi = lo
        elif FMT == 2:
            lo = ((u & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            hi = ((u >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        else:                      # nf4 codebook levels
            lo = tl.load(CB + (u & 15))
            hi = tl.load(CB + (u >> 4))
    return lo, hi


@triton.jit
def _lane_to_dim(e0, FMT: tl.constexpr, QK: tl.constexpr, LANES: tl.constexpr):
    """Head dim of each lane of a flattened (NBHP * QK) tile (may be < 0 or >= head dim)."""
    lane = tl.arange(0, LANES)
    if FMT != 0 and FMT < 4:
        lane = lane - e0 % QK
    return lane


@triton.jit
def _to_2d(lo, hi, scale, FMT: tl.constexpr, LANES: tl.constexpr):
    """Scaled (N, NBHP, QH) halves -> (N, LANES) tile in element order."""
    n: tl.constexpr = lo.shape[0]
    if FMT == 0:
        out = tl.reshape(lo, (n, LANES))
    elif FMT == 2 or FMT == 3:
        s = scale.to(tl.float32)[:, :, None]
        both = tl.permute(tl.join(lo * s, hi * s), (0, 1, 3, 2))              # (N, NBHP, 2, QH)
        out = tl.reshape(both, (n, LANES))
    else:
        out = tl.reshape(lo * scale.to(tl.float32)[:, :, None], (n, LANES))
    return out


# -------------------------------------------------------------------------------- query loads


@triton.jit
def _load_q(Q, q_row, e0, scale, FMT: tl.constexpr, HD: tl.constexpr, QK: tl.constexpr,
            QH: tl.constexpr, NBHP: tl.constexpr, NBH: tl.constexpr):
    """One query head's field in the field's (NBHP, QH) layout (lo and hi nibble halves),
    times ``scale``; zero outside the head."""
    blk = tl.arange(0, NBHP)
    jj = tl.arange(0, QH)
    if FMT == 0 or FMT >= 4:
        d = (blk * QK)[:, None] + jj[None, :]                                  # (NBHP, QH)
        ok = (blk < NBH)[:, None] & (jj < QH)[None, :]
        d_hi = d
        ok_hi = ok
    else:
        d = ((e0 // QK + blk) * QK)[:, None] + jj[None, :] - e0
        ok = (d >= 0) & (d < HD)
        d_hi = d + QH
        ok_hi = (d_hi >= 0) & (d_hi < HD)
    q_lo = tl.load(Q + q_row + d, mask=ok, other=0.0).to(tl.float32) * scale
    if FMT == 2 or FMT == 3:
        q_hi = tl.load(Q + q_row + d_hi, mask=ok_hi, other=0.0).to(tl.float32) * scale
    else:
        q_hi = q_lo
    return q_lo, q_hi


@triton.jit
def _head_scores(q_lo, q_hi, lo, hi, sc, FMT: tl.constexpr):
    """One query head (NBHP, QH) . a (N, NBHP, QH) tile -> (N,) scores."""
    part = tl.sum(q_lo[None, :, :] * lo, axis=2)                              # (N, NBHP)
    if FMT == 2 or FMT == 3:
        part += tl.sum(q_hi[None, :, :] * hi, axis=2)
    if FMT != 0:
        part = part * sc.to(tl.float32)
    return tl.sum(part, axis=1)


@triton.jit
def _rows_lanes(r, e0, FMT: tl.constexpr, HD: tl.constexpr, QK: tl.constexpr, LANES: tl.constexpr,
                HR: tl.constexpr, G: tl.constexpr, R: tl.constexpr):
    """For query rows ``r`` (R_PAD,) of a program's HP kv heads and the lanes of a flattened tile
    (the HP heads' elements of the row): the element's dim within its head (R_PAD, LANES) and
    whether it belongs to the row's kv head (block-diagonal)."""
    d = _lane_to_dim(e0, FMT, QK, LANES)                                       # dim in the HP heads
    hk = r // G                                                                # row's kv head
    dd = d[None, :] - (hk * HR)[:, None]
    ok = (r < R)[:, None] & ((d >= 0) & (d < HD))[None, :] & (dd >= 0) & (dd < HR)
    return dd, ok


@triton.jit
def _load_q2d(Q, q_base, sq_h, h0, r, e0, FMT: tl.constexpr, HD: tl.constexpr, QK: tl.constexpr,
              LANES: tl.constexpr, HR: tl.constexpr, G: tl.constexpr, R: tl.constexpr, DOT_T: tl.constexpr):
    """Block-diagonal queries (R_PAD, LANES) for the tensor-core path: row r (query head h0 + r)
    holds its field over the lanes of its own kv head, zero elsewhere; unscaled, dot dtype."""
    dd, ok = _rows_lanes(r, e0, FMT, HD, QK, LANES, HR, G, R)
    q = tl.load(Q + q_base + (h0 + r)[:, None] * sq_h + dd, mask=ok, other=0.0)
    return _cast(q, DOT_T)


@triton.jit
def _cast(x, DOT_T: tl.constexpr):
    if DOT_T == 1:
        y = x.to(tl.bfloat16)
    elif DOT_T == 2:
        y = x.to(tl.float16)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _dot(a, b, DOT_T: tl.constexpr):
    if DOT_T == 0:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


# ------------------------------------------------------------------------------------ segment


@triton.jit
def _segment(s, b, kvh, start, end, RING, num_out,
             Q0, Q1, sq0_b, sq0_h, sq1_b, sq1_h, scale0, scale1,
             K0, K0H, sk0_b, sk0_t, K1, K1H, sk1_b, sk1_t, V, VH, sv_b, sv_t,
             M, L, ACC, CB,
             KV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, HAS_K1: tl.constexpr,
             HP: tl.constexpr, HR0: tl.constexpr, HR1: tl.constexpr, HRV: tl.constexpr,
             F0: tl.constexpr, HD0: tl.constexpr, QK0: tl.constexpr, BB0: tl.constexpr, QH0: tl.constexpr,
             NBH0: tl.constexpr, NBHP0: tl.constexpr,
             F1: tl.constexpr, HD1: tl.constexpr, QK1: tl.constexpr, BB1: tl.constexpr, QH1: tl.constexpr,
             NBH1: tl.constexpr, NBHP1: tl.constexpr,
             FV: tl.constexpr, HDV: tl.constexpr, QKV: tl.constexpr, BBV: tl.constexpr, QHV: tl.constexpr,
             NBHV: tl.constexpr, NBHPV: tl.constexpr,
             BLOCK_N: tl.constexpr, IS_RING: tl.constexpr, WIDE: tl.constexpr, DOT: tl.constexpr,
             DOT_T: tl.constexpr):
    """Online softmax of the query heads of kv heads kvh*HP .. kvh*HP + HP - 1 of sequence b
    over positions [start, end); writes the partial (max, sum, acc) of output slot ``s``. The
    fields' "head" here is those HP heads' elements (HD* = HP x HR*). ``IS_RING``: rows are ring
    slots pos % RING. The next tile's bytes are loaded before the current tile is used."""
    R: tl.constexpr = HP * G                                                   # query rows
    g = tl.arange(0, G_PAD)
    g_ok = g < R
    h0 = kvh * R
    e00 = kvh * HD0
    b00, n00, u00, sh00 = _head_blocks(e00, F0, HD0, QK0, NBH0)
    if HAS_K1:
        e01 = kvh * HD1
        b01, n01, u01, sh01 = _head_blocks(e01, F1, HD1, QK1, NBH1)
    e0v = kvh * HDV
    b0v, n0v, u0v, sh0v = _head_blocks(e0v, FV, HDV, QKV, NBHV)
    # lanes of a flattened head tile (4-bit formats: both nibble halves)
    LANES0: tl.constexpr = NBHP0 * QH0 * (1 + (F0 == 2) + (F0 == 3))
    LANES1: tl.constexpr = NBHP1 * QH1 * (1 + (F1 == 2) + (F1 == 3))
    LANESV: tl.constexpr = NBHPV * QHV * (1 + (FV == 2) + (FV == 3))

    K0 += b.to(tl.int64) * sk0_b
    K0H += b.to(tl.int64) * (sk0_b >> 1)
    V += b.to(tl.int64) * sv_b
    VH += b.to(tl.int64) * (sv_b >> 1)
    if HAS_K1:
        K1 += b.to(tl.int64) * sk1_b
        K1H += b.to(tl.int64) * (sk1_b >> 1)
    last = tl.maximum(end - 1, 0)

    # prologue: the first tile's bytes
    row = tl.minimum(start + tl.arange(0, BLOCK_N), last)
    if IS_RING:
        row = row % RING
    if WIDE:
        row = row.to(tl.int64)
    r0, c0 = _load_raw(K0, K0H, row * sk0_t, b00, n00, u00, F0, QK0, BB0, QH0, NBHP0)
    if HAS_K1:
        r1, c1 = _load_raw(K1, K1H, row * sk1_t, b01, n01, u01, F1, QK1, BB1, QH1, NBHP1)
    rv, cv = _load_raw(V, VH, row * sv_t, b0v, n0v, u0v, FV, QKV, BBV, QHV, NBHPV)

    if R == 1:
        # Every token lane n keeps an online softmax of its own, so the loop has no reduction
        # across tokens (no shared memory, no barriers); the lanes merge after the loop.
        q0_lo, q0_hi = _load_q(Q0, b * sq0_b + h0 * sq0_h, e00, scale0, F0, HD0, QK0, QH0, NBHP0, NBH0)
        if HAS_K1:
            q1_lo, q1_hi = _load_q(Q1, b * sq1_b + h0 * sq1_h, e01, scale1, F1, HD1, QK1, QH1, NBHP1, NBH1)
        m2 = tl.full([BLOCK_N], float("-inf"), tl.float32)
        l2 = tl.zeros([BLOCK_N], tl.float32)
        acc2_lo = tl.zeros([BLOCK_N, NBHPV, QHV], tl.float32)
        acc2_hi = tl.zeros([BLOCK_N, NBHPV, QHV], tl.float32)
    elif DOT:
        # tensor cores: (G_PAD, lanes) x (lanes, N) scores, (G_PAD, N) x (N, lanes) values
        q0 = _load_q2d(Q0, b * sq0_b, sq0_h, h0, g, e00, F0, HD0, QK0, LANES0, HR0, G, R, DOT_T)
        if HAS_K1:
            q1 = _load_q2d(Q1, b * sq1_b, sq1_h, h0, g, e01, F1, HD1, QK1, LANES1, HR1, G, R, DOT_T)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, LANESV], tl.float32)
    else:
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc_lo = tl.zeros([G_PAD, NBHPV, QHV], tl.float32)
        acc_hi = tl.zeros([G_PAD, NBHPV, QHV], tl.float32)

    for t0 in range(start, end, BLOCK_N):
        tok_ok = t0 + tl.arange(0, BLOCK_N) < end
        # issue the next tile's loads first (the last iteration re-reads the last row: harmless)
        row = tl.minimum(t0 + BLOCK_N + tl.arange(0, BLOCK_N), last)
        if IS_RING:
            row = row % RING
        if WIDE:
            row = row.to(tl.int64)
        nr0, nc0 = _load_raw(K0, K0H, row * sk0_t, b00, n00, u00, F0, QK0, BB0, QH0, NBHP0)
        if HAS_K1:
            nr1, nc1 = _load_raw(K1, K1H, row * sk1_t, b01, n01, u01, F1, QK1, BB1, QH1, NBHP1)
        nrv, ncv = _load_raw(V, VH, row * sv_t, b0v, n0v, u0v, FV, QKV, BBV, QHV, NBHPV)

        lo, hi = _decode(r0, sh00, CB, F0)
        if HAS_K1:
            lo1, hi1 = _decode(r1, sh01, CB, F1)
        vlo, vhi = _decode(rv, sh0v, CB, FV)
        if R == 1:
            sg = _head_scores(q0_lo, q0_hi, lo, hi, c0, F0)
            if HAS_K1:
                sg += _head_scores(q1_lo, q1_hi, lo1, hi1, c1, F1)
            sg = tl.where(tok_ok, sg, float("-inf"))                           # (N,), log2 units
            m_new = tl.maximum(m2, sg)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m2 - m_safe)
            p = tl.exp2(sg - m_safe)
            l2 = l2 * alpha + p
            m2 = m_new
            if FV == 0:
                w = p[:, None]
            else:
                w = p[:, None] * cv.to(tl.float32)                             # (N, NBHPV)
            acc2_lo = acc2_lo * alpha[:, None, None] + w[:, :, None] * vlo
            if FV == 2 or FV == 3:
                acc2_hi = acc2_hi * alpha[:, None, None] + w[:, :, None] * vhi
        elif DOT:
            k2d = _cast(_to_2d(lo, hi, c0, F0, LANES0), DOT_T)                 # (N, LANES0)
            scores = _dot(q0, tl.trans(k2d), DOT_T) * scale0                   # (G_PAD, N)
            if HAS_K1:
                k2d1 = _cast(_to_2d(lo1, hi1, c1, F1, LANES1), DOT_T)
                scores += _dot(q1, tl.trans(k2d1), DOT_T) * scale1
            scores = tl.where(tok_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))                    # finite: a valid token
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
            v2d = _cast(_to_2d(vlo, vhi, cv, FV, LANESV), DOT_T)               # (N, LANESV)
            acc = acc * alpha[:, None] + _dot(_cast(p, DOT_T), v2d, DOT_T)
        else:
            scores = tl.zeros([G_PAD, BLOCK_N], tl.float32)
            for gi in tl.static_range(G):
                ql, qh = _load_q(Q0, b * sq0_b + (h0 + gi) * sq0_h, e00, scale0, F0, HD0, QK0, QH0, NBHP0, NBH0)
                sg = _head_scores(ql, qh, lo, hi, c0, F0)
                if HAS_K1:
                    ql1, qh1 = _load_q(Q1, b * sq1_b + (h0 + gi) * sq1_h, e01, scale1, F1, HD1, QK1, QH1,
                                       NBHP1, NBH1)
                    sg += _head_scores(ql1, qh1, lo1, hi1, c1, F1)
                scores = tl.where(g[:, None] == gi, sg[None, :], scores)
            scores = tl.where(tok_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
            acc_lo = acc_lo * alpha[:, None, None]
            if FV == 2 or FV == 3:
                acc_hi = acc_hi * alpha[:, None, None]
            for gi in tl.static_range(G):
                pg = tl.sum(tl.where(g[:, None] == gi, p, 0.0), axis=0)       # (N,)
                if FV == 0:
                    w = pg[:, None]
                else:
                    w = pg[:, None] * cv.to(tl.float32)
                acc_lo = tl.where(g[:, None, None] == gi, acc_lo + tl.sum(w[:, :, None] * vlo, axis=0)[None, :, :],
                                  acc_lo)
                if FV == 2 or FV == 3:
                    acc_hi = tl.where(g[:, None, None] == gi,
                                      acc_hi + tl.sum(w[:, :, None] * vhi, axis=0)[None, :, :], acc_hi)
        r0, c0 = nr0, nc0
        if HAS_K1:
            r1, c1 = nr1, nc1
        rv, cv = nrv, ncv

    h = h0 + g
    slot = (b * KV * G + h) * num_out + s                                      # (G_PAD,)
    if R == 1:
        mx = tl.max(m2, axis=0)
        wl = tl.exp2(m2 - tl.where(mx == float("-inf"), 0.0, mx))              # (N,)
        m_i = tl.full([G_PAD], 0.0, tl.float32) + mx
        l_i = tl.full([G_PAD], 0.0, tl.float32) + tl.sum(l2 * wl, axis=0)
        acc_lo = tl.sum(acc2_lo * wl[:, None, None], axis=0)[None, :, :]      # (1, NBHPV, QHV)
        acc_hi = tl.sum(acc2_hi * wl[:, None, None], axis=0)[None, :, :]
    tl.store(M + slot, m_i, mask=g_ok)
    tl.store(L + slot, l_i, mask=g_ok)
    if R != 1 and DOT:
        dd, ok = _rows_lanes(g, e0v, FV, HDV, QKV, LANESV, HRV, G, R)
        tl.store(ACC + slot[:, None] * HRV + dd, acc, mask=ok)
    else:
        blk = tl.arange(0, NBHPV)
        jj = tl.arange(0, QHV)
        if FV == 0 or FV >= 4:
            d = (blk * QKV)[:, None] + jj[None, :]                             # (NBHPV, QHV)
        else:
            d = ((b0v + blk) * QKV)[:, None] + jj[None, :] - e0v
        ok = g_ok[:, None, None] & ((d >= 0) & (d < HDV) & (blk < n0v)[:, None])[None, :, :]
        out = ACC + slot[:, None, None] * HDV + d[None, :, :]
        tl.store(out, acc_lo, mask=ok)
        if FV == 2 or FV == 3:
            d_hi = d + QHV
            ok_hi = g_ok[:, None, None] & ((d_hi >= 0) & (d_hi < HDV) & (blk < n0v)[:, None])[None, :, :]
            tl.store(out + QHV, acc_hi, mask=ok_hi)


# ------------------------------------------------------------------------------------ kernels


@triton.jit
def split_kernel(Q0, Q1, sq0_b, sq0_h, sq1_b, sq1_h, scale0, scale1,
                 K0, K0H, sk0_b, sk0_t, K1, K1H, sk1_b, sk1_t, V, VH, sv_b, sv_t,
                 R0, R1, RV, sr0_b, sr0_t, sr1_b, sr1_t, srv_b, srv_t, RING, TAIL,
                 LENS, QPOS, sqp_b, M, L, ACC, CB, num_splits, num_out,
                 KV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, HAS_K1: tl.constexpr,
                 HAS_TAIL: tl.constexpr, HP: tl.constexpr, HR0: tl.constexpr, HR1: tl.constexpr,
                 HRV: tl.constexpr,
                 F0: tl.constexpr, HD0: tl.constexpr, QK0: tl.constexpr, BB0: tl.constexpr, QH0: tl.constexpr,
                 NBH0: tl.constexpr, NBHP0: tl.constexpr,
                 F1: tl.constexpr, HD1: tl.constexpr, QK1: tl.constexpr, BB1: tl.constexpr, QH1: tl.constexpr,
                 NBH1: tl.constexpr, NBHP1: tl.constexpr,
                 FV: tl.constexpr, HDV: tl.constexpr, QKV: tl.constexpr, BBV: tl.constexpr, QHV: tl.constexpr,
                 NBHV: tl.constexpr, NBHPV: tl.constexpr,
                 RQK0: tl.constexpr, RNBH0: tl.constexpr, RNBHP0: tl.constexpr,
                 RQK1: tl.constexpr, RNBH1: tl.constexpr, RNBHP1: tl.constexpr,
                 RQKV: tl.constexpr, RNBHV: tl.constexpr, RNBHPV: tl.constexpr,
                 BLOCK_N: tl.constexpr, WIDE: tl.constexpr, DOT: tl.constexpr, DOT_T: tl.constexpr):
    """Grid (B * KV / HP, num_splits [+ 1 for the exact tail]): partial results of one split
    for HP adjacent kv heads."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    b = pid // (KV // HP)
    kvh = pid % (KV // HP)
    length = tl.load(LENS + b)
    qpos = tl.load(QPOS + b * sqp_b).to(tl.int32)
    visible = tl.minimum(length, qpos + 1)                                     # causal, T == 1
    if HAS_TAIL:  # exact iff j > qpos - TAIL (the reference's per-query exact tail) and the
        # ring still holds j (it holds positions length - RING .. length - 1)
        tail_start = tl.maximum(tl.maximum(qpos + 1 - TAIL, length - RING), 0)
    else:
        tail_start = visible
    stored = tl.maximum(tl.minimum(visible, tail_start), 0)
    if s < num_splits:  # an equal, BLOCK_N-aligned share of the stored (possibly quantized) positions
        chunk = tl.cdiv(tl.cdiv(stored, num_splits), BLOCK_N) * BLOCK_N
        start = s * chunk
        end = tl.minimum(start + chunk, stored)
        _segment(s, b, kvh, start, end, 1, num_out,
                 Q0, Q1, sq0_b, sq0_h, sq1_b, sq1_h, scale0, scale1,
                 K0, K0H, sk0_b, sk0_t, K1, K1H, sk1_b, sk1_t, V, VH, sv_b, sv_t, M, L, ACC, CB,
                 KV, G, G_PAD, HAS_K1, HP, HR0, HR1, HRV,
                 F0, HD0, QK0, BB0, QH0, NBH0, NBHP0, F1, HD1, QK1, BB1, QH1, NBH1, NBHP1,
                 FV, HDV, QKV, BBV, QHV, NBHV, NBHPV, BLOCK_N, False, WIDE, DOT, DOT_T)
    if HAS_TAIL:
        if s == num_splits:  # the full-precision tail, from the ring
            _segment(s, b, kvh, tail_start, visible, RING, num_out,
                     Q0, Q1, sq0_b, sq0_h, sq1_b, sq1_h, scale0, scale1,
                     R0, R0, sr0_b, sr0_t, R1, R1, sr1_b, sr1_t, RV, RV, srv_b, srv_t, M, L, ACC, CB,
                     KV, G, G_PAD, HAS_K1, HP, HR0, HR1, HRV,
                     0, HD0, RQK0, 0, RQK0, RNBH0, RNBHP0, 0, HD1, RQK1, 0, RQK1, RNBH1, RNBHP1,
                     0, HDV, RQKV, 0, RQKV, RNBHV, RNBHPV, BLOCK_N, True, WIDE, DOT, DOT_T)


@triton.jit
def reduce_kernel(M, L, ACC, OUT, so_b, so_h, num_out,
                  Q0, Q1, sq0_b, sq0_h, sq1_b, sq1_h, scale0, scale1, NK0, NK1, NV,
                  H: tl.constexpr, G: tl.constexpr, HAS_K1: tl.constexpr, HAS_NULL: tl.constexpr,
                  HD0: tl.constexpr, HD0P: tl.constexpr, HD1: tl.constexpr, HD1P: tl.constexpr,
                  HDV: tl.constexpr, HDVP: tl.constexpr, SP: tl.constexpr):
    """Grid (B * H,): merge the partial (max, sum, acc) of every split and the null token (an
    extra key/value per kv head, scored like any key); normalize; store in the output dtype."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    kvh = h // G
    s = tl.arange(0, SP)
    s_ok = s < num_out
    m = tl.load(M + pid * num_out + s, mask=s_ok, other=float("-inf"))
    lsum = tl.load(L + pid * num_out + s, mask=s_ok, other=0.0)
    mx = tl.max(m, axis=0)
    dv = tl.arange(0, HDVP)
    dv_ok = dv < HDV
    if HAS_NULL:
        d0 = tl.arange(0, HD0P)
        q0 = tl.load(Q0 + b * sq0_b + h * sq0_h + d0, mask=d0 < HD0, other=0.0).to(tl.float32)
        nk0 = tl.load(NK0 + kvh * HD0 + d0, mask=d0 < HD0, other=0.0).to(tl.float32)
        ns = tl.sum(q0 * scale0 * nk0, axis=0)
        if HAS_K1:
            d1 = tl.arange(0, HD1P)
            q1 = tl.load(Q1 + b * sq1_b + h * sq1_h + d1, mask=d1 < HD1, other=0.0).to(tl.float32)
            nk1 = tl.load(NK1 + kvh * HD1 + d1, mask=d1 < HD1, other=0.0).to(tl.float32)
            ns += tl.sum(q1 * scale1 * nk1, axis=0)
        mx = tl.maximum(mx, ns)
    w = tl.exp2(m - mx)
    acc = tl.load(ACC + (pid * num_out + s)[:, None] * HDV + dv[None, :],
                  mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
    num = tl.sum(w[:, None] * acc, axis=0)
    den = tl.sum(w * lsum, axis=0)
    if HAS_NULL:
        wn = tl.exp2(ns - mx)
        num += wn * tl.load(NV + kvh * HDV + dv, mask=dv_ok, other=0.0).to(tl.float32)
        den += wn
    tl.store(OUT + b * so_b + h * so_h + dv, (num / den).to(OUT.dtype.element_ty), mask=dv_ok)
