"""The cache of a chunk-boundary attention layer (Attamba, ``AttentionDims.chunks``).

Per sequence, for each stored field (``k``, ``v``; each in its policy format):

- **boundary rows** (unless ``ChunkLayout.boundary_rows`` is off: a sliding-window layer keeps
  the window alone): row 0 the sink (position 0), row 1 + c the key/value at region c's chunk
  end, one more scratch row that decode steps write when their token is no boundary (fixed
  shapes, no host branch); ``ceil(capacity / P) + 2`` rows, so retained bytes grow as T / P;
- a **window ring** of the newest ``window + 1 + rollback`` raw rows (slot = position mod ring
  size; ``slot_position`` records which position a slot holds, -1 when empty);

and the running **SSM states** (conv window and scan state of both SSMs) of the newest
``rollback + 2`` positions (slot = position mod history; ``state_position`` says which), in
float32 or better. Which positions are boundaries is the layer's rule: the layer hands the cache
row indices, the cache only stores. Rolling back within ``rollback`` tokens is exact: the state
of the new last position is still held, the ring still holds the window, and boundary rows of
rolled-back positions are rewritten before any query can read them (a boundary row is read only
by queries more than ``window`` positions after it).
"""

from __future__ import annotations

import torch

from attnlab.cache.policy import CachePolicy
from attnlab.cache.storage import FieldStore
from attnlab.cache.window import WindowRingCache, head_rows
from attnlab.config.attention import AttentionDims
from attnlab.errors import AttnlabError


class ChunkedLayerCache(WindowRingCache):
    """Boundary rows + window ring + SSM states of one layer (module docstring)."""

    def __init__(self, dims: AttentionDims, policy: CachePolicy, batch: int, capacity: int,
                 device: torch.device, dtype: torch.dtype):
        layout = dims.chunks
        if layout is None:
            raise ValueError("ChunkedLayerCache needs AttentionDims.chunks")
        super().__init__(dims, policy, batch, capacity, device, dtype,
                         ring_size=layout.window + 1 + policy.rollback, what="chunk-boundary")
        self.chunk_size, self.window = layout.chunk_size, layout.window
        # states kept for the newest positions; at least 2, so that a step at position n (e.g. a
        # CUDA-graph warm-up, undone by resetting the lengths) never overwrites n - 1's
        self.history = policy.rollback + 2
        self.num_regions = -(-capacity // layout.chunk_size)
        self.scratch_row = self.num_regions + 1
        self.boundaries = {name: FieldStore(self.formats[name], n, batch, self.num_regions + 2, device, dtype)
                           for name, n in self.row_lengths.items()} if layout.boundary_rows else {}
        self.state_dtype = torch.promote_types(dtype, torch.float32)
        self.states = {name: torch.zeros(batch, self.history, *shape, dtype=self.state_dtype, device=device)
                       for name, shape in layout.states}
        self.state_position = torch.full((batch, self.history), -1, dtype=torch.long, device=device)

    # ------------------------------------------------------------------ states
    def load_states(self, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        """Copies of the states after positions ``pos`` (B,) (any value where pos < 0: the
        layer restarts there)."""
        batch_index = torch.arange(pos.shape[0], device=pos.device)
        slot = pos % self.history
        return {name: t[batch_index, slot].clone() for name, t in self.states.items()}

    def store_states(self, pos: torch.Tensor, states: dict[str, torch.Tensor]) -> None:
        batch_index = torch.arange(pos.shape[0], device=pos.device)
        slot = pos % self.history
        for name, t in states.items():
            self.states[name].index_put_((batch_index, slot), t.to(self.state_dtype))
        self.state_position.index_put_((batch_index, slot), pos)

    def states_at(self, b: int, pos: int) -> dict[str, torch.Tensor]:
        """Sequence ``b``'s states after position ``pos`` (1, ...) each; an error when not held."""
        slot = pos % self.history
        if int(self.state_position[b, slot]) != pos:
            raise AttnlabError(f"the SSM state after position {pos} is no longer held (sequence {b}); a chunk must "
                               "continue where the cache ends")
        return {name: t[b:b + 1, slot].clone() for name, t in self.states.items()}

    def store_state(self, b: int, pos: int, field: str, state) -> None:
        """Store one SSM's ``state`` (an ``SSMState`` of batch 1) as sequence b's after ``pos``."""
        slot = pos % self.history
        self.states[f"{field}_conv"][b, slot] = state.conv[0].to(self.state_dtype)
        self.states[f"{field}_ssm"][b, slot] = state.ssm[0].to(self.state_dtype)
        self.state_position[b, slot] = pos

    # ------------------------------------------------------------------ one token (capturable)
    def append_token(self, pos: torch.Tensor, row: torch.Tensor | None, fields: dict[str, torch.Tensor]) -> None:
        """Store one token per sequence at device positions ``pos`` (B,): its ring slot and its
        boundary row ``row`` (B,) (the scratch row when it is no boundary; None without boundary
        rows). ``fields[name]``: (B, KV, 1, d)."""
        batch_index = torch.arange(pos.shape[0], device=pos.device)
        slot = pos % self.ring_size
        for name, t in fields.items():
            rows = head_rows(t)
            self.ring[name].write_at(slot, rows)
            if row is not None:
                self.boundaries[name].write_at(row, rows)
        self.slot_position.index_put_((batch_index, slot), pos)

    def rows_for(self, length: int) -> int:
        """Boundary rows that queries at positions below ``length`` can read (sink + regions)."""
        return min(self.num_regions + 1, 2 + max(length - 1, 0) // self.chunk_size)

    def boundary_rows(self, num_rows: int, b: int | None = None):
        """Boundary rows 0..num_rows-1 as (B, KV, rows, d) keys and values (one sequence with ``b``)."""
        out = []
        for name in ("k", "v"):
            rows = self.boundaries[name].read(0, num_rows)
            out.append(self._heads(rows if b is None else rows[b:b + 1]))
        return out[0], out[1]

    # ------------------------------------------------------------------ chunks (host offsets)
    def check_capacity(self, end: int) -> None:
        if end > self.capacity:
            raise AttnlabError(f"the cache holds {self.capacity} positions per sequence; writing up to position "
                               f"{end} needs more (build the runtime with a larger max_length)")

    def stored_ring(self, b: int):
        """Sequence b's ring as stored: (1, KV, R, d) keys and values and slot positions (R,)."""
        k = self._heads(self.ring["k"].read(0, self.ring_size)[b:b + 1])
        v = self._heads(self.ring["v"].read(0, self.ring_size)[b:b + 1])
        return k, v, self.slot_position[b]

    def write_chunk(self, b: int, positions: torch.Tensor, rows: torch.Tensor, is_row: torch.Tensor,
                    fields: dict[str, torch.Tensor]) -> None:
        """Sequence b's chunk at ``positions`` (n,): boundary rows ``rows`` for the positions where
        ``is_row``, and the ring's newest slots. ``fields[name]``: (1, KV, n, d)."""
        first = max(0, positions.numel() - self.ring_size)
        slots = positions[first:] % self.ring_size
        for name, t in fields.items():
            data = head_rows(t)[0]  # (n, row)
            if self.boundaries and bool(is_row.any()):
                self.boundaries[name].write_rows(b, rows, data[is_row])
            self.ring[name].write_rows(b, slots, data[first:])
        self.slot_position[b, slots] = positions[first:]

    # ------------------------------------------------------------------ bookkeeping
    def check_rollback(self, b: int, new_length: int) -> None:
        """Refuse a rollback the states or the ring cannot undo exactly."""
        if new_length == 0:
            return
        need = torch.arange(max(0, new_length - 1 - self.window), new_length, device=self.slot_position.device)
        ring_ok = bool((self.slot_position[b, need % self.ring_size] == need).all())
        state_ok = not self.states or int(self.state_position[b, (new_length - 1) % self.history]) == new_length - 1
        if not (ring_ok and state_ok):
            raise AttnlabError(f"cannot roll back to length {new_length}: the SSM states or the window ring no "
                               f"longer hold that position (raise the policy's rollback={self.history - 2})")

    def _row_bytes(self, stores: dict[str, FieldStore]) -> int:
        return sum(store.bytes_per_token() for store in stores.values())

    def state_bytes(self) -> int:
        """Bytes of one copy of the layer's SSM states (one sequence)."""
        return sum(t[0, 0].numel() * t.element_size() for t in self.states.values())

    def bytes_per_token(self) -> int:
        """Bytes one token adds on average: a boundary row per chunk of P tokens (rounded up; 0
        without boundary rows); the ring and states are fixed (``fixed_bytes``)."""
        return -(-self._row_bytes(self.boundaries) // self.chunk_size)

    def retained_bytes(self, length: int) -> int:
        """Analytic bytes one sequence of ``length`` tokens needs: the raw rows of its newest
        min(length, window + 1) positions, one boundary row per region begun plus the sink, and one
        copy of the SSM states."""
        if length == 0:
            return 0
        rows = 1 + -(-length // self.chunk_size) if self.boundaries else 0
        return (min(length, self.window + 1) * self._row_bytes(self.ring) + rows * self._row_bytes(self.boundaries)
                + self.state_bytes())

    def fixed_bytes(self) -> int:
        """Allocated bytes that do not grow with the capacity: ring, states (history copies),
        positions and the scratch row."""
        total = sum(store.bytes_allocated() for store in self.ring.values())
        total += sum(t.numel() * t.element_size() for t in self.states.values())
        total += self.batch * self._row_bytes(self.boundaries)  # the scratch row
        return total + sum(t.numel() * t.element_size() for t in (self.slot_position, self.state_position))

    def bytes_allocated(self) -> int:
        total = sum(t.numel() * t.element_size() for t in (self.slot_position, self.state_position))
        total += sum(t.numel() * t.element_size() for t in self.states.values())
        stores = [*self.ring.values(), *self.boundaries.values()]
        return total + sum(store.bytes_allocated() for store in stores)
