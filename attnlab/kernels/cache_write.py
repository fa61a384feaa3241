"""Fused quantize-on-write: one launch per layer stores every field of the new tokens (and their
exact-tail ring copies) in the kernel-native cache layout (``attnlab.quant.planar``).

Contract (``write_fields`` and its torch twin ``write_fields_reference``): ``rows[i]`` holds
field i of this forward's tokens, (B, T, n) or (B, T, heads, head_dim) with any strides (e.g.
``k.transpose(1, 2)`` of a (B, KV, T, hd) projection: no copy), any of fp32/fp16/bf16. Token t
of sequence b is position ``offsets[b] + t``; only tokens ``t < valid[b]`` are written. The
stored form (a round-to-nearest-even cast for fp32/fp16/bf16 fields; ``planar.quantize``'s
codes and scales, bit for bit, for q8_0/q4_0/nf4) goes to that position when ``0 <= position <
capacity`` (anything else is dropped, never out of bounds). With a ``ring`` (B, R, n) the
token's exact values (cast to the ring dtype) go to slot ``position % R`` whatever the capacity
(the ring is always in bounds), and ``ring_positions[b, slot] = position`` (shared by the
layer's fields, written once). When a chunk has more than R valid tokens only its newest R go
to the ring (the older ones would be overwritten), so no slot has two writers in a launch.
Offsets must be >= 0 for the ring.

Kernel (device code: ``cache_write_jit``). Grid (B * T, chunks): one program per token and
chunk of a field (CH row elements: whole quantization blocks, a power of two), every field of
the layer in the same launch (up to 4 per launch; more fields take ceil(F / 4) launches). A
program loads its chunk once through the rows' strides, writes the ring copy from the same
registers and quantizes per block: q8_0 ``d = amax / 127`` and ``1 / d`` as IEEE divisions
(``div_rn``), round half away as ``floor(a) + floor(2 (a - floor(a)))``; q4_0 the first signed
maximum magnitude, ``d = m / -8``, ``min(15, trunc(x * (1 / d) + 8.5))`` (launched with fp
fusion off: no fma); nf4 ``s = fp16(min(amax, 65504))`` and the count of fp32 midpoints below
``x * (1 / s)``. The fp16 scales round to nearest even. No host synchronisation, no allocation:
the launch can be captured in a CUDA graph (decode, T = 1) and serves prefill chunks alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from attnlab.quant import planar

FLOAT_FORMATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BLOCK_FORMATS = {"q8_0": 32, "q4_0": 32, "nf4": 64}          # values per block
SUPPORTED_FORMATS = tuple(FLOAT_FORMATS) + tuple(BLOCK_FORMATS)
_FMT_CODE = {"fp32": 0, "fp16": 1, "bf16": 2, "q8_0": 3, "q4_0": 4, "nf4": 5}
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_FIELDS = 4              # fields per launch
_SMALL_CHUNK = 256          # row elements per program when there are few tokens (decode)
_LARGE_CHUNK = 1024         # ... and for prefill chunks
_FEW_TOKENS = 64


@dataclass
class WriteTarget:
    """One field of one layer."""

    format: str                    # fp32|fp16|bf16|q8_0|q4_0|nf4
    data: Tensor | None = None     # float formats: (B, cap, n)
    codes: Tensor | None = None    # block formats: (B, cap, code_bytes) uint8
    scales: Tensor | None = None   # (B, cap, nblocks) fp16
    ring: Tensor | None = None     # exact tail ring (B, R, n) in the model dtype, or None

    @property
    def store(self) -> Tensor:
        return self.data if self.format in FLOAT_FORMATS else self.codes


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _row_view(x: Tensor) -> Tensor:
    """(B, T, n) or (B, T, heads, hd) -> (B, T, n) (a copy only for 4-d views that need one)."""
    return x.flatten(2) if x.ndim == 4 else x


def _row_length(x: Tensor) -> int:
    return x.shape[2] * x.shape[3] if x.ndim == 4 else x.shape[2]


def unsupported_reason(targets: Sequence[WriteTarget], rows: Sequence[Tensor] | None = None) -> str | None:
    """Why ``write_fields`` cannot serve these targets (None when it can); with ``rows``, also
    checks the rows' dtypes and shapes. Device-independent, except that CPU tensors need Triton's
    interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if not targets:
        return "no fields"
    ring_sizes = set()
    for i, tg in enumerate(targets):
        if tg.format not in SUPPORTED_FORMATS:
            return f"field {i} has format {tg.format} (supported: {', '.join(SUPPORTED_FORMATS)})"
        store = tg.store
        if store is None:
            return f"field {i} ({tg.format}) has no {'data' if tg.format in FLOAT_FORMATS else 'codes'}"
        if store.ndim != 3:
            return f"field {i} storage has shape {tuple(store.shape)} (expected (B, capacity, width))"
        if tg.format in FLOAT_FORMATS and store.dtype != FLOAT_FORMATS[tg.format]:
            return f"field {i}: {tg.format} data has dtype {store.dtype}"
        if tg.format in BLOCK_FORMATS:
            if store.dtype != torch.uint8 or tg.scales is None or tg.scales.dtype != torch.float16:
                return f"field {i}: {tg.format} needs uint8 codes and fp16 scales"
            if tg.scales.shape[:2] != store.shape[:2]:
                return f"field {i}: codes {tuple(store.shape)} and scales {tuple(tg.scales.shape)} disagree"
        if tg.ring is not None:
            if tg.ring.dtype not in _DTYPE_CODE:
                return f"field {i}: ring dtype {tg.ring.dtype} (fp32/fp16/bf16 only)"
            ring_sizes.add(tg.ring.shape[1])
        tensors = [t for t in (store, tg.scales, tg.ring) if t is not None]
        if any(t.device.type != "cuda" for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
            return "tensors not on CUDA (set TRITON_INTERPRET=1 for Triton's CPU interpreter)"
    if len(ring_sizes) > 1:
        return f"rings of different sizes {sorted(ring_sizes)}"
    if rows is not None:
        if len(rows) != len(targets):
            return f"{len(rows)} row tensors for {len(targets)} fields"
        for i, (tg, x) in enumerate(zip(targets, rows)):
            if x.dtype not in _DTYPE_CODE:
                return f"field {i}: rows of dtype {x.dtype} (fp32/fp16/bf16 only)"
            if x.ndim not in (3, 4):
                return f"field {i}: rows of shape {tuple(x.shape)} (expected (B, T, n) or (B, T, heads, hd))"
    return None


def _check(targets, rows, offsets, valid, ring_positions) -> None:
    """Shape validation (host metadata only: no synchronisation). ValueError on a mismatch."""
    if len(rows) != len(targets):
        raise ValueError(f"{len(rows)} row tensors for {len(targets)} fields")
    if not rows:
        return
    batch, t_len = rows[0].shape[:2]
    if offsets.shape != (batch,) or valid.shape != (batch,):
        raise ValueError(f"offsets {tuple(offsets.shape)} and valid {tuple(valid.shape)} must be ({batch},)")
    for i, (tg, x) in enumerate(zip(targets, rows)):
        if x.ndim not in (3, 4) or x.shape[:2] != (batch, t_len):
            raise ValueError(f"field {i}: rows of shape {tuple(x.shape)}, expected ({batch}, {t_len}, n) "
                             f"or ({batch}, {t_len}, heads, hd)")
        n = _row_length(x)
        store = tg.store
        if tg.format in FLOAT_FORMATS:
            width = (n,)
        else:
            code_bytes, nb = planar.planar_widths(tg.format, n)
            width = (code_bytes,)
            if tg.scales is None or tuple(tg.scales.shape) != (batch, store.shape[1], nb):
                raise ValueError(f"field {i} ({tg.format}): scales must be ({batch}, {store.shape[1]}, {nb})")
        if store is None or store.shape[0] != batch or tuple(store.shape[2:]) != width:
            raise ValueError(f"field {i} ({tg.format}): storage {None if store is None else tuple(store.shape)} "
                             f"does not hold rows of {n} values for batch {batch}")
        if tg.ring is not None:
            if tg.ring.shape[0] != batch or tg.ring.shape[2] != n:
                raise ValueError(f"field {i}: ring {tuple(tg.ring.shape)} does not hold rows of {n} values")
            if ring_positions is not None and tuple(ring_positions.shape) != (batch, tg.ring.shape[1]):
                raise ValueError(f"ring_positions {tuple(ring_positions.shape)}, expected ({batch}, "
                                 f"{tg.ring.shape[1]})")


# ----------------------------------------------------------------------------------- reference
def write_fields_reference(targets: Sequence[WriteTarget], rows: Sequence[Tensor], offsets: Tensor,
                           valid: Tensor, *, ring_positions: Tensor | None = None) -> None:
    """The torch path (any device; reads offsets/valid on the host): same contract as
    ``write_fields``, values from ``planar.quantize`` / ``Tensor.to``."""
    _check(targets, rows, offsets, valid, ring_positions)
    if not rows:
        return
    offs, vals = offsets.tolist(), valid.tolist()
    positions_done = False
    for tg, x in zip(targets, rows):
        x = _row_view(x)                                                   # (B, T, n)
        batch, t_len, _ = x.shape
        store = tg.store
        cap = store.shape[1]
        for b in range(batch):
            n_valid, off = max(0, min(int(vals[b]), t_len)), int(offs[b])
            lo, hi = max(0, -off), min(n_valid, cap - off)                 # tokens with 0 <= position < cap
            if hi > lo:
                chunk = x[b, lo:hi]
                if tg.format in FLOAT_FORMATS:
                    tg.data[b, off + lo: off + hi] = chunk.to(tg.data.dtype)
                else:
                    codes, scales = planar.quantize(chunk, tg.format)
                    tg.codes[b, off + lo: off + hi] = codes
                    tg.scales[b, off + lo: off + hi] = scales
            if tg.ring is not None and n_valid > 0:
                size = tg.ring.shape[1]
                first = max(0, n_valid - size)                             # the newest R survive
                positions = torch.arange(off + first, off + n_valid, device=tg.ring.device)
                slots = positions % size
                tg.ring[b, slots] = x[b, first:n_valid].to(tg.ring.dtype)
                if ring_positions is not None and not positions_done:
                    ring_positions[b, slots.to(ring_positions.device)] = positions.to(ring_positions)
        positions_done |= tg.ring is not None


# ---------------------------------------------------------------------------------------- kernel
def _chunk(fmt: str, n: int, tokens: int) -> int:
    """Row elements per program: a power of two of whole blocks, at most the padded row."""
    qk = BLOCK_FORMATS.get(fmt, 1)
    padded = _pow2(-(-n // qk) * qk)
    target = _SMALL_CHUNK if tokens <= _FEW_TOKENS else _LARGE_CHUNK
    return max(qk, min(padded, target))


def _rows_args(x: Tensor) -> tuple[list, int, bool]:
    """Pointer and (b, t, head, dim) strides of (B, T, n) or (B, T, heads, hd) rows; head dim."""
    is_bf16 = x.dtype == torch.bfloat16
    ptr = x.view(torch.int16) if is_bf16 else x
    if x.ndim == 4:
        return [ptr, x.stride(0), x.stride(1), x.stride(2), x.stride(3)], x.shape[3], is_bf16
    return [ptr, x.stride(0), x.stride(1), 0, x.stride(2)], x.shape[2], is_bf16


def write_fields(targets: Sequence[WriteTarget], rows: Sequence[Tensor], offsets: Tensor, valid: Tensor, *,
                 ring_positions: Tensor | None = None, num_warps: int | None = None) -> None:
    """Fused write of every field (see the module docstring): one Triton launch per 4 fields.
    ``offsets``, ``valid``: (B,) int32/int64 on the device; ``ring_positions`` (B, R) int64."""
    _check(targets, rows, offsets, valid, ring_positions)
    if not rows:
        return
    from attnlab.kernels.cache_write_jit import cache_write_kernel

    batch, t_len = rows[0].shape[:2]
    if batch * t_len == 0:
        return
    ring_size = next((tg.ring.shape[1] for tg in targets if tg.ring is not None), 1)
    positions_done = ring_positions is None
    for g in range(0, len(targets), MAX_FIELDS):
        group = list(zip(targets[g: g + MAX_FIELDS], rows[g: g + MAX_FIELDS]))
        args: list = []
        consts: list = []
        start, max_chunk, any_ring = 0, 1, False
        for tg, x in group:
            n = _row_length(x)
            x_args, hd, is_bf16 = _rows_args(x)
            store = tg.store
            out = store.view(torch.int16) if tg.format == "bf16" else store
            scales = tg.scales if tg.scales is not None else out
            ring = tg.ring
            any_ring |= ring is not None
            if ring is None:
                ring_args = [out, 0, 0, 0]
                ring_code = 0
            else:
                ring_args = [ring.view(torch.int16) if ring.dtype == torch.bfloat16 else ring,
                             ring.stride(0), ring.stride(1), ring.stride(2)]
                ring_code = _DTYPE_CODE[ring.dtype]
            args += [*x_args, out, out.stride(0), out.stride(1), out.stride(2),
                     scales, scales.stride(0), scales.stride(1), scales.stride(2), store.shape[1], *ring_args]
            ch = _chunk(tg.format, n, batch * t_len)
            nch = -(-n // ch)
            consts += [_FMT_CODE[tg.format], n, hd, is_bf16, ch, start, nch, ring is not None, ring_code]
            start += nch
            max_chunk = max(max_chunk, ch)
        per_field, per_consts = len(args) // len(group), len(consts) // len(group)
        for _ in range(MAX_FIELDS - len(group)):                           # unused slots (not compiled)
            args += args[:per_field]
            consts += consts[:per_consts]
        write_pos = any_ring and not positions_done
        rpos = ring_positions if write_pos else offsets
        warps = num_warps or max(1, min(4, max_chunk // 256))
        cache_write_kernel[(batch * t_len, start)](
            offsets, valid, t_len, rpos, rpos.stride(0) if write_pos else 0,
            rpos.stride(1) if write_pos else 0, ring_size, *args,
            len(group), any_ring, write_pos, *consts, num_warps=warps, enable_fp_fusion=False)
        positions_done |= write_pos


__all__ = ["BLOCK_FORMATS", "FLOAT_FORMATS", "SUPPORTED_FORMATS", "WriteTarget", "unsupported_reason",
           "write_fields", "write_fields_reference"]
