"""Growable per-field storage and the full-precision tail window.

A field's row is one token's values across all kv heads (kv_heads * head_dim), stored in the
field's format: a cast tensor for fp32/fp16/bf16, ggml-style packed bytes for q8_0/q4_0/nf4.
Rows are quantized independently, so truncating the stored length restores exactly the state
an unextended cache would have.
"""

from __future__ import annotations

import torch

from attnlab.quant import dequantize, get_format, quantize, storage_dtype


class FieldStore:
    """Rows of one field for ``batch`` sequences; capacity grows geometrically on demand."""

    def __init__(self, fmt: str, row_length: int, batch: int, device: torch.device,
                 compute_dtype: torch.dtype, initial_capacity: int = 64):
        self.format = get_format(fmt)
        self.row_length = row_length
        self.compute_dtype = compute_dtype
        width = self.format.row_bytes(row_length) if self.format.quantized else row_length
        dtype = storage_dtype(fmt)
        self.data = torch.zeros(batch, initial_capacity, width, dtype=dtype, device=device)  # (B, capacity, width)

    @property
    def capacity(self) -> int:
        return self.data.shape[1]

    def bytes_per_token(self) -> int:
        return self.format.row_bytes(self.row_length)

    def reserve(self, length: int) -> None:
        if length <= self.capacity:
            return
        new_capacity = max(length, 2 * self.capacity)  # amortized O(1) appends
        grown = self.data.new_zeros(self.data.shape[0], new_capacity, self.data.shape[2])
        grown[:, : self.capacity] = self.data
        self.data = grown

    def write(self, offsets: list[int], rows: torch.Tensor) -> None:
        """Store ``rows`` (B, T, row_length) at positions offsets[b] .. offsets[b] + T - 1."""
        t_len = rows.shape[1]
        packed = quantize(rows, self.format.name)
        self.reserve(max(offsets) + t_len)
        if all(o == offsets[0] for o in offsets):
            self.data[:, offsets[0]: offsets[0] + t_len] = packed
        else:
            for b, offset in enumerate(offsets):
                self.data[b, offset: offset + t_len] = packed[b]

    def read(self, start: int, end: int) -> torch.Tensor:
        """Rows ``start:end`` of every sequence, dequantized: (B, end - start, row_length)."""
        return dequantize(self.data[:, start:end], self.format.name, self.row_length, self.compute_dtype)

    def bytes_allocated(self) -> int:
        return self.data.numel() * self.data.element_size()


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
