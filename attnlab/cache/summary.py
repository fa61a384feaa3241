"""The cache of a window + block-summary attention layer (Butterfly, ``AttentionDims.summaries``).

Two pools per stored field (``k``, ``v``), each with its own policy format:

- the **window pool** (``k``, ``v``): raw rows of the newest positions in a ring of
  ``window + rollback`` slots per sequence (slot = position mod ring size; ``slot_position``
  records which position a slot holds, -1 when empty);
- the **summary pool** (``k_sum``, ``v_sum``): one row per block of ``block_size`` positions, the
  mean of the block's rows (post-RoPE keys), ``ceil(capacity / block_size)`` rows.

Retained bytes therefore grow as T / block_size, not T. A block's mean is built incrementally:
``running`` keeps, for the newest ``rollback + 2`` positions, the float32-or-better sum of the block's rows
up to that position; each new token's position writes ``running / block_size`` into its block's
summary row, so when the block's last token arrives the row holds the block mean. A summary is
read only once its block has ended before the reader's window starts, by which time it is
complete. Rolling back ``truncate``-style within ``rollback`` tokens is exact: the running sum
of the new last position is still held, the window ring still holds the last ``window``
positions, and rows of rolled-back positions are overwritten before anyone can see them.

Two write paths, as for ``LayerCache``: ``append_token`` (one token per sequence, device
positions: capturable) and ``append_chunk`` + ``write_ring`` (host offsets, any chunk).
"""

from __future__ import annotations

import torch

from attnlab.cache.policy import CachePolicy
from attnlab.cache.storage import FieldStore
from attnlab.cache.window import WindowRingCache, head_rows
from attnlab.config.attention import AttentionDims
from attnlab.errors import AttnlabError


class SummaryLayerCache(WindowRingCache):
    """Window pool + summary pool of one layer (module docstring). ``fields``: the per-token
    fields of ``dims`` (``k``, ``v``); formats from ``policy`` (``k``/``v`` for the window pool,
    ``k_sum``/``v_sum`` for the summary pool; the model's dtype by default)."""

    def __init__(self, dims: AttentionDims, policy: CachePolicy, batch: int, capacity: int,
                 device: torch.device, dtype: torch.dtype):
        layout = dims.summaries
        if layout is None:
            raise ValueError("SummaryLayerCache needs AttentionDims.summaries")
        super().__init__(dims, policy, batch, capacity, device, dtype, ring_size=layout.window + policy.rollback,
                         what="window + summary")
        self.window, self.block_size = layout.window, layout.block_size
        # running sums kept for the newest positions; at least 2, so that a step at position n
        # (e.g. a CUDA-graph warm-up, undone by resetting the lengths) never overwrites n - 1's
        self.history = policy.rollback + 2
        self.num_blocks = -(-capacity // layout.block_size)
        self.summaries = {name: FieldStore(self.formats[f"{name}_sum"], n, batch, self.num_blocks, device, dtype)
                          for name, n in self.row_lengths.items()}
        acc = torch.promote_types(dtype, torch.float32)
        self.running = {name: torch.zeros(batch, self.history, n, dtype=acc, device=device)
                        for name, n in self.row_lengths.items()}
        self.running_position = torch.full((batch, self.history), -1, dtype=torch.long, device=device)

    # ------------------------------------------------------------------ one token (capturable)
    def append_token(self, pos: torch.Tensor, fields: dict[str, torch.Tensor]) -> None:
        """Store one new token per sequence at device positions ``pos`` (B,): its running block
        sum and summary row, and its window-pool row. ``fields[name]``: (B, KV, 1, d)."""
        batch_index = torch.arange(pos.shape[0], device=pos.device)
        starts_block = (pos % self.block_size == 0).unsqueeze(1)
        here, before = pos % self.history, (pos - 1) % self.history
        slot = pos % self.ring_size
        for name, t in fields.items():
            row = head_rows(t)  # (B, 1, n)
            run = self.running[name]
            total = torch.where(starts_block, row[:, 0].to(run.dtype), run[batch_index, before] + row[:, 0].to(run.dtype))
            run.index_put_((batch_index, here), total)
            self.summaries[name].write_at(pos // self.block_size, (total / self.block_size).unsqueeze(1))
            self.ring[name].write_at(slot, row)
        self.running_position.index_put_((batch_index, here), pos)
        self.slot_position.index_put_((batch_index, slot), pos)

    def summary_rows(self, blocks: torch.Tensor):
        """Summary keys and values of ``blocks`` (B, n) -> (B, KV, n, d) each."""
        return self._heads(self.summaries["k"].gather(blocks)), self._heads(self.summaries["v"].gather(blocks))

    # ------------------------------------------------------------------ chunks (host offsets)
    def append_chunk(self, offsets: list[int], valid: list[int], fields: dict[str, torch.Tensor]) -> None:
        """Running sums and summary rows for the first ``valid[b]`` tokens of ``fields`` (B, KV,
        T, d) at ``offsets[b]`` (the window pool is written by ``write_ring`` after attention)."""
        end = max(o + n for o, n in zip(offsets, valid))
        if end > self.capacity:
            raise AttnlabError(f"the cache holds {self.capacity} positions per sequence; writing up to position "
                               f"{end} needs more (build the runtime with a larger max_length)")
        device = self.slot_position.device
        for b, (offset, n) in enumerate(zip(offsets, valid)):
            if n == 0:
                continue
            for name, t in fields.items():
                rows = head_rows(t[b:b + 1, :, :n])[0].to(self.running[name].dtype)  # (n, row)
                start = offset
                while start < offset + n:
                    block = start // self.block_size
                    stop = min(offset + n, (block + 1) * self.block_size)
                    seg = rows[start - offset: stop - offset].cumsum(0)
                    if start % self.block_size:
                        seg = seg + self.running[name][b, (start - 1) % self.history]
                    self.summaries[name].write_rows(b, torch.tensor([block], device=device),
                                                    seg[-1:] / self.block_size)
                    keep = max(start, stop - self.history)  # running sums kept for the newest positions
                    positions = torch.arange(keep, stop, device=device)
                    self.running[name][b, positions % self.history] = seg[keep - start:]
                    if name == "k":
                        self.running_position[b, positions % self.history] = positions
                    start = stop

    def write_ring(self, offsets: list[int], valid: list[int], fields: dict[str, torch.Tensor]) -> None:
        """The window pool's rows for a chunk (after attention read the older ones)."""
        device = self.slot_position.device
        for b, (offset, n) in enumerate(zip(offsets, valid)):
            first = max(0, n - self.ring_size)  # only the newest ring_size of the chunk survive
            if first >= n:
                continue
            positions = torch.arange(offset + first, offset + n, device=device)
            slots = positions % self.ring_size
            for name, t in fields.items():
                self.ring[name].write_rows(b, slots, head_rows(t[b:b + 1, :, first:n])[0])
            self.slot_position[b, slots] = positions

    def stored_ring(self):
        """The window pool as stored, every sequence: (B, KV, R, d) keys and values, and the slot
        positions (B, R) (-1: empty)."""
        return (self._heads(self.ring["k"].read(0, self.ring_size)),
                self._heads(self.ring["v"].read(0, self.ring_size)), self.slot_position)

    def summary_prefix(self, blocks: int):
        """Summary rows of blocks 0..blocks-1, every sequence -> (B, KV, blocks, d) each."""
        return self._heads(self.summaries["k"].read(0, blocks)), self._heads(self.summaries["v"].read(0, blocks))

    # ------------------------------------------------------------------ bookkeeping
    def check_rollback(self, b: int, new_length: int) -> None:
        """Refuse a rollback the pools cannot undo exactly."""
        need = torch.arange(max(0, new_length - self.window), new_length, device=self.slot_position.device)
        ring_ok = bool((self.slot_position[b, need % self.ring_size] == need).all()) if len(need) else True
        run_ok = (new_length % self.block_size == 0 or new_length == 0
                  or int(self.running_position[b, (new_length - 1) % self.history]) == new_length - 1)
        if not (ring_ok and run_ok):
            raise AttnlabError(f"cannot roll back to length {new_length}: the window pool no longer holds those "
                               f"tokens (raise the policy's rollback={self.history - 2})")

    def bytes_per_token(self) -> int:
        """Bytes one token adds on average: the summary rows of a block over its block_size
        tokens (rounded up); the window pool is fixed (``fixed_bytes``)."""
        per_block = sum(store.bytes_per_token() for store in self.summaries.values())
        return -(-per_block // self.block_size)

    def retained_bytes(self, length: int) -> int:
        """Analytic bytes one sequence of ``length`` tokens holds: window rows of its newest
        min(length, window) positions + one summary row per block begun."""
        raw = sum(store.bytes_per_token() for store in self.ring.values())
        summary = sum(store.bytes_per_token() for store in self.summaries.values())
        return min(length, self.window) * raw + -(-length // self.block_size) * summary

    def fixed_bytes(self) -> int:
        """Allocated bytes that do not grow with the capacity: window ring, slot positions and
        running sums."""
        total = sum(store.bytes_allocated() for store in self.ring.values())
        total += sum(t.numel() * t.element_size() for t in self.running.values())
        return total + sum(t.numel() * t.element_size() for t in (self.slot_position, self.running_position))

    def bytes_allocated(self) -> int:
        return self.fixed_bytes() + sum(store.bytes_allocated() for store in self.summaries.values())
