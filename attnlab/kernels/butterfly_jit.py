"""Triton device code of the Butterfly decode kernel (host side: ``kernels.butterfly``).

Grid ``(B, KV)``: one program per sequence and kv head does the whole layer step for one new
token at position ``pos``:

1. **write**: the running block sums (``run[pos % HIST] = (pos % BS == 0 ? 0 : run[(pos - 1) %
   HIST]) + x`` for k and v, fp32), the block's summary row (``run / BS`` in the summary pool's
   format) and the window-ring row (slot ``pos % R``); kv head 0 also records the positions;
2. **attend**: the G query heads of this kv head against the ring (slot positions read from
   ``slot_pos``, the newest slot taken from the fresh row, so no program depends on another's
   writes) and up to three summary rows (sink 0, local qb - 1, partner, deduplicated, visible when
   the block ends before the window starts), one online softmax over ring tiles of ``BLOCK_R``
   plus the summary tile.

Formats (``FMT_*``): 0 fp32, 1 fp16, 2 bf16 (held as int16 bits: widened by a shift on load,
rounded to nearest even on store, as in ``cache_write_jit``). Products are fp32 "ieee" dots.
Partner rules (``RULE``): 0 causal_shift, 1 xor, 2 random, 3 local_only — the same integer
formulas as ``nn.attention.butterfly.partner_block``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnlab.kernels.cache_write_jit import _to_store


@triton.jit
def _load_f32(ptr, mask, FMT: tl.constexpr):
    x = tl.load(ptr, mask=mask, other=0)
    if FMT == 2:
        y = (x.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _partner(qb, RULE: tl.constexpr, STAGE: tl.constexpr):
    step = 1 << STAGE
    if RULE == 0:
        p = qb - step
    elif RULE == 1:
        p = qb ^ step
        p = tl.where(p > qb, -1, p)
    elif RULE == 2:
        mixed = (qb * 2654435761 + (STAGE + 1) * 2246822519) % 2147483647
        p = tl.where(qb > 0, mixed % tl.maximum(qb, 1), -1)
    else:
        p = qb * 0 - 1
    return tl.where(p >= 0, p, -1)


@triton.jit
def butterfly_decode_kernel(
        Q, s_qb, s_qh, KN, s_knb, s_knh, VN, s_vnb, s_vnh, POS,
        RING_K, RING_V, s_rb, s_rr, SLOT, s_slb,
        SUM_K, SUM_V, s_sb, s_sn, RUN_K, RUN_V, s_ub, s_uh, RUN_POS, s_upb,
        OUT, s_ob, s_oh, scale,
        D: tl.constexpr, G: tl.constexpr, R: tl.constexpr, HIST: tl.constexpr, BS: tl.constexpr,
        W: tl.constexpr, STAGE: tl.constexpr, RULE: tl.constexpr,
        FMT_Q: tl.constexpr, FMT_RING: tl.constexpr, FMT_SUM: tl.constexpr, FMT_OUT: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    pos = tl.load(POS + b).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    col = h * D + d  # this head's elements of a (KV * D) row

    # the new token's key and value for this head (exact, from the projections)
    knew = _load_f32(KN + b * s_knb + h * s_knh + d, dm, FMT_Q)
    vnew = _load_f32(VN + b * s_vnb + h * s_vnh + d, dm, FMT_Q)
    slot = pos % R

    # ---- 1. attend: the group's queries (reads nothing this step writes)
    g = tl.arange(0, BLOCK_G)
    gm = g < G
    qh = h * G + g
    q = _load_f32(Q + b * s_qb + qh[:, None] * s_qh + d[None, :], gm[:, None] & dm[None, :], FMT_Q) * scale

    # summaries: candidates sink 0, local qb - 1, partner (one key per block)
    qb = pos // BS
    c1 = qb - 1
    c2 = _partner(qb, RULE, STAGE)
    i = tl.arange(0, 16)
    c1 = i.to(tl.int64) * 0 + c1  # as vectors: the interpreter's `|` of a vector and a scalar is not a bool
    c2 = i.to(tl.int64) * 0 + c2
    cand = tl.where(i == 0, 0, tl.where(i == 1, c1, tl.where(i == 2, c2, -1)))
    ok = (i < 3) & (cand >= 0) & ((cand + 1) * BS <= pos - W + 1)
    ok = ok & ((i != 1) | (c1 != 0)) & ((i != 2) | ((c2 != 0) & (c2 != c1)))
    crow = tl.maximum(cand, 0)
    smask = ok[:, None] & dm[None, :]
    ks = _load_f32(SUM_K + b * s_sb + crow[:, None] * s_sn + col[None, :], smask, FMT_SUM)
    vs = _load_f32(SUM_V + b * s_sb + crow[:, None] * s_sn + col[None, :], smask, FMT_SUM)
    s = tl.dot(q, tl.trans(ks), input_precision="ieee")  # (BLOCK_G, 16)
    s = tl.where(ok[None, :], s, float("-inf"))
    m = tl.max(s, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp(s - m_safe[:, None])
    l_i = tl.sum(p, axis=1)
    acc = tl.dot(p, vs, input_precision="ieee")  # (BLOCK_G, BLOCK_D)

    # the window ring, tile by tile (online softmax)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rm = r < R
        sp = tl.load(SLOT + b * s_slb + r, mask=rm, other=-1)
        newest = r == slot
        sp = tl.where(newest, pos, sp)
        vis = rm & (sp >= 0) & (sp <= pos) & (sp > pos - W)
        rmask = vis[:, None] & dm[None, :]
        kr = _load_f32(RING_K + b * s_rb + r[:, None] * s_rr + col[None, :], rmask, FMT_RING)
        vr = _load_f32(RING_V + b * s_rb + r[:, None] * s_rr + col[None, :], rmask, FMT_RING)
        kr = tl.where(newest[:, None], knew[None, :], kr)
        vr = tl.where(newest[:, None], vnew[None, :], vr)
        s_r = tl.dot(q, tl.trans(kr), input_precision="ieee")
        s_r = tl.where(vis[None, :], s_r, float("-inf"))
        m_new = tl.maximum(m, tl.max(s_r, axis=1))
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_safe - m_new_safe)
        p_r = tl.exp(s_r - m_new_safe[:, None])
        l_i = l_i * alpha + tl.sum(p_r, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p_r, vr, input_precision="ieee")
        m = m_new
        m_safe = m_new_safe
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + b * s_ob + qh[:, None] * s_oh + d[None, :], _to_store(out, FMT_OUT),
             mask=gm[:, None] & dm[None, :])

    # ---- 2. write: running sums, summary row, ring row (after every reduction: the
    # interpreter restores triton.language after a call into another module's jit function)
    here = pos % HIST
    before = (pos + HIST - 1) % HIST
    fresh_block = (pos % BS) == 0
    prev_k = tl.load(RUN_K + b * s_ub + before * s_uh + col, mask=dm, other=0.0)
    prev_v = tl.load(RUN_V + b * s_ub + before * s_uh + col, mask=dm, other=0.0)
    tot_k = tl.where(fresh_block, knew, prev_k + knew)
    tot_v = tl.where(fresh_block, vnew, prev_v + vnew)
    tl.store(RUN_K + b * s_ub + here * s_uh + col, tot_k, mask=dm)
    tl.store(RUN_V + b * s_ub + here * s_uh + col, tot_v, mask=dm)
    row = pos // BS
    tl.store(SUM_K + b * s_sb + row * s_sn + col, _to_store(tot_k / BS, FMT_SUM), mask=dm)
    tl.store(SUM_V + b * s_sb + row * s_sn + col, _to_store(tot_v / BS, FMT_SUM), mask=dm)
    tl.store(RING_K + b * s_rb + slot * s_rr + col, _to_store(knew, FMT_RING), mask=dm)
    tl.store(RING_V + b * s_rb + slot * s_rr + col, _to_store(vnew, FMT_RING), mask=dm)
    if h == 0:
        tl.store(SLOT + b * s_slb + slot, pos)
        tl.store(RUN_POS + b * s_upb + here, pos)
