"""Fused flash-decoding over a ``LayerCache``: one new query token per sequence (T == 1).

Scores are ``sum_f scale_f * (q_f . k_f)`` over one or two key fields (``k`` | ``k_sem`` +
``k_geo``), then an online softmax and a weighted sum of ``v``; every field may have its own
storage format (fp32/fp16/bf16, q8_0, q4_0, nf4). Same contract as ``cached_attention_reference``
for T == 1. Device code: ``triton_decode_jit``; measurements: docs/benchmarks.md.

* **Grid** ``(B * KV, S [+ 1])``: axis 0 is the (sequence, kv head) pair with the kv head varying
  fastest, so programs that share quantized blocks (several small heads in one block) or DRAM
  sectors run at the same time; axis 1 is the split. One program serves the G query heads of its
  kv group, so every KV byte is read once. With an exact tail, program S of axis 1 walks the tail
  positions in the TailWindow ring (slot = pos % ring) with its own pointers and float layouts.
* **Split-K**: split s of sequence b covers an equal, BLOCK_N-aligned share of that sequence's
  stored positions (lengths are a device int32 tensor, read in the kernel) and writes (max, sum,
  unnormalized acc) in the log2 domain; ``reduce_kernel`` merges the splits and the null token
  and normalizes. ``choose_num_splits``: from batch x kv-head programs vs ``_WAVES`` x SM
  count and the longest length: bandwidth-bound shapes fill exactly one wave of resident
  programs, issue-bound ones (small heads, quantized) oversubscribe; >= ``_MIN_SPLIT_TOKENS``
  positions per split.
* **Quantized reads**: a head's elements ``[kvh*hd, (kvh+1)*hd)`` of a row lie in blocks
  ``blk0..blk1``; a program loads those whole blocks as a (BLOCK_N, NBH, QH) byte tile (2-byte
  vector loads: ggml blocks are only 2-byte aligned) plus one fp16 scale per (token, block).
  Queries are gathered into the same (block, lane) layout with zeros outside the head, so blocks
  shared with neighbours and head dims that are not powers of two need no masks on the cache
  loads. A head inside one block (half) (e.g. head dim 8 in q4_0) reads only its own bytes.
  Quants become floats without the int->float converter (``bits(0x4B000000 | u) - 2**23``). The
  block scale multiplies the per-block partial dot (keys) and the softmax weight (values). Float
  fields use the same tiles with "virtual blocks" (largest power of two dividing the head dim).
* **Inner loop**: the next tile's bytes are loaded before the current tile is used. G == 1: every
  token lane keeps its own online softmax (no cross-thread reduction inside the loop). G > 1:
  the tile is dequantized, flattened and multiplied on tensor cores (``tl.dot``, queries padded
  to 16 rows), fp32 accumulation; fp32 queries use exact fp32 ("ieee") products.
* Dequantized values are not rounded to the cache's compute dtype (the reference rounds them),
  so low-precision caches differ from the reference by that rounding (~1e-3).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from attnlab.kernels.triton_decode_jit import reduce_kernel, split_kernel
from attnlab.quant.nf4 import NF4_CODEBOOK

LOG2E = 1.4426950408889634
# Format codes of the kernel. "Sub-block" codes (4-6): every head lies inside one block (and one
# nibble half), so a program reads only its head's bytes of the block (e.g. head dim 8 in q4_0).
FMT_FLOAT, FMT_Q8_0, FMT_Q4_0, FMT_NF4, FMT_Q8_0_SUB, FMT_Q4_0_SUB, FMT_NF4_SUB = range(7)
_QUANT = {"q8_0": (FMT_Q8_0, 32, 34, 32), "q4_0": (FMT_Q4_0, 32, 18, 16), "nf4": (FMT_NF4, 64, 34, 32)}
FLOAT_FORMATS = ("fp32", "fp16", "bf16")
SUPPORTED_FORMATS = FLOAT_FORMATS + tuple(_QUANT)
MAX_HEAD_DIM = 256

_WAVES = 4                 # programs per SM the split heuristic aims for
_MIN_SPLIT_TOKENS = 256    # never split finer than this many positions
_MAX_SPLITS = 128
_TILE_ELEMENTS = 4096      # BLOCK_N * lanes of the widest field (G == 1 path)
POISON_BUFFERS = False     # tests: fill the partial-result buffers with NaN before each launch


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class FieldLayout:
    """How one field's head is tiled: (nbh_pad blocks) x (qh lanes) [x 2 nibble halves]."""

    fmt: int
    head_dim: int
    qk: int        # values per block (virtual block for float formats)
    bb: int        # bytes per block (0 for float formats)
    qh: int        # lanes per block and half
    nbh: int       # blocks one head spans at most (float: exactly)
    nbh_pad: int

    @property
    def lanes(self) -> int:
        return self.nbh_pad * self.qh * (2 if self.fmt in (FMT_Q4_0, FMT_NF4) else 1)

    @property
    def name(self) -> str:
        return ("float", "q8_0", "q4_0", "nf4", "q8_0/sub", "q4_0/sub", "nf4/sub")[self.fmt]

    def args(self) -> tuple:
        return self.fmt, self.head_dim, self.qk, self.bb, self.qh, self.nbh, self.nbh_pad


def field_layout(fmt: str, head_dim: int, num_kv: int) -> FieldLayout:
    if fmt in _QUANT:
        code, qk, bb, qh = _QUANT[fmt]
        unit = qk if code == FMT_Q8_0 else qk // 2  # one nibble half for 4-bit formats
        if head_dim < unit and head_dim & (head_dim - 1) == 0 and all(
                (kvh * head_dim) // unit == (kvh * head_dim + head_dim - 1) // unit for kvh in range(num_kv)):
            return FieldLayout(code + 3, head_dim, qk, bb, head_dim, 1, 1)
        nbh = max((kvh * head_dim + head_dim - 1) // qk - (kvh * head_dim) // qk + 1 for kvh in range(num_kv))
        return FieldLayout(code, head_dim, qk, bb, qh, nbh, _pow2(nbh))
    qk = min(head_dim & -head_dim, 64)  # largest power of two dividing head_dim
    nbh = head_dim // qk
    return FieldLayout(FMT_FLOAT, head_dim, qk, 0, qk, nbh, _pow2(nbh))


def choose_num_splits(batch: int, num_kv: int, max_len: int, num_sms: int, one_wave: bool = True) -> int:
    """Splits per (sequence, kv-head program), from programs P = batch x kv-head programs, the SM
    count and the longest stored length; at least ``_MIN_SPLIT_TOKENS`` positions per split, at
    most ``_MAX_SPLITS``.

    ``one_wave`` (bandwidth-bound shapes: float caches with head dims >= 64, tensor-core path):
    floor(_WAVES * SMs / P) splits, i.e. all programs resident at once (~128 registers/thread at
    4 warps: 4 programs per SM); ceil() there would start a nearly empty second wave (measured on
    an H200: standard bf16, batch 1, 128k: 17 splits 84% of copy bandwidth, 16 splits 104%).
    Otherwise (small heads, quantized fields: issue-bound, latency hidden by more programs):
    ceil(_WAVES * SMs / P) (DBA fp16, batch 8: 3 splits 76%, 2 splits 56%)."""
    if max_len <= 0:
        return 1
    programs = max(1, batch * num_kv)
    want = _WAVES * num_sms // programs if one_wave else -(-_WAVES * num_sms // programs)
    cap = max(1, max_len // _MIN_SPLIT_TOKENS)
    return max(1, min(want, cap, _MAX_SPLITS))


def use_tensor_cores(rows: int, layouts: list[FieldLayout]) -> bool:
    """More than one query row per program (GQA group x kv heads per program) and every field's
    flattened tile is at least 16 lanes (tl.dot's minimum)."""
    return rows > 1 and all(lay.lanes >= 16 for lay in layouts)


def choose_heads_per_program(group: int, num_kv: int, head_dims: list[int], formats: list[str]) -> int:
    """kv heads one program serves. 1, except for small quantized heads without GQA, where
    several heads per program turn the work into (block-diagonal) tensor-core products."""
    return 1


def choose_block_n(group: int, layouts: list[FieldLayout]) -> int:
    if use_tensor_cores(group, layouts):
        lanes = max(lay.lanes for lay in layouts)
        return 64 if lanes <= 128 else 32
    lanes = max(lay.lanes for lay in layouts)
    n = _TILE_ELEMENTS // lanes // (2 if group > 1 else 1)
    n = 1 << max(0, n.bit_length() - 1)
    return max(16, min(128, n))


def choose_num_warps(group: int, layouts: list[FieldLayout]) -> int:
    return 4


def _interpreter_compat() -> None:
    """Triton's CPU interpreter (TRITON_INTERPRET=1) holds scalars as 1-element arrays and turns
    them into loop bounds with ``int(array)``, which NumPy >= 2.4 refuses for ndim > 0. Patch
    that one conversion (only when interpreting; compiled kernels are untouched)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_attnlab_compat", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._attnlab_compat = True
    interpreter._patch_lang_tensor = patched


_interpreter_compat()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


_CODEBOOKS: dict[torch.device, torch.Tensor] = {}


def _codebook(device: torch.device) -> torch.Tensor:
    cb = _CODEBOOKS.get(device)
    if cb is None:
        cb = _CODEBOOKS[device] = torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)
    return cb


def _halves(data: torch.Tensor) -> torch.Tensor:
    """fp16 view of packed bytes (the block scales are read through it)."""
    return data.view(torch.float16) if data.dtype == torch.uint8 else data


def unsupported_reason(q, cache, *, null_k=None) -> str | None:
    """Why the kernel cannot serve this call (None when it can). Device-independent."""
    dims = cache.dims
    if q[0].shape[2] != 1:
        return f"T={q[0].shape[2]} (the kernel decodes one token per sequence)"
    if len(dims.key_fields) not in (1, 2) or len(q) != len(dims.key_fields):
        return f"{len(dims.key_fields)} key fields (the kernel takes 1 or 2)"
    for name, fmt in cache.formats.items():
        if fmt not in SUPPORTED_FORMATS:
            return f"field {name} has format {fmt} (supported: {', '.join(SUPPORTED_FORMATS)})"
    for name, hd in dims.cache_fields.items():
        if hd > MAX_HEAD_DIM:
            return f"field {name} head dim {hd} > {MAX_HEAD_DIM}"
    if any(t.dtype not in (torch.float16, torch.bfloat16, torch.float32) for t in q):
        return f"query dtype {q[0].dtype}"
    if cache.window is not None and next(iter(cache.window.rows.values())).dtype == torch.float64:
        return "float64 tail window"
    return None


_DOT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _dot_dtype(q_dtype: torch.dtype) -> int:
    """Tensor-core operand dtype: the query's (fp32 queries: exact fp32 products). The CPU
    interpreter has no bf16 arithmetic (NumPy), so there bf16 runs as fp32."""
    if q_dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    return _DOT_DTYPES[q_dtype]


def decode_attention(q, cache, scales, *, q_positions: torch.Tensor, key_lengths, null_k=None, null_v=None,
                     num_splits: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int = 1, heads_per_program: int | None = None,
                     max_length: int | None = None) -> torch.Tensor:
    """Fused decode attention, same contract as ``cached_attention_reference`` for T == 1.

    ``key_lengths``: list of ints, or a device int32 tensor (B,) with ``max_length`` given (the
    split heuristic needs it on the host; CUDA-graph capture needs the tensor). The other
    keywords override the heuristics (benchmark sweeps). Returns (B, H, 1, d_v) in the query
    dtype."""
    dims = cache.dims
    batch, num_heads, t_len, _ = q[0].shape
    assert t_len == 1, "decode_attention takes one query token per sequence"
    num_kv = dims.num_kv_heads
    group = num_heads // num_kv
    device = q[0].device
    names = [f.name for f in dims.key_fields]
    has_k1 = len(names) == 2
    if isinstance(key_lengths, torch.Tensor):
        lengths = key_lengths.to(device=device, dtype=torch.int32)
        max_len = int(max_length if max_length is not None else key_lengths.max())
    else:
        lengths = torch.tensor(key_lengths, dtype=torch.int32, device=device)
        max_len = max(key_lengths) if len(key_lengths) else 0

    real_dims = [dims.cache_fields[n] for n in names + ["v"]]
    hp = heads_per_program or choose_heads_per_program(group, num_kv, real_dims,
                                                       [cache.formats[n] for n in names + ["v"]])
    assert num_kv % hp == 0, f"heads_per_program={hp} must divide num_kv_heads={num_kv}"
    layouts = [field_layout(cache.formats[n], hp * hd, num_kv // hp) for n, hd in zip(names + ["v"], real_dims)]
    stores = [cache.stores[n].data for n in names + ["v"]]
    for t in stores:
        assert t.stride(2) == 1, "cache rows must be contiguous"
    window = cache.window if cache.tail > 0 else None
    has_tail = window is not None
    if has_tail:
        rings = [window.rows[n] for n in names + ["v"]]
        ring_size, tail = window.size, cache.tail
        stored_max = max(0, max_len - tail)
    else:
        rings = [stores[-1]] * len(stores)
        ring_size, tail, stored_max = 1, 0, max_len
    ring_layouts = [field_layout("fp32", hp * hd, num_kv // hp) for hd in real_dims]
    if not has_k1:  # the second key field's slots repeat the first (never read)
        real_dims.insert(1, real_dims[0])
        layouts.insert(1, layouts[0])
        stores.insert(1, stores[0])
        rings.insert(1, rings[0])
        ring_layouts.insert(1, ring_layouts[0])

    all_layouts = layouts + (ring_layouts if has_tail else [])
    rows = hp * group
    tensor_cores = use_tensor_cores(rows, all_layouts)
    assert hp == 1 or tensor_cores, "several kv heads per program need the tensor-core path"
    if block_n is None:
        block_n = choose_block_n(rows, all_layouts)
    if num_warps is None:
        num_warps = choose_num_warps(rows, all_layouts)
    if num_splits is None:
        bandwidth_bound = tensor_cores or all(lay.fmt == FMT_FLOAT and lay.head_dim >= 64 for lay in layouts)
        num_splits = choose_num_splits(batch, num_kv // hp, stored_max, _num_sms(device), one_wave=bandwidth_bound)
    num_out = num_splits + (1 if has_tail else 0)
    group_pad = max(16, _pow2(rows)) if tensor_cores else _pow2(group)
    # int32 row offsets unless one sequence's slab of a field reaches 2**31 elements
    wide = any(t.shape[1] * t.stride(1) >= 2**31 for t in stores + rings)

    qs = [t if t.stride(-1) == 1 else t.contiguous() for t in q]
    q0, q1 = qs[0], qs[-1]
    sc0 = float(scales[0]) * LOG2E
    sc1 = float(scales[-1]) * LOG2E if has_k1 else 0.0
    qpos = q_positions.to(device)
    m_buf = torch.empty(batch * num_heads * num_out, dtype=torch.float32, device=device)
    l_buf = torch.empty_like(m_buf)
    acc_buf = torch.empty(batch * num_heads * num_out * dims.v_head_dim, dtype=torch.float32, device=device)
    out = torch.empty(batch, num_heads, 1, dims.v_head_dim, dtype=q0.dtype, device=device)
    if POISON_BUFFERS:
        for t in (m_buf, l_buf, acc_buf, out):
            t.fill_(float("nan"))

    field_args = []
    for t in stores:
        field_args += [t, _halves(t), t.stride(0), t.stride(1)]
    ring_args = [rings[0], rings[1], rings[2]]
    for t in rings:
        ring_args += [t.stride(0), t.stride(1)]
    consts = [num_kv, group, group_pad, has_k1, has_tail, hp, *real_dims]
    for lay in layouts:
        consts += list(lay.args())
    for lay in ring_layouts:
        consts += [lay.qk, lay.nbh, lay.nbh_pad]
    split_kernel[(batch * num_kv // hp, num_out)](
        q0, q1, q0.stride(0), q0.stride(1), q1.stride(0), q1.stride(1), sc0, sc1,
        *field_args, *ring_args, ring_size, tail, lengths, qpos, qpos.stride(0),
        m_buf, l_buf, acc_buf, _codebook(device), num_splits, num_out,
        *consts, block_n, wide, tensor_cores, _dot_dtype(q0.dtype),
        num_warps=num_warps, num_stages=num_stages)

    has_null = null_k is not None
    nk0 = null_k[0].contiguous() if has_null else m_buf
    nk1 = null_k[-1].contiguous() if has_null else m_buf
    nv = null_v.contiguous() if has_null else m_buf
    hd0, hd1, hdv = real_dims
    reduce_kernel[(batch * num_heads,)](
        m_buf, l_buf, acc_buf, out, out.stride(0), out.stride(1), num_out,
        q0, q1, q0.stride(0), q0.stride(1), q1.stride(0), q1.stride(1), sc0, sc1, nk0, nk1, nv,
        num_heads, group, has_k1, has_null, hd0, _pow2(hd0), hd1, _pow2(hd1), hdv, _pow2(hdv),
        _pow2(num_out), num_warps=1 if hdv <= 64 else 2)
    return out


__all__ = ["FieldLayout", "choose_block_n", "choose_num_splits", "choose_num_warps", "decode_attention",
           "field_layout", "unsupported_reason", "use_tensor_cores"]
