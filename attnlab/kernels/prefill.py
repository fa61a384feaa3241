"""Chunked-prefill attention over a (possibly quantized) cache: a flash-attention style Triton
kernel for T >= 1 new tokens per sequence (device code: ``prefill_jit``). Same numbers as
``reference.cached_attention_reference`` (the contract), in one launch.

* **Inputs.** Queries per key field q_f (B, H, T, d_f) (strided views are fine) for a chunk whose
  token t of sequence b sits at position offsets[b] + t; the chunk was already written to the
  store, so keys 0 .. lengths[b] - 1 are there (rows t >= lengths[b] - offsets[b] are padding:
  their outputs are finite and meaningless). Key j is visible to the query at p iff j <= p and
  j < lengths[b]; the optional null token (null_k[f] (KV, d_f), null_v (KV, d_v)) always.
  Scores sum_f scale_f * q_f . k_f, softmax, weighted sum of v -> (B, H, T, d_v), q's dtype.
* **Exact tail** (tail > 0): key/value j is read at full precision iff j > p - tail: this
  chunk's own rows from ``fresh_*`` (B, T, n) (j >= offsets[b]), older ones from the field's ring
  (B, R, n), slot j % R. A field whose stored values equal its exact ones (a float store in the
  ring's dtype) is read from the store alone.
* **Grid** (cdiv(T, TM), B * KV): one program holds the G query heads x TM tokens of one kv
  head as the ROWS = pow2(G) x TM rows of tensor-core products (``tl.dot`` in the query dtype,
  fp32 accumulation; fp32 queries: exact "ieee" products), so every key/value tile is loaded and
  dequantized once for all of them. Query blocks vary fastest: the programs reading one kv head
  run together and share its tiles in L2.
* **Two passes** per program: keys below the first position any row reads exactly (and below
  the block's first query) with no masks at all; then the remaining ~tail + TM keys with the
  causal/length masks and, per row, a select between stored and exact scores (and a split of
  the softmax weights between stored and exact values). The exact sources are only read there.
* **Planar layout** (``attnlab.quant.planar``): a head's codes are contiguous bytes, loaded as
  one tile per head (q4_0/nf4: one byte per pair of elements, split into nibbles and interleaved
  in registers); one scale per row when the head lies inside one block, else per element.
* Codes become floats with integer/bit operations (no quarter-rate int->float converts); the
  loads are software-pipelined by the compiler (``num_stages``); ``prefetch`` adds a manual
  register double buffer (slower on the H200).
* Lengths and offsets are read on the device: no host synchronisation (``max_length`` is not
  needed: the grid follows T).
* Measured on an H200 (benchmarks/results/prefill_attention.md, T=2048, batch 1): 128k context,
  standard bf16 32x64 6.98 ms (SDPA over the same bf16 cache 7.27 ms), DBA 8/32/40 with
  q4_0/q8_0/q4_0 11.7 ms (12.1 ms with an exact tail of 64); 32k: 1.94 / 2.05 / 3.15 ms.
* GPU status: every test passed compiled with fp32 queries; with fp16/bf16 queries the shapes
  in ``unsupported_reason`` passed and two GQA cases failed (see there); the dispatcher only
  sends verified shapes here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from attnlab.kernels.fields import FieldData, FieldSpec
from attnlab.kernels.prefill_jit import prefill_kernel
from attnlab.kernels.triton_compat import interpreter_compat
from attnlab.quant.nf4 import NF4_CODEBOOK

interpreter_compat()

LOG2E = 1.4426950408889634
FORMAT_CODES = {"fp32": 0, "fp16": 0, "bf16": 0, "q8_0": 1, "q4_0": 2, "nf4": 3}
BLOCK_SIZES = {"q8_0": 32, "q4_0": 32, "nf4": 64}
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_HEAD_DIM = 256
MAX_KEY_FIELDS = 3
MAX_GROUP = 128
PREFETCH = False  # the compiler pipelines the loads itself (async copies); see the benchmark sweep
_DOT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _lanes(head_dim: int) -> int:
    return max(16, _pow2(head_dim))  # tl.dot needs K >= 16


def _structural_reason(key_specs: Sequence[FieldSpec], value_spec: FieldSpec, q_dtype: torch.dtype,
                       num_heads: int, t_len: int) -> str | None:
    """What the kernel cannot compute at all."""
    if not 1 <= len(key_specs) <= MAX_KEY_FIELDS:
        return f"{len(key_specs)} key fields (the prefill kernel takes 1 to {MAX_KEY_FIELDS})"
    if q_dtype not in _DOT_DTYPES:
        return f"query dtype {q_dtype}"
    if t_len < 1:
        return f"T={t_len}"
    num_kv = value_spec.num_kv_heads
    for spec in [*key_specs, value_spec]:
        if spec.format not in FORMAT_CODES:
            return f"field {spec.name} has format {spec.format} (supported: {', '.join(FORMAT_CODES)})"
        if not 1 <= spec.head_dim <= MAX_HEAD_DIM:
            return f"field {spec.name} head dim {spec.head_dim} (the prefill kernel takes 1 to {MAX_HEAD_DIM})"
        if spec.num_kv_heads != num_kv:
            return f"field {spec.name} has {spec.num_kv_heads} kv heads, {value_spec.name} {num_kv}"
    if num_kv < 1 or num_heads % num_kv:
        return f"{num_heads} query heads over {num_kv} kv heads"
    widest = max(s.head_dim for s in [*key_specs, value_spec])
    if q_dtype != torch.float32 and widest > 128 and os.environ.get("TRITON_INTERPRET") != "1":
        # compiled on an H200 (Triton 3.6), fp16 queries with head dim 256 made an illegal memory
        # access that poisons the CUDA context; refused until the cause is found
        return f"head dim {widest} > 128 with {q_dtype} queries on the GPU"
    if num_heads // num_kv > MAX_GROUP:
        return f"GQA group {num_heads // num_kv} > {MAX_GROUP}"
    return None


def unsupported_reason(key_specs: Sequence[FieldSpec], value_spec: FieldSpec, *, q_dtype: torch.dtype,
                       num_heads: int, t_len: int) -> str | None:
    """Why the dispatcher should not send this call to the kernel (None when it can).
    Device-independent. Besides what the kernel cannot compute at all, fp16/bf16 queries are
    limited to the tensor-core shapes that matched the float64 reference when compiled on an
    H200 (Triton 3.6): key head dims <= 64, value head dims 33..64 (one 64-lane tile, the key
    block's width), and GQA groups > 1 only over fields stored in the queries' own dtype. Two
    other shapes failed there (GQA over block formats with an exact tail: key blocks of 16 / 32,
    value tiles of 64 / 128) and the rest was not run. ``prefill_attention`` itself still runs
    every shape (the tests do); fp32 queries passed everywhere."""
    reason = _structural_reason(key_specs, value_spec, q_dtype, num_heads, t_len)
    if reason is not None or q_dtype == torch.float32:
        return reason
    why = "with fp16/bf16 queries (not verified on the GPU: see prefill.unsupported_reason)"
    widest_key = max(s.head_dim for s in key_specs)
    if widest_key > 64:
        return f"key head dim {widest_key} > 64 {why}"
    if _lanes(value_spec.head_dim) != 64:
        return f"value head dim {value_spec.head_dim} outside 33..64 {why}"
    group = num_heads // value_spec.num_kv_heads
    lossy = [s.name for s in [*key_specs, value_spec] if FLOAT_DTYPES.get(s.format) != q_dtype]
    if group > 1 and lossy:
        return f"GQA group {group} over {'/'.join(lossy)} stored below {q_dtype} {why}"
    return None


def choose_config(group: int, t_len: int, head_dims: Sequence[int], *, q_dtype: torch.dtype,
                  block_formats: bool) -> tuple[int, int, int, int, int | None]:
    """(ROWS, BLOCK_N, num_warps, num_stages, maxnreg).

    fp16/bf16 queries (tensor cores), head dims <= 128: 128 rows x 64 keys, 8 warps, the shape
    the GPU tests and the SDPA check passed with, and what the H200 sweep found fastest
    (benchmarks/prefill_attention.py, T=2048 at 128k: standard bf16 3 stages 6.98 ms vs 11.45 ms
    with 2; DBA q4_0/q8_0/q4_0 a 128-register cap, i.e. 2 programs per SM, 11.7 ms vs 21.7 ms).
    Otherwise (fp32 queries, head dims 256) up to 128 rows of pow2(G) x TM (64 for head dims >
    128) and key blocks of 64 (32 for head dims > 64): tiles that fit registers and shared memory."""
    widest = max(_lanes(d) for d in head_dims)
    gp = _pow2(group)
    if q_dtype != torch.float32 and widest <= 128:
        if block_formats:
            return max(128, gp), 64, 8, 2, (128 if widest <= 64 else None)
        return max(128, gp), 64, 8, 3, None
    rows = max(gp, min(128 if widest <= 128 else 64, max(16, _pow2(gp * t_len))))
    block_n = 64 if widest <= 64 else 32
    warps = 8 if rows >= 128 or (rows >= 64 and widest > 64) else 4
    return rows, block_n, warps, 2, None


def _dot_dtype(q_dtype: torch.dtype) -> int:
    """Tensor-core operand dtype: the query's. The CPU interpreter has no bf16 arithmetic
    (NumPy), so there bf16 runs as fp32."""
    if q_dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    return _DOT_DTYPES[q_dtype]


_CODEBOOKS: dict[torch.device, torch.Tensor] = {}


def _codebook(device: torch.device) -> torch.Tensor:
    cb = _CODEBOOKS.get(device)
    if cb is None:
        cb = _CODEBOOKS[device] = torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)
    return cb


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _store_args(spec: FieldSpec, data: FieldData) -> tuple[list, torch.Tensor]:
    """(pointer/stride args, the tensor indexed by position) of a field's store."""
    if spec.format in BLOCK_SIZES:
        if data.codes is None or data.scales is None:
            raise ValueError(f"field {spec.name} ({spec.format}) needs codes and scales")
        codes = _rows_contiguous(data.codes)
        scales = _rows_contiguous(data.scales)
        return [codes, scales, codes.stride(0), codes.stride(1), scales.stride(0), scales.stride(1)], codes
    if data.data is None:
        raise ValueError(f"field {spec.name} ({spec.format}) needs data")
    d = _rows_contiguous(data.data)
    return [d, d, d.stride(0), d.stride(1), 0, 0], d


def _field_consts(spec: FieldSpec, exact: bool) -> list:
    fmt = spec.format
    qk = BLOCK_SIZES.get(fmt, 1)
    hd, kv = spec.head_dim, spec.num_kv_heads
    one_block = fmt in BLOCK_SIZES and all((h * hd) // qk == (h * hd + hd - 1) // qk for h in range(kv))
    return [FORMAT_CODES[fmt], hd, _lanes(hd), qk, one_block, exact]


def _exact_differs(spec: FieldSpec, data: FieldData) -> bool:
    """Whether this field's exact tail differs from its stored values."""
    if spec.format in BLOCK_SIZES:
        return True
    return data.ring is None or FLOAT_DTYPES[spec.format] != data.ring.dtype


def prefill_attention(q: Sequence[torch.Tensor], keys: Sequence[FieldData], value: FieldData,
                      key_specs: Sequence[FieldSpec], value_spec: FieldSpec, *, scales: Sequence[float],
                      offsets: torch.Tensor, lengths: torch.Tensor, max_length: int, tail: int,
                      fresh_keys: Sequence[torch.Tensor] | None = None, fresh_value: torch.Tensor | None = None,
                      null_k=None, null_v=None, block_m: int | None = None, block_n: int | None = None,
                      num_warps: int | None = None, num_stages: int | None = None,
                      prefetch: bool | None = None, maxnreg: int | None = None) -> torch.Tensor:
    """Attention of a chunk of T queries per sequence over its cache (see the module notes).
    ``block_m`` (rows per program), ``block_n``, ``num_warps``, ``num_stages``, ``prefetch``
    (load the next tile's bytes before using the current one), ``maxnreg`` (register cap per
    thread) override the heuristics (benchmark sweeps, tests). Returns (B, H, T, d_v) in q's dtype."""
    batch, num_heads, t_len, _ = q[0].shape
    reason = _structural_reason(key_specs, value_spec, q[0].dtype, num_heads, t_len)
    if reason is not None:
        raise ValueError(f"prefill kernel: {reason}")
    if len(q) != len(key_specs) or len(keys) != len(key_specs) or len(scales) != len(key_specs):
        raise ValueError(f"{len(key_specs)} key fields need as many queries, key tensors and scales")
    nf = len(key_specs)
    num_kv = value_spec.num_kv_heads
    group = num_heads // num_kv
    device = q[0].device
    specs = [*key_specs, value_spec]
    datas = [*keys, value]
    exact = [tail > 0 and _exact_differs(s, d) for s, d in zip(specs, datas)]
    has_tail = any(exact)
    fresh = [*(fresh_keys or [None] * nf), fresh_value]

    store_args, ring_args, fresh_args, consts, indexed = [], [], [], [], []
    ring_size = 1
    for f, (spec, data) in enumerate(zip(specs, datas)):
        args, stored = _store_args(spec, data)
        store_args.append(args)
        indexed.append(stored)
        consts.append(_field_consts(spec, exact[f]))
        if exact[f]:
            if data.ring is None or fresh[f] is None:
                raise ValueError(f"field {spec.name}: tail={tail} needs its ring and this chunk's fresh rows")
            ring, rows = _rows_contiguous(data.ring), _rows_contiguous(fresh[f])
            if ring_size > 1 and ring.shape[1] != ring_size:
                raise ValueError("every field's ring must have the same number of slots")
            ring_size = ring.shape[1]
            ring_args.append([ring, ring.stride(0), ring.stride(1)])
            fresh_args.append([rows, rows.stride(0), rows.stride(1)])
            indexed += [ring, rows]
        else:
            ring_args.append([stored, 0, 0])
            fresh_args.append([stored, 0, 0])
    if has_tail and tail > ring_size:
        raise ValueError(f"tail={tail} needs a ring of at least {tail} slots (got {ring_size})")

    qs = [_rows_contiguous(t) for t in q]
    q_args = []
    for t in qs:
        q_args += [t, t.stride(0), t.stride(1), t.stride(2)]
    c = [float(s) * LOG2E for s in scales]
    # unused key-field slots repeat field 0 (never read: NF is a constexpr)
    while len(q_args) < 4 * MAX_KEY_FIELDS:
        q_args += q_args[:4]
    c += [0.0] * (MAX_KEY_FIELDS - nf)
    for lst in (store_args, ring_args, fresh_args, consts):
        while len(lst) < MAX_KEY_FIELDS + 1:
            lst.insert(len(lst) - 1, lst[0])

    has_null = null_k is not None
    if has_null:
        nks = [t.contiguous() for t in null_k] + [null_k[0].contiguous()] * (MAX_KEY_FIELDS - nf)
        nv = null_v.contiguous()
    else:
        nks, nv = [qs[0]] * MAX_KEY_FIELDS, qs[0]
    off = offsets.to(device=device, dtype=torch.int32)
    lens = lengths.to(device=device, dtype=torch.int32)

    rows, bn, warps, stages, regs = choose_config(group, t_len, [s.head_dim for s in specs], q_dtype=q[0].dtype,
                                                  block_formats=any(s.format in BLOCK_SIZES for s in specs))
    if any(x is not None for x in (block_m, block_n, num_warps, num_stages)):
        regs = None  # an explicit configuration: no register cap unless asked for
    rows = block_m or rows
    bn = block_n or bn
    warps = num_warps or warps
    stages = num_stages or stages
    regs = maxnreg or regs
    gp = _pow2(group)
    assert rows >= 16 and rows % gp == 0 and rows & (rows - 1) == 0, f"block_m={rows} vs group {group}"
    tm = rows // gp
    wide = any(t.shape[1] * t.stride(1) >= 2**31 for t in indexed)  # int64 row offsets

    out = torch.empty(batch, num_heads, t_len, value_spec.head_dim, dtype=q[0].dtype, device=device)
    flat = lambda lists: [x for lst in lists for x in lst]  # noqa: E731
    grid = (math.ceil(t_len / tm), batch * num_kv)
    prefill_kernel[grid](
        *q_args, *c, *flat(store_args), *flat(ring_args), *flat(fresh_args), *nks, nv, off, lens,
        out, out.stride(0), out.stride(1), out.stride(2), _codebook(device), t_len, ring_size, tail,
        num_kv, group, nf, has_null, has_tail, *flat(consts), rows, tm, bn, wide, _dot_dtype(q[0].dtype),
        PREFETCH if prefetch is None else prefetch, num_warps=warps, num_stages=stages,
        **({} if regs is None else {"maxnreg": regs}))
    return out


__all__ = ["FieldData", "FieldSpec", "choose_config", "prefill_attention", "unsupported_reason"]
