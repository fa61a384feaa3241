"""Triton device code of the fused decode kernel (host side, descriptors and design: ``decode``).

A program serves ``HP`` adjacent kv heads (a *group*) of one sequence and one split: the rows
``R = HP x G`` are those heads' query heads, padded to ``R_PAD`` (>= 16, the tensor-core minimum).
Every field's slice of a cache row for the group is contiguous (elements ``g*GE .. g*GE+GE-1``)
and is read as *chunks* of 16 bytes (fewer for odd float rows): a tile (BLOCK_N, NC, CU) per
*piece* (a power-of-two number of chunks; a slice that is not a power of two takes two pieces).

Field descriptor ``F`` (constexpr tuple, built by ``decode.field_desc``):
    (FMT, HD, GE, CU, BB, GSTR, GBLK, CW, NP, C0_0, NC_0, NCV_0, C0_1, NC_1, NCV_1)
    FMT 0 float | 1 q8_0 | 2 q4_0 | 3 nf4; HD head dim; GE elements per group; CU = CW units
    (float: elements; codes: bytes, 16) per chunk; BB code bytes per block; GSTR units per group
    (row offset of group g = g * GSTR); GBLK blocks per group; CW values per chunk and plane
    (a 4-bit byte holds one value of each plane); NP pieces (1 or 2), each as first
    chunk, chunks (power of two) and valid chunks. (Flat: Triton 3.6 cannot index constexpr
    tuples nested three deep.)
4-bit formats give two *planes* per chunk (low / high nibbles: elements 2i and 2i + 1 of byte i).

Scores are block-diagonal tensor-core products: the queries of a piece plane are a (R_PAD, W)
tile that holds row r's query at the columns of its own kv head and zeros elsewhere, so heads
that straddle blocks or chunks, head dims that are not powers of two and padding need no other
masks; values are accumulated as (R_PAD, W) tiles of which only the diagonal blocks are stored.
Block scales are applied while decoding (codes -> fp16 x scale: packed PTX on the GPU).
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnlab.kernels.triton_common import cast as _cast
from attnlab.kernels.triton_common import dot as _dot

# -------------------------------------------------------------------------------------- decode


# The decoding asm is marked impure: Triton picks the tensor-core operand width (kWidth) from
# the pure chain back to the load, and would pick 4 for a chain from 8-bit loads (scalar
# shared-memory reads plus register moves); an impure op ends that chain (kWidth 2, ldmatrix).


@triton.jit
def _asm_q8_0(raw, s2):
    """int8 codes (uint8 tile, 4 per 32-bit register) x fp16 scales -> fp16: (q + 128) into the
    low byte of fp16 1024 (0x6400) by PRMT, minus 1152 (exact), HMUL2 by the scale."""
    return tl.inline_asm_elementwise(
        """{ .reg .b32 x, m;
        xor.b32 x, $2, 0x80808080;
        prmt.b32 $0, x, 0x64646464, 0x4140;
        prmt.b32 $1, x, 0x64646464, 0x4342;
        mov.b32 m, 0x64806480;
        sub.f16x2 $0, $0, m;
        sub.f16x2 $1, $1, m;
        mul.rn.f16x2 $0, $0, $3;
        mul.rn.f16x2 $1, $1, $4; }""",
        "=r,=r,r,r,r", [raw, s2], dtype=tl.float16, is_pure=False, pack=4)


@triton.jit
def _asm_q4_0(raw, s2):
    """Bytes of two 4-bit codes (4 bytes = 8 codes per 32-bit register) x fp16 scales -> (low
    nibbles, high nibbles) fp16: LOP3 into fp16 1024 + n (or 1024 + 16 n), one HSUB2/HFMA2 to
    n - 8 (exact), HMUL2 by the scale."""
    return tl.inline_asm_elementwise(
        """{ .reg .b32 t0, t1, m, a;
        prmt.b32 t0, $4, 0, 0x4140;
        prmt.b32 t1, $4, 0, 0x4342;
        lop3.b32 $0, t0, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 $1, t1, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 $2, t0, 0x00F000F0, 0x64006400, 0xEA;
        lop3.b32 $3, t1, 0x00F000F0, 0x64006400, 0xEA;
        mov.b32 m, 0x64086408;
        sub.f16x2 $0, $0, m;
        sub.f16x2 $1, $1, m;
        mov.b32 m, 0x2C002C00;
        mov.b32 a, 0xD480D480;
        fma.rn.f16x2 $2, $2, m, a;
        fma.rn.f16x2 $3, $3, m, a;
        mul.rn.f16x2 $0, $0, $5;
        mul.rn.f16x2 $1, $1, $6;
        mul.rn.f16x2 $2, $2, $5;
        mul.rn.f16x2 $3, $3, $6; }""",
        "=r,=r,=r,=r,r,r,r", [raw, s2], dtype=(tl.float16, tl.float16), is_pure=False, pack=4)


@triton.jit
def _decode(raw, sc, CB, FMT: tl.constexpr, CW: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr):
    """Raw (N, NC * CW) tile + block scales (N, NC) -> (lo, hi) value tiles (N, NC * CW) in the dot
    dtype (hi repeats lo for one-plane formats). Pure-Triton decoding is exact in fp32 (ints
    become floats as bits(0x4B000000 | u) - 2**23)."""
    if FMT == 0:
        lo = _cast(raw, DT)
        hi = lo
    else:
        n: tl.constexpr = raw.shape[0]
        nc: tl.constexpr = sc.shape[1]
        s2 = tl.reshape(tl.broadcast_to(sc[:, :, None], (n, nc, CW)), (n, nc * CW))  # scale per byte
        if USE_ASM and DT == 2 and FMT == 1:
            lo = _asm_q8_0(raw, s2)
            hi = lo
        elif USE_ASM and DT == 2 and FMT == 2:
            lo, hi = _asm_q4_0(raw, s2)
        else:
            u = raw.to(tl.int32)
            s = s2.to(tl.float32)
            if FMT == 1:   # int8 two's complement: 0x4B000080 ^ u = 2**23 + 128 + q
                lo = _cast(((u ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0) * s, DT)
                hi = lo
            elif FMT == 2:  # q4_0 nibble n encodes n - 8
                lo = _cast((((u & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0) * s, DT)
                hi = _cast((((u >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0) * s, DT)
            else:          # nf4 codebook levels x absmax
                lo = _cast(tl.load(CB + (u & 15)) * s, DT)
                hi = _cast(tl.load(CB + (u >> 4)) * s, DT)
    return lo, hi


# ------------------------------------------------------------------------------- tile indexing


@triton.jit
def _rows(start, last, RING, BLOCK_N: tl.constexpr, IS_RING: tl.constexpr, WIDE: tl.constexpr):
    row = tl.minimum(start + tl.arange(0, BLOCK_N), last)
    if IS_RING:
        row = row % RING
    if WIDE:
        row = row.to(tl.int64)
    return row


@triton.jit
def _load_piece(base, row, st, g, F: tl.constexpr, PI: tl.constexpr):
    """Raw (N, NC * CW) tile of one piece (16-byte vectors; rows are clamped to valid ones, chunks
    past the valid ones are masked to zeros)."""
    GSTR: tl.constexpr = F[5]
    CW: tl.constexpr = F[7]
    C0: tl.constexpr = F[9 + 3 * PI]
    NC: tl.constexpr = F[10 + 3 * PI]
    NCV: tl.constexpr = F[11 + 3 * PI]
    j = tl.arange(0, NC * CW)
    off = (row * st)[:, None] + (g * GSTR + C0 * CW + j)[None, :]
    if NC > NCV:
        raw = tl.load(base + off, mask=(j < NCV * CW)[None, :], other=0)
    else:
        raw = tl.load(base + off)
    return raw


@triton.jit
def _load_scales_piece(sbase, row, sst, g, F: tl.constexpr, PI: tl.constexpr):
    """Block scales (N, NC) of one piece's chunks (zeros for float fields and masked chunks)."""
    FMT: tl.constexpr = F[0]
    BB: tl.constexpr = F[4]
    GBLK: tl.constexpr = F[6]
    C0: tl.constexpr = F[9 + 3 * PI]
    NC: tl.constexpr = F[10 + 3 * PI]
    NCV: tl.constexpr = F[11 + 3 * PI]
    if FMT == 0:
        sc = tl.zeros([row.shape[0], NC], tl.float16)
    else:
        c = tl.arange(0, NC)
        blk = g * GBLK + ((C0 + c) * 16) // BB
        soff = (row * sst)[:, None] + blk[None, :]
        if NC > NCV:
            sc = tl.load(sbase + soff, mask=(c < NCV)[None, :], other=0.0)
        else:
            sc = tl.load(sbase + soff)
    return sc


@triton.jit
def _load_field(base, row, st, g, F: tl.constexpr):
    NP: tl.constexpr = F[8]
    out = ()
    for pi in tl.static_range(NP):
        out = out + (_load_piece(base, row, st, g, F, pi),)
    return out


@triton.jit
def _load_scales(sbase, row, sst, g, F: tl.constexpr):
    NP: tl.constexpr = F[8]
    out = ()
    for pi in tl.static_range(NP):
        out = out + (_load_scales_piece(sbase, row, sst, g, F, pi),)
    return out


@triton.jit
def _plane_index(r, F: tl.constexpr, PI: tl.constexpr, PLANE: tl.constexpr, G: tl.constexpr, R: tl.constexpr):
    """For rows r (R_PAD,) and the columns of a piece plane: the head dim of each column's element
    (W,) and whether it belongs to the row's kv head (R_PAD, W)."""
    FMT: tl.constexpr = F[0]
    HD: tl.constexpr = F[1]
    GE: tl.constexpr = F[2]
    C0: tl.constexpr = F[9 + 3 * PI]
    NC: tl.constexpr = F[10 + 3 * PI]
    NCV: tl.constexpr = F[11 + 3 * PI]
    CW: tl.constexpr = F[7]
    j = tl.arange(0, NC * CW)
    c = j // CW
    k = j % CW
    if FMT == 0 or FMT == 1:
        e = (C0 + c) * CW + k
    else:
        e = (C0 + c) * (2 * CW) + 2 * k + PLANE
    head = e // HD
    d = e - head * HD
    ok = ((c < NCV) & (e < GE))[None, :] & (head[None, :] == (r // G)[:, None]) & (r < R)[:, None]
    return d, ok


@triton.jit
def _load_q(Q, q_off, sq_h, r, F: tl.constexpr, PI: tl.constexpr, PLANE: tl.constexpr, G: tl.constexpr,
            R: tl.constexpr, DT: tl.constexpr):
    d, ok = _plane_index(r, F, PI, PLANE, G, R)
    q = tl.load(Q + q_off + r[:, None] * sq_h + d[None, :], mask=ok, other=0.0)
    return _cast(q, DT)


# ------------------------------------------------------------------------------------- segment

RESCALE_LOG2: tl.constexpr = tl.constexpr(8.0)


@triton.jit
def _field_queries(Q, q_off, sq_h, r, F: tl.constexpr, G: tl.constexpr, R: tl.constexpr, DT: tl.constexpr):
    """Block-diagonal queries of one key field: ((lo, hi) per piece), (R_PAD, W) each."""
    NP: tl.constexpr = F[8]
    TWO: tl.constexpr = F[0] >= 2
    out = ()
    for pi in tl.static_range(NP):
        q_lo = _load_q(Q, q_off, sq_h, r, F, pi, 0, G, R, DT)
        if TWO:
            q_hi = _load_q(Q, q_off, sq_h, r, F, pi, 1, G, R, DT)
        else:
            q_hi = q_lo
        out = out + ((q_lo, q_hi),)
    return out


@triton.jit
def _field_scores(qf, raws, scs, CB, F: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr,
                  R_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """(R_PAD, BLOCK_N) products of one key field's queries with a tile of its keys."""
    NP: tl.constexpr = F[8]
    FMT: tl.constexpr = F[0]
    sf = tl.zeros([R_PAD, BLOCK_N], tl.float32)
    for pi in tl.static_range(NP):
        lo, hi = _decode(raws[pi], scs[pi], CB, FMT, F[7], DT, USE_ASM)
        sf += _dot(qf[pi][0], tl.trans(lo), DT)
        if FMT >= 2:
            sf += _dot(qf[pi][1], tl.trans(hi), DT)
    return sf


@triton.jit
def _zeros_piece(F: tl.constexpr, PI: tl.constexpr, R_PAD: tl.constexpr):
    W: tl.constexpr = F[10 + 3 * PI] * F[7]
    return tl.zeros([R_PAD, W], tl.float32), tl.zeros([R_PAD, W], tl.float32)


@triton.jit
def _value_init(F: tl.constexpr, R_PAD: tl.constexpr):
    NP: tl.constexpr = F[8]
    acc = ()
    for pi in tl.static_range(NP):
        acc = acc + (_zeros_piece(F, pi, R_PAD),)
    return acc


@triton.jit
def _value_scale(acc, alpha, F: tl.constexpr):
    NP: tl.constexpr = F[8]
    out = ()
    for pi in tl.static_range(NP):
        out = out + ((acc[pi][0] * alpha[:, None], acc[pi][1] * alpha[:, None]),)
    return out


@triton.jit
def _value_update(acc, pv, raws, scs, CB, F: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr):
    NP: tl.constexpr = F[8]
    FMT: tl.constexpr = F[0]
    out = ()
    for pi in tl.static_range(NP):
        lo, hi = _decode(raws[pi], scs[pi], CB, FMT, F[7], DT, USE_ASM)
        a_lo = acc[pi][0] + _dot(pv, lo, DT)
        if FMT >= 2:
            a_hi = acc[pi][1] + _dot(pv, hi, DT)
        else:
            a_hi = acc[pi][1]
        out = out + ((a_lo, a_hi),)
    return out


@triton.jit
def _value_store(ACC, slot, acc, r, F: tl.constexpr, G: tl.constexpr, R: tl.constexpr, HDV: tl.constexpr):
    NP: tl.constexpr = F[8]
    FMT: tl.constexpr = F[0]
    for pi in tl.static_range(NP):
        d, ok = _plane_index(r, F, pi, 0, G, R)
        tl.store(ACC + slot[:, None] * HDV + d[None, :], acc[pi][0], mask=ok)
        if FMT >= 2:
            d, ok = _plane_index(r, F, pi, 1, G, R)
            tl.store(ACC + slot[:, None] * HDV + d[None, :], acc[pi][1], mask=ok)


@triton.jit
def _segment(s, b, g, start, end, RING, num_out, QS, SQB, SQH, SC, KB, KSB, KST, KSST,
             VB, VSB, vst, vsst, M, L, ACC, CB,
             KF: tl.constexpr, VF: tl.constexpr, DTK: tl.constexpr, DTV: tl.constexpr,
             H: tl.constexpr, G: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, HDV: tl.constexpr,
             BLOCK_N: tl.constexpr, IS_RING: tl.constexpr, WIDE: tl.constexpr, USE_ASM: tl.constexpr,
             STAGES: tl.constexpr):
    """(Constexpr tuple elements are re-wrapped with ``tl.constexpr`` where they are passed on:
    Triton 3.6 needs it.) Online softmax of the group's query rows over positions [start, end); writes the partial
    (max, sum, acc) of output slot ``s``. Key and value bases already point at sequence b. Loads
    are software-pipelined by Triton (``STAGES``: tiles in flight through shared memory)."""
    r = tl.arange(0, R_PAD)
    h0 = g * R
    last = tl.maximum(end - 1, 0)

    # block-diagonal queries per key field, piece and plane (loop invariant)
    qt = ()
    for f in tl.static_range(len(KF)):
        q_off = b.to(tl.int64) * SQB[f] + h0 * SQH[f]
        qt = qt + (_field_queries(QS[f], q_off, SQH[f], r, tl.constexpr(KF[f]), G, R, tl.constexpr(DTK[f])),)

    # block scales (2-byte loads, too small for the asynchronous copies) are prefetched a tile ahead
    row = _rows(start, last, RING, BLOCK_N, IS_RING, WIDE)
    ksc = ()
    for f in tl.static_range(len(KF)):
        ksc = ksc + (_load_scales(KSB[f], row, KSST[f], g, tl.constexpr(KF[f])),)
    vsc = _load_scales(VSB, row, vsst, g, VF)

    m_i = tl.full([R_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([R_PAD], tl.float32)
    acc = _value_init(VF, R_PAD)

    for t0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        tok_ok = t0 + tl.arange(0, BLOCK_N) < end
        row = _rows(t0, last, RING, BLOCK_N, IS_RING, WIDE)
        kraw = ()
        for f in tl.static_range(len(KF)):
            kraw = kraw + (_load_field(KB[f], row, KST[f], g, tl.constexpr(KF[f])),)
        vraw = _load_field(VB, row, vst, g, VF)
        row = _rows(t0 + BLOCK_N, last, RING, BLOCK_N, IS_RING, WIDE)
        nksc = ()
        for f in tl.static_range(len(KF)):
            nksc = nksc + (_load_scales(KSB[f], row, KSST[f], g, tl.constexpr(KF[f])),)
        nvsc = _load_scales(VSB, row, vsst, g, VF)

        scores = tl.zeros([R_PAD, BLOCK_N], tl.float32)
        for f in tl.static_range(len(KF)):
            scores += _field_scores(qt[f], kraw[f], ksc[f], CB, tl.constexpr(KF[f]), tl.constexpr(DTK[f]), USE_ASM,
                                    R_PAD, BLOCK_N) * SC[f]
        scores = tl.where(tok_ok[None, :], scores, float("-inf"))
        # lazy rescale: the running max moves (and acc, l are rescaled) only when a row's max
        # grows by more than 2**RESCALE_LOG2, so p <= 2**RESCALE_LOG2 (fine in fp16 and fp32)
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))                       # finite: a valid token
        if tl.max(m_new - m_i, axis=0) > RESCALE_LOG2:
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc = _value_scale(acc, alpha, VF)
            m_i = m_new
        p = tl.exp2(scores - m_i[:, None])
        l_i = l_i + tl.sum(p, axis=1)
        pv = _cast(p, DTV)
        acc = _value_update(acc, pv, vraw, vsc, CB, VF, DTV, USE_ASM)
        ksc = nksc
        vsc = nvsc

    slot = (b * H + h0 + r) * num_out + s                                      # (R_PAD,)
    tl.store(M + slot, m_i, mask=r < R)
    tl.store(L + slot, l_i, mask=r < R)
    _value_store(ACC, slot, acc, r, VF, G, R, HDV)


@triton.jit
def _offset(ptrs, b, strides):
    out = ()
    for i in tl.static_range(len(ptrs)):
        out = out + (ptrs[i] + b * strides[i],)
    return out


# ------------------------------------------------------------------------------------- kernels


@triton.jit
def split_kernel(QS, SQB, SQH, SC, KB, KSB, KSTB, KST, KSSTB, KSST, VB, VSB, vstb, vst, vsstb, vsst,
                 RKB, RKSTB, RKST, RVB, rvstb, rvst, RING, TAIL, LENS, QPOS, sqp_b,
                 M, L, ACC, CB, num_splits, num_out,
                 KF: tl.constexpr, VF: tl.constexpr, RKF: tl.constexpr, RVF: tl.constexpr,
                 DTK: tl.constexpr, DTV: tl.constexpr, RDTK: tl.constexpr, RDTV: tl.constexpr,
                 NG: tl.constexpr, H: tl.constexpr, G: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
                 HDV: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr,
                 USE_ASM: tl.constexpr, STAGES: tl.constexpr):
    """Grid (B * NG, num_splits [+ 1 for the exact tail]): partial results of one split for the
    HP kv heads of group g, kv group fastest. Split s covers an equal, BLOCK_N-aligned share of
    the stored positions of its sequence, computed from the device lengths."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    b = pid // NG
    g = pid % NG
    length = tl.load(LENS + b)
    qpos = tl.load(QPOS + b * sqp_b).to(tl.int32)
    visible = tl.minimum(length, qpos + 1)                                     # causal, T == 1
    if HAS_TAIL:  # exact iff j > qpos - TAIL and the ring still holds j (length - RING .. length - 1)
        tail_start = tl.maximum(tl.maximum(qpos + 1 - TAIL, length - RING), 0)
    else:
        tail_start = visible
    stored = tl.maximum(tl.minimum(visible, tail_start), 0)
    b64 = b.to(tl.int64)
    if s < num_splits:
        chunk = tl.cdiv(tl.cdiv(stored, num_splits), BLOCK_N) * BLOCK_N
        start = s * chunk
        end = tl.minimum(start + chunk, stored)
        _segment(s, b, g, start, end, 1, num_out, QS, SQB, SQH, SC,
                 _offset(KB, b64, KSTB), _offset(KSB, b64, KSSTB), KST, KSST,
                 VB + b64 * vstb, VSB + b64 * vsstb, vst, vsst, M, L, ACC, CB,
                 KF, VF, DTK, DTV, H, G, R, R_PAD, HDV, BLOCK_N, False, WIDE, USE_ASM, STAGES)
    if HAS_TAIL:
        if s == num_splits:  # the exact tail, from the ring (slot = position % RING)
            rkb = _offset(RKB, b64, RKSTB)
            _segment(s, b, g, tail_start, visible, RING, num_out, QS, SQB, SQH, SC,
                     rkb, rkb, RKST, RKST, RVB + b64 * rvstb, RVB + b64 * rvstb, rvst, rvst,
                     M, L, ACC, CB, RKF, RVF, RDTK, RDTV, H, G, R, R_PAD, HDV, BLOCK_N, True, WIDE, USE_ASM, 1)


@triton.jit
def reduce_kernel(M, L, ACC, OUT, so_b, so_h, num_out, QS, SQB, SQH, SC, NK, NV,
                  HDK: tl.constexpr, HDKP: tl.constexpr, H: tl.constexpr, G: tl.constexpr, HAS_NULL: tl.constexpr,
                  HDV: tl.constexpr, HDVP: tl.constexpr, SP: tl.constexpr):
    """Grid (B * H,): merge the partial (max, sum, acc) of every split and the null token (one
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
        ns = 0.0
        for f in tl.static_range(len(HDK)):
            d = tl.arange(0, tl.constexpr(HDKP[f]))
            hd = tl.constexpr(HDK[f])
            qf = tl.load(QS[f] + b * SQB[f] + h * SQH[f] + d, mask=d < hd, other=0.0).to(tl.float32)
            nk = tl.load(NK[f] + kvh * hd + d, mask=d < hd, other=0.0).to(tl.float32)
            ns += tl.sum(qf * nk, axis=0) * SC[f]
        mx = tl.maximum(mx, ns)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(m - mx_safe)
    acc = tl.load(ACC + (pid * num_out + s)[:, None] * HDV + dv[None, :],
                  mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
    num = tl.sum(w[:, None] * acc, axis=0)
    den = tl.sum(w * lsum, axis=0)
    if HAS_NULL:
        wn = tl.exp2(ns - mx_safe)
        num += wn * tl.load(NV + kvh * HDV + dv, mask=dv_ok, other=0.0).to(tl.float32)
        den += wn
    den = tl.where(den == 0.0, 1.0, den)                                       # nothing visible: 0
    tl.store(OUT + b * so_b + h * so_h + dv, (num / den).to(OUT.dtype.element_ty), mask=dv_ok)
