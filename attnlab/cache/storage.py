"""Per-field sequence storage, allocated once, and the full-precision tail ring.

A field's row is one token's values across all kv heads (kv_heads * head_dim). Float formats
keep rows as a cast tensor ``data`` (B, capacity, n); the block formats (q8_0, q4_0, nf4) keep
the kernel-native planar layout of :mod:`attnlab.quant.planar`: ``codes`` (B, capacity,
code_bytes) uint8 in element order and ``scales`` (B, capacity, blocks) fp16 — the same values
and the same number of bytes as ggml's stream (``ggml_rows`` gives that stream back). fp8 fields
keep their codes the same way and one float32 scale per row.

Storage never grows or moves: a runtime allocates it for its maximum length, so pointers stay
valid for captured CUDA graphs. Rows are quantized independently, so rolling back the length
restores exactly the state a shorter cache would have.

Two write paths: ``write`` takes host offsets (any chunk, right padding dropped; the reference
path and the CPU), ``write_at`` takes device positions for one token per sequence (no host
synchronisation: it can be captured). The fused Triton writer (``kernels.cache_write``) writes
the same bytes in one launch per layer.
"""

from __future__ import annotations

import torch

from attnlab.errors import InputError
from attnlab.quant import get_format, planar, quantize, storage_dtype


class FieldStore:
    """Rows of one field for ``batch`` sequences and ``capacity`` positions."""

    def __init__(self, fmt: str, row_length: int, batch: int, capacity: int, device: torch.device,
                 compute_dtype: torch.dtype):
        self.format = get_format(fmt)
        self.row_length = row_length
        self.compute_dtype = compute_dtype
        self.capacity = capacity
        self.data = self.codes = self.scales = None
        if self.format.quantized:
            code_bytes, blocks = planar.planar_widths(fmt, row_length)
            self.codes = torch.zeros(batch, capacity, code_bytes, dtype=torch.uint8, device=device)
            self.scales = torch.zeros(batch, capacity, blocks, dtype=planar.scale_dtype(fmt), device=device)
        else:
            self.data = torch.zeros(batch, capacity, row_length, dtype=storage_dtype(fmt), device=device)

    @property
    def name(self) -> str:
        return self.format.name

    def bytes_per_token(self) -> int:
        return self.format.row_bytes(self.row_length)

    def _encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.format.quantized:
            return planar.quantize(rows, self.format.name)
        return (quantize(rows, self.format.name),)

    def _planes(self) -> tuple[torch.Tensor, ...]:
        return (self.codes, self.scales) if self.format.quantized else (self.data,)

    def write(self, offsets: list[int], valid: list[int], rows: torch.Tensor) -> None:
        """Store rows t < valid[b] of ``rows`` (B, T, row_length) at offsets[b] + t."""
        self._check_room(offsets, valid)
        encoded = self._encode(rows)
        t_len = rows.shape[1]
        for plane, enc in zip(self._planes(), encoded):
            if all(o == offsets[0] for o in offsets) and all(n == t_len for n in valid):
                plane[:, offsets[0]: offsets[0] + t_len] = enc
            else:
                for b, (offset, n) in enumerate(zip(offsets, valid)):
                    plane[b, offset: offset + n] = enc[b, :n]

    def write_at(self, positions: torch.Tensor, rows: torch.Tensor) -> None:
        """Store one row per sequence, ``rows`` (B, 1, row_length), at device ``positions`` (B,)
        (the caller guarantees positions < capacity). No host synchronisation."""
        batch_index = torch.arange(rows.shape[0], device=rows.device)
        pos = positions.to(torch.long)
        for plane, enc in zip(self._planes(), self._encode(rows)):
            plane.index_put_((batch_index, pos), enc[:, 0])

    def write_rows(self, b: int, index: torch.Tensor, rows: torch.Tensor) -> None:
        """Store ``rows`` (n, row_length) of sequence ``b`` at row indices ``index`` (n,)."""
        for plane, enc in zip(self._planes(), self._encode(rows.unsqueeze(0))):
            plane[b, index] = enc[0]

    def _check_room(self, offsets: list[int], valid: list[int]) -> None:
        end = max(o + n for o, n in zip(offsets, valid))
        if end > self.capacity:
            raise InputError(f"the cache holds {self.capacity} positions per sequence; writing up to position "
                             f"{end} needs more (build the runtime with a larger max_length)")

    def read(self, start: int, end: int) -> torch.Tensor:
        """Rows ``start:end`` of every sequence, dequantized: (B, end - start, row_length)."""
        if self.format.quantized:
            return planar.dequantize(self.codes[:, start:end], self.scales[:, start:end], self.format.name,
                                     self.row_length, self.compute_dtype)
        return self.data[:, start:end].to(self.compute_dtype)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (B, n) long of each sequence, dequantized: (B, n, row_length). No host
        synchronisation (capturable)."""
        batch_index = torch.arange(index.shape[0], device=index.device).unsqueeze(1)
        if self.format.quantized:
            return planar.dequantize(self.codes[batch_index, index], self.scales[batch_index, index],
                                     self.format.name, self.row_length, self.compute_dtype)
        return self.data[batch_index, index].to(self.compute_dtype)

    def ggml_rows(self, start: int, end: int) -> torch.Tensor:
        """Rows ``start:end`` as ggml's byte stream (B, end - start, row_bytes) uint8 (block
        formats), i.e. what ``quant.quantize`` returns for the original rows."""
        if not self.format.quantized:
            raise ValueError(f"{self.format.name} is not a block format")
        return planar.to_ggml(self.codes[:, start:end], self.scales[:, start:end], self.format.name)

    def bytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._planes())


class TailWindow:
    """The newest tokens of every field at full precision, in a ring of ``size`` slots per
    sequence. ``slot_position`` records which position each slot holds, so reads and rollbacks
    can prove they see the exact values (never refilled from dequantized data)."""

    def __init__(self, size: int, row_lengths: dict[str, int], batch: int, device: torch.device,
                 dtype: torch.dtype):
        self.size = size
        self.rows = {name: torch.zeros(batch, size, n, dtype=dtype, device=device) for name, n in row_lengths.items()}
        self.slot_position = torch.full((batch, size), -1, dtype=torch.long, device=device)

    def write(self, offsets: list[int], valid: list[int], rows: dict[str, torch.Tensor]) -> None:
        device = self.slot_position.device
        for b, (offset, n) in enumerate(zip(offsets, valid)):
            first = max(0, n - self.size)  # only the newest `size` of this chunk can survive
            positions = torch.arange(offset + first, offset + n, device=device)
            slots = positions % self.size
            for name, data in self.rows.items():
                data[b, slots] = rows[name][b, first:n].to(data.dtype)
            self.slot_position[b, slots] = positions

    def write_at(self, positions: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        """One token per sequence at device ``positions`` (B,); no host synchronisation."""
        pos = positions.to(torch.long)
        batch_index = torch.arange(pos.shape[0], device=pos.device)
        slots = pos % self.size
        for name, data in self.rows.items():
            data.index_put_((batch_index, slots), rows[name][:, 0].to(data.dtype))
        self.slot_position.index_put_((batch_index, slots), pos)

    def holds(self, b: int, start: int, end: int) -> bool:
        """True when positions start..end-1 of sequence b are all in the ring."""
        if end <= start:
            return True
        positions = torch.arange(start, end, device=self.slot_position.device)
        return bool((self.slot_position[b, positions % self.size] == positions).all())

    def overlay(self, name: str, chunk: torch.Tensor, start: int, tail_starts: list[int], lengths: list[int]) -> torch.Tensor:
        """Replace rows of ``chunk`` (B, c, row) at positions [tail_start_b, length_b) with the
        ring's exact values, where the ring still holds that position."""
        end = start + chunk.shape[1]
        for b, (lo, hi) in enumerate(zip(tail_starts, lengths)):
            lo, hi = max(lo, start), min(hi, end)
            if lo >= hi:
                continue
            positions = torch.arange(lo, hi, device=chunk.device)
            slots = positions % self.size
            held = (self.slot_position[b, slots] == positions).unsqueeze(-1)
            exact = self.rows[name][b, slots].to(chunk.dtype)
            chunk[b, lo - start: hi - start] = torch.where(held, exact, chunk[b, lo - start: hi - start])
        return chunk

    def bytes_allocated(self) -> int:
        total = self.slot_position.numel() * self.slot_position.element_size()
        return total + sum(t.numel() * t.element_size() for t in self.rows.values())
