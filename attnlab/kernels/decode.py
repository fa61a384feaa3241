"""Fused flash-decoding over the kernel-native (planar) cache layout, driven by field
descriptors, with a plan/run split (FlashInfer style). One query token per sequence (T == 1).

Scores are ``sum_f scale_f * (q_f . k_f)`` over any number of key fields, each with its own
format (fp32/fp16/bf16, q8_0, q4_0, nf4; ``attnlab.quant.planar`` layout), then an online
softmax and a weighted sum of ``v``; GQA groups, a null token and an exact tail (ring of the
newest positions at full precision) are supported. Same contract as
``attnlab.kernels.reference`` for T == 1. Device code and tile layout: ``decode_jit``.

* ``plan_decode`` computes everything once from static descriptions (``FieldSpec``): kv heads
  per program (a *group*: every field's slice of a row for the group is contiguous, whole
  blocks, read with 16-byte vectors), tile pieces, block size, warps, the number of splits for
  ``max_length`` and every scratch buffer (partials and the (B, H, 1, d_v) output).
* ``decode_attention`` launches two kernels on the plan: no host synchronisation, no allocation,
  nothing that depends on tensor values, so it can be captured in a CUDA graph and replayed with
  new device ``lengths``/``q_positions`` (the split of work is computed in the kernel).
* Grid ``(B * groups, splits [+ 1])``: split s covers an equal, BLOCK_N-aligned share of its
  sequence's stored positions; program ``splits`` walks the exact tail in the ring (slot =
  position % ring). ``reduce_kernel`` merges splits and the null token and normalizes.
* Products on tensor cores: block-diagonal queries (R_PAD >= 16 rows: the group's query heads)
  times decoded key tiles, probabilities times decoded value tiles, fp32 accumulation. Codes are
  decoded with their block scale into fp16 (packed PTX: 4 / 8 codes per 32-bit operation; a
  pure-Triton decoder under TRITON_INTERPRET=1); bf16/fp16 fields feed the products directly.
  fp32 queries (or fp32 fields) use exact fp32 products and decoding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from attnlab.kernels.fields import FieldData, FieldSpec
from attnlab.kernels.triton_compat import interpreter_compat
from attnlab.quant.nf4 import NF4_CODEBOOK

interpreter_compat()

LOG2E = 1.4426950408889634
FLOAT_FORMATS = ("fp32", "fp16", "bf16")
#: block format -> (kernel format code, values per block, code bytes per block, bits per code)
BLOCK_FORMATS = {"q8_0": (1, 32, 32, 8), "q4_0": (2, 32, 16, 4), "nf4": (3, 64, 32, 4)}
SUPPORTED_FORMATS = FLOAT_FORMATS + tuple(BLOCK_FORMATS)
MAX_HEAD_DIM = 512  # MLA's latent (kv_lora_rank 512)
_ESIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_WAVES = 4                 # programs per SM the split heuristic aims for (float fields)
_WAVES_QUANT = 2           # ... with block formats (more registers and shared memory per program)
_MIN_SPLIT_TOKENS = 256    # never split finer than this many positions
_MAX_SPLITS = 256
_TILE_BYTES = 16384        # BLOCK_N x bytes per token of a program, aimed for


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _floor_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def unsupported_reason(keys: Sequence[FieldSpec], value: FieldSpec, *, q_dtype: torch.dtype,
                       num_heads: int) -> str | None:
    """Why the kernel cannot serve these fields (None when it can). Device-independent."""
    if len(keys) < 1:
        return "no key field"
    if q_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"query dtype {q_dtype}"
    num_kv = value.num_kv_heads
    for f in list(keys) + [value]:
        if f.format not in SUPPORTED_FORMATS:
            return f"field {f.name} has format {f.format} (supported: {', '.join(SUPPORTED_FORMATS)})"
        if f.head_dim > MAX_HEAD_DIM or f.head_dim < 1:
            return f"field {f.name} head dim {f.head_dim} (1..{MAX_HEAD_DIM})"
        if f.num_kv_heads != num_kv:
            return f"field {f.name} has {f.num_kv_heads} kv heads, {value.name} {num_kv}"
    if num_heads % num_kv:
        return f"{num_heads} query heads are not a multiple of {num_kv} kv heads"
    return None


# ------------------------------------------------------------------------------------ layouts


def _aligned(spec: FieldSpec, hp: int) -> bool:
    """Group slices of ``hp`` heads are whole blocks (block formats) / whole vectors (floats)."""
    ge = hp * spec.head_dim
    if spec.format in BLOCK_FORMATS:
        return ge % BLOCK_FORMATS[spec.format][1] == 0
    return (ge * _ESIZE[spec.format]) % 16 == 0


def _slice_bytes(spec: FieldSpec, hp: int) -> float:
    if spec.format in BLOCK_FORMATS:
        return hp * spec.head_dim * BLOCK_FORMATS[spec.format][3] / 8
    return hp * spec.head_dim * _ESIZE[spec.format]


def choose_heads_per_program(fields: Sequence[FieldSpec], group: int) -> int:
    """kv heads per program, chosen from instruction counts (benchmarks/offline_compile.py) and
    the H200 tuning run: with block formats, the fewest whose slices of every field are whole
    blocks of at least 16 bytes and that give at least 8 query rows of the 16 a tensor-core tile
    has (fewer heads: smaller block-diagonal tiles, fewer registers; more: fewer padding rows);
    float fields only: the fewest whose slices are at least 64 bytes. Else the fewest aligned,
    else all heads."""
    num_kv = fields[0].num_kv_heads
    divisors = [d for d in range(1, num_kv + 1) if num_kv % d == 0]
    quantized = any(f.format in BLOCK_FORMATS for f in fields)
    min_bytes, rows = (16, 8) if quantized else (64, 1)
    ok = [d for d in divisors if all(_aligned(f, d) and _slice_bytes(f, d) >= min_bytes for f in fields)]
    for d in ok:
        if d * group >= min(rows, num_kv * group):
            return d
    if ok:
        return ok[-1]
    for d in divisors:
        if all(_aligned(f, d) for f in fields):
            return d
    return num_kv


def _pieces(nchunks: int, min_nc: int) -> tuple:
    """Chunks -> at most two power-of-two pieces (c0, NC, valid chunks); one padded piece where
    padding costs little (or the minimum width pads anyway)."""
    if _pow2(nchunks) <= max(min_nc, nchunks + nchunks // 4):
        return ((0, max(_pow2(nchunks), min_nc), nchunks),)
    p1 = _floor_pow2(nchunks)
    out = [(0, max(p1, min_nc), p1)]
    rest = nchunks - p1
    if rest:
        out.append((p1, max(_pow2(rest), min_nc), rest))
    return tuple(out)


def field_desc(fmt: str, head_dim: int, num_kv: int, hp: int, row_stride: int | None = None) -> tuple:
    """Kernel descriptor (FMT, HD, GE, CU, BB, GSTR, GBLK, CW, NP, pieces...) of a field stored in ``fmt``
    for groups of ``hp`` kv heads (see ``decode_jit``)."""
    ge = hp * head_dim
    n = num_kv * head_dim
    if fmt in BLOCK_FORMATS:
        code, qk, bb, bits = BLOCK_FORMATS[fmt]
        if hp == num_kv:
            nchunks = -(-n // qk) * bb // 16
            gstr, gblk = 0, 0
        else:
            assert ge % qk == 0
            nchunks = ge // qk * bb // 16
            gstr, gblk = ge * bits // 8, ge // qk
        return _desc(code, head_dim, ge, 16, bb, gstr, gblk, 16, pieces=_pieces(nchunks, 1))
    vec = 16 // _ESIZE[fmt]
    stride = n if row_stride is None else row_stride
    while ge % vec or n % vec or stride % vec:
        vec //= 2
    return _desc(0, head_dim, ge, vec, 1, ge, 0, vec, pieces=_pieces(ge // vec, max(1, 16 // vec)))


def _desc(*head, pieces) -> tuple:
    flat = [x for p in pieces for x in p] + [0, 1, 1] * (2 - len(pieces))
    return (*head, len(pieces), *flat)


def desc_pieces(desc: tuple) -> tuple:
    """((c0, chunks, valid chunks), ...) of a descriptor."""
    return tuple(tuple(desc[9 + 3 * i: 12 + 3 * i]) for i in range(desc[8]))


def choose_num_splits(programs: int, max_len: int, num_sms: int, waves: float = _WAVES) -> int:
    """Splits per (sequence, group) program: about ``waves`` programs per SM (as many as are
    resident at once: more start a partial second wave), at least ``_MIN_SPLIT_TOKENS``
    positions per split, at most ``_MAX_SPLITS``."""
    if max_len <= 0:
        return 1
    want = max(1, int(waves * num_sms) // max(1, programs))
    cap = max(1, max_len // _MIN_SPLIT_TOKENS)
    return max(1, min(want, cap, _MAX_SPLITS))


def choose_block_n(token_bytes: float) -> int:
    """Positions per tile: about ``_TILE_BYTES`` of cache per tile, 32..64 (larger tiles spill);
    128 for tiny slices (<= 160 bytes a position, e.g. GQA q4_0 with 2 kv heads a program)."""
    if token_bytes <= 160:
        return 128
    n = _floor_pow2(max(1, int(_TILE_BYTES // max(token_bytes, 1))))
    return max(32, min(64, n))


def choose_num_warps(fields: Sequence[FieldSpec], group: int) -> int:
    """4; 2 for 4-bit fields without GQA (DBA q4_0 / hetero on the H200: 29-35% vs 25-30% of the
    copy bandwidth with 4; the block-diagonal tiles are mostly padding, and two warps halve the
    synchronisation per tile), then with twice the programs per SM."""
    if group == 1 and any(f.format in ("q4_0", "nf4") for f in fields):
        return 2
    return 4


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _dot_code(fmt_dtype: torch.dtype | None, q_dtype: torch.dtype, quantized: bool) -> int:
    """Tensor-core operand dtype of a field: 0 fp32 (exact), 1 bf16, 2 fp16. The CPU interpreter
    has no bf16 arithmetic (NumPy): bf16 runs as fp32 there."""
    if q_dtype == torch.float32 or fmt_dtype == torch.float32:
        return 0
    if not quantized and fmt_dtype == torch.bfloat16:
        return 0 if _interpreting() else 1
    return 2


# --------------------------------------------------------------------------------------- plan


@dataclass
class DecodePlan:
    keys: tuple
    value: FieldSpec
    num_heads: int
    batch: int
    max_length: int
    tail: int
    ring_size: int
    has_null: bool
    q_dtype: torch.dtype
    device: torch.device
    heads_per_program: int
    num_groups: int
    group: int
    rows: int
    rows_pad: int
    block_n: int
    num_warps: int
    num_stages: int
    num_splits: int
    num_out: int
    key_descs: tuple
    value_desc: tuple
    ring_key_descs: tuple
    ring_value_desc: tuple
    dot_keys: tuple
    dot_value: int
    ring_dot_keys: tuple
    ring_dot_value: int
    use_asm: bool
    m: torch.Tensor
    l: torch.Tensor  # noqa: E741 (the softmax sums, as m/l/acc in flash attention)
    acc: torch.Tensor
    out: torch.Tensor
    codebook: torch.Tensor
    maxnreg: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def buffers(self) -> tuple[torch.Tensor, ...]:
        return self.m, self.l, self.acc, self.out

    def describe(self) -> str:
        def d(desc):
            return "/".join(f"{p[1]}x{desc[7]}" for p in desc_pieces(desc))
        return (f"hp={self.heads_per_program} rows={self.rows}/{self.rows_pad} bn={self.block_n} "
                f"w={self.num_warps} splits={self.num_splits} tiles=" +
                ",".join(d(x) for x in self.key_descs + (self.value_desc,)))


def plan_decode(keys: Sequence[FieldSpec], value: FieldSpec, *, num_heads: int, batch: int, max_length: int,
                tail: int, ring_size: int, has_null: bool, q_dtype: torch.dtype, device,
                ring_dtype: torch.dtype | None = None, heads_per_program: int | None = None,
                block_n: int | None = None, num_warps: int | None = None, num_splits: int | None = None,
                num_stages: int = 3, use_asm: bool | None = None, maxnreg: int | None = None,
                split_waves: float | None = None) -> DecodePlan:
    """Everything computed once for a decode step (see module doc). ``ring_dtype``: the exact
    tail ring's dtype (default: the query dtype). The other keywords override the heuristics."""
    keys = tuple(keys)
    reason = unsupported_reason(keys, value, q_dtype=q_dtype, num_heads=num_heads)
    if reason:
        raise ValueError(f"decode kernel: {reason}")
    device = torch.device(device)
    fields = list(keys) + [value]
    num_kv = value.num_kv_heads
    group = num_heads // num_kv
    hp = heads_per_program or choose_heads_per_program(fields, group)
    if num_kv % hp:
        raise ValueError(f"heads_per_program={hp} must divide num_kv_heads={num_kv}")
    if hp != num_kv and not all(_aligned(f, hp) or f.format in FLOAT_FORMATS for f in fields):
        raise ValueError(f"heads_per_program={hp}: group slices are not whole blocks")
    num_groups = num_kv // hp
    rows = hp * group
    rows_pad = max(16, _pow2(rows))
    has_tail = tail > 0
    ring_dtype = ring_dtype or q_dtype
    ring_fmt = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[ring_dtype]

    descs = [field_desc(f.format, f.head_dim, num_kv, hp) for f in fields]
    ring_descs = [field_desc(ring_fmt, f.head_dim, num_kv, hp) for f in fields]
    dots = [_dot_code(_DTYPES.get(f.format), q_dtype, f.format in BLOCK_FORMATS) for f in fields]
    ring_dots = [_dot_code(ring_dtype, q_dtype, False) for _ in fields]
    token_bytes = sum(_slice_bytes(f, hp) for f in fields)
    block_n = block_n or choose_block_n(token_bytes)
    num_warps = num_warps or choose_num_warps(fields, group)
    stored_max = max(0, max_length - tail) if has_tail else max_length
    if num_splits is None:
        if split_waves is None:
            floats = all(f.format in FLOAT_FORMATS for f in fields)
            split_waves = _WAVES if floats or num_warps <= 2 else _WAVES_QUANT
        num_splits = choose_num_splits(batch * num_groups, stored_max, _num_sms(device), split_waves)
    num_out = num_splits + (1 if has_tail else 0)
    if use_asm is None:
        use_asm = not _interpreting()
    m = torch.empty(batch * num_heads * num_out, dtype=torch.float32, device=device)
    l_buf = torch.empty_like(m)
    acc = torch.empty(batch * num_heads * num_out * value.head_dim, dtype=torch.float32, device=device)
    out = torch.empty(batch, num_heads, 1, value.head_dim, dtype=q_dtype, device=device)
    codebook = torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)
    return DecodePlan(keys, value, num_heads, batch, max_length, tail, ring_size if has_tail else 1, has_null,
                      q_dtype, device, hp, num_groups, group, rows, rows_pad, block_n, num_warps, num_stages,
                      num_splits, num_out, tuple(descs[:-1]), descs[-1], tuple(ring_descs[:-1]), ring_descs[-1],
                      tuple(dots[:-1]), dots[-1], tuple(ring_dots[:-1]), ring_dots[-1], bool(use_asm),
                      m, l_buf, acc, out, codebook, maxnreg)


# ----------------------------------------------------------------------------------------- run


def _storage(spec: FieldSpec, fd: FieldData) -> tuple[torch.Tensor, torch.Tensor, int, int, int, int]:
    """(base, scale base, stride b, stride t, scale stride b, scale stride t) of a field."""
    if spec.format in BLOCK_FORMATS:
        c, s = fd.codes, fd.scales
        assert c.dtype == torch.uint8 and c.stride(2) == 1 and s.stride(2) == 1, f"{spec.name}: planar codes/scales"
        return c, s, c.stride(0), c.stride(1), s.stride(0), s.stride(1)
    t = fd.data
    assert t.stride(2) == 1, f"{spec.name}: rows must be contiguous"
    return t, t, t.stride(0), t.stride(1), 0, 0


def _wide(t: torch.Tensor) -> bool:
    return t.shape[1] * t.stride(1) >= 2**31 or t.shape[0] * t.stride(0) >= 2**62


def decode_attention(plan: DecodePlan, q: Sequence[torch.Tensor], keys: Sequence[FieldData], value: FieldData, *,
                     scales: Sequence[float], lengths: torch.Tensor, q_positions: torch.Tensor,
                     null_k: Sequence[torch.Tensor] | None = None, null_v: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused decode attention on a plan: q per key field (B, H, 1, d_f); ``lengths`` (B,) int32
    (stored keys including the new token); ``q_positions`` (B,) or (B, 1). Returns ``out`` if
    given (shaped and typed like the plan's buffer), else the plan's (B, H, 1, d_v) output buffer
    (overwritten by the next call on the same plan)."""
    from attnlab.kernels.decode_jit import reduce_kernel, split_kernel

    specs = plan.keys + (plan.value,)
    datas = list(keys) + [value]
    assert len(q) == len(plan.keys) == len(keys) and len(scales) == len(plan.keys)
    stor = [_storage(s, d) for s, d in zip(specs, datas)]
    has_tail = plan.tail > 0
    if has_tail:
        rings = [d.ring for d in datas]
        for r in rings:
            assert r is not None and r.stride(2) == 1, "exact tail: every field needs its ring"
    else:
        rings = [s[0] for s in stor]
    wide = any(_wide(s[0]) for s in stor) or (has_tail and any(_wide(r) for r in rings))
    qs = tuple(t if t.stride(-1) == 1 else t.contiguous() for t in q)
    sqb = tuple(t.stride(0) for t in qs)
    sqh = tuple(t.stride(1) for t in qs)
    sc = tuple(float(s) * LOG2E for s in scales)
    kst = stor[:-1]
    vst = stor[-1]
    qpos = q_positions
    rk = rings[:-1]
    rv = rings[-1]
    split_kernel[(plan.batch * plan.num_groups, plan.num_out)](
        qs, sqb, sqh, sc,
        tuple(s[0] for s in kst), tuple(s[1] for s in kst), tuple(s[2] for s in kst), tuple(s[3] for s in kst),
        tuple(s[4] for s in kst), tuple(s[5] for s in kst),
        vst[0], vst[1], vst[2], vst[3], vst[4], vst[5],
        tuple(rk), tuple(r.stride(0) for r in rk), tuple(r.stride(1) for r in rk), rv, rv.stride(0), rv.stride(1),
        plan.ring_size, plan.tail, lengths, qpos, qpos.stride(0),
        plan.m, plan.l, plan.acc, plan.codebook, plan.num_splits, plan.num_out,
        plan.key_descs, plan.value_desc, plan.ring_key_descs, plan.ring_value_desc,
        plan.dot_keys, plan.dot_value, plan.ring_dot_keys, plan.ring_dot_value,
        plan.num_groups, plan.num_heads, plan.group, plan.rows, plan.rows_pad, plan.value.head_dim,
        has_tail, plan.block_n, wide, plan.use_asm, plan.num_stages,
        num_warps=plan.num_warps, **({"maxnreg": plan.maxnreg} if plan.maxnreg else {}))
    has_null = null_k is not None
    nk = tuple(t.contiguous() for t in null_k) if has_null else qs
    nv = null_v.contiguous() if has_null else plan.m
    hdv = plan.value.head_dim
    if out is None:
        out = plan.out
    else:
        assert out.shape == plan.out.shape and out.dtype == plan.out.dtype and out.stride() == plan.out.stride()
    reduce_kernel[(plan.batch * plan.num_heads,)](
        plan.m, plan.l, plan.acc, out, out.stride(0), out.stride(1), plan.num_out, qs, sqb, sqh, sc, nk, nv,
        tuple(s.head_dim for s in plan.keys), tuple(_pow2(s.head_dim) for s in plan.keys), plan.num_heads,
        plan.group, has_null, hdv, _pow2(hdv),
        _pow2(plan.num_out), num_warps=1 if hdv <= 64 else 2)
    return out


__all__ = ["BLOCK_FORMATS", "DecodePlan", "FieldData", "FieldSpec", "SUPPORTED_FORMATS", "choose_block_n",
           "choose_heads_per_program", "choose_num_splits", "choose_num_warps", "decode_attention", "desc_pieces",
           "field_desc", "plan_decode",
           "unsupported_reason"]
