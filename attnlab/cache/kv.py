"""Per-layer caches of named fields and the whole-model cache (lengths, rollback, accounting)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnlab.cache.policy import CachePolicy, native_format
from attnlab.cache.storage import FieldStore, TailWindow
from attnlab.config.attention import AttentionDims
from attnlab.errors import AttnlabError


def _rows(fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.transpose(1, 2).flatten(2) for name, t in fields.items()}  # (B, T, KV * hd)


class LayerCache:
    """One attention layer's cache: a ``FieldStore`` per field (``k`` | ``k_sem``, ``k_geo``;
    and ``v``) in its policy format, plus the optional full-precision tail window. Geometric keys
    are stored after RoPE."""

    def __init__(self, dims: AttentionDims, policy: CachePolicy, batch: int, device: torch.device,
                 dtype: torch.dtype):
        self.dims = dims
        self.tail = policy.tail
        native = native_format(dtype)
        self.row_lengths = {name: dims.num_kv_heads * hd for name, hd in dims.cache_fields.items()}
        self.formats = {name: policy.format_for(name, native) for name in self.row_lengths}
        self.stores = {name: FieldStore(self.formats[name], n, batch, device, dtype)
                       for name, n in self.row_lengths.items()}
        self.window = (TailWindow(policy.tail + policy.rollback, self.row_lengths, batch, device, dtype)
                       if policy.tail else None)

    def write(self, offsets: list[int], valid: list[int], fields: dict[str, torch.Tensor], *,
              include_tail: bool = True) -> None:
        """Store new tokens: ``fields[name]`` is (B, KV, T, head_dim). With ``include_tail=False``
        the exact tail window is left for ``write_tail`` (called after attention has read the
        older exact tokens a multi-token chunk would otherwise overwrite)."""
        rows = _rows(fields)
        for name, store in self.stores.items():
            store.write(offsets, rows[name])
        if include_tail:
            self.write_tail(offsets, valid, fields)

    def write_tail(self, offsets: list[int], valid: list[int], fields: dict[str, torch.Tensor]) -> None:
        if self.window is not None:
            self.window.write(offsets, valid, _rows(fields))

    def read(self, name: str, start: int, end: int) -> torch.Tensor:
        """Positions start..end-1 of field ``name`` as stored (dequantized): (B, KV, c, head_dim)."""
        return self._heads(self.stores[name].read(start, end))

    def read_exact(self, name: str, start: int, end: int, offsets: list[int],
                   fresh: torch.Tensor | None) -> torch.Tensor:
        """Positions start..end-1 at full precision where it is kept: positions >= offsets[b]
        (this forward's tokens) from ``fresh`` (B, KV, T, head_dim), older ones from the tail
        window; positions neither covers come back as stored (callers never use them as exact)."""
        chunk = self.stores[name].read(start, end)
        if self.window is not None:
            lengths = offsets  # the window holds tokens before this forward
            chunk = self.window.overlay(name, chunk, start, [max(0, n - self.window.size) for n in lengths], lengths)
        chunk = self._heads(chunk)
        if fresh is not None:
            for b, offset in enumerate(offsets):
                lo, hi = max(start, offset), min(end, offset + fresh.shape[2])
                if lo < hi:
                    chunk[b, :, lo - start: hi - start] = fresh[b, :, lo - offset: hi - offset].to(chunk.dtype)
        return chunk

    def _heads(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.unflatten(2, (self.dims.num_kv_heads, -1)).transpose(1, 2)

    def check_rollback(self, b: int, new_length: int) -> None:
        if self.window is not None and not self.window.holds(b, max(0, new_length - self.tail), new_length):
            raise AttnlabError(f"cannot roll back to length {new_length}: the full-precision tail no longer "
                               f"holds those tokens (raise the policy's rollback={self.window.size - self.tail})")

    def bytes_per_token(self) -> int:
        """Steady-state bytes one token adds to this layer (per sequence), from the formats."""
        return sum(store.bytes_per_token() for store in self.stores.values())

    def bytes_allocated(self) -> int:
        total = sum(store.bytes_allocated() for store in self.stores.values())
        return total + (self.window.bytes_allocated() if self.window is not None else 0)

    @property
    def capacity(self) -> int:
        return min(store.capacity for store in self.stores.values())


@dataclass
class CacheReport:
    """Analytic vs allocated bytes. ``expected = bytes_per_token * batch * capacity + tail``;
    ``slack`` = capacity not yet filled (geometric growth)."""

    bytes_per_token: int            # per sequence, all layers
    bytes_per_token_layer: list[int]
    bytes_allocated: int
    tail_bytes: int
    capacity: int
    max_length: int
    batch: int

    @property
    def slack_bytes(self) -> int:
        return self.bytes_per_token * self.batch * (self.capacity - self.max_length)

    @property
    def used_bytes(self) -> int:
        return self.bytes_per_token * self.batch * self.max_length


class ModelCache:
    """Caches of every attention layer plus per-sequence lengths (Python ints: no device syncs)."""

    def __init__(self, layers: list[LayerCache], batch: int, policy: CachePolicy):
        self.layers = layers
        self.lengths = [0] * batch
        self.policy = policy

    @classmethod
    def for_model(cls, model, policy: CachePolicy | str | None = None, batch: int = 1,
                  device: torch.device | None = None, dtype: torch.dtype | None = None) -> "ModelCache":
        policy = CachePolicy.parse(policy)
        param = next(model.parameters())
        device = device if device is not None else param.device
        dtype = dtype if dtype is not None else param.dtype
        dims = [layer.dims for layer in model.attention_layers()]
        policy.check_fields(dims)
        return cls([LayerCache(d, policy, batch, device, dtype) for d in dims], batch, policy)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def truncate(self, lengths: int | list[int]) -> None:
        """Roll back to ``lengths`` tokens (speculative decoding). Stored rows are never touched;
        the exact tail is checked to still hold the newest tokens."""
        new = [lengths] * self.batch if isinstance(lengths, int) else list(lengths)
        for b, (old, n) in enumerate(zip(self.lengths, new)):
            if not 0 <= n <= old:
                raise AttnlabError(f"truncate: sequence {b} has {old} tokens; cannot set length {n}")
            for layer in self.layers:
                layer.check_rollback(b, n)
        self.lengths = new

    def bytes_per_token(self) -> int:
        return sum(layer.bytes_per_token() for layer in self.layers)

    def bytes_allocated(self) -> int:
        return sum(layer.bytes_allocated() for layer in self.layers)

    def report(self) -> CacheReport:
        tail = sum(layer.window.bytes_allocated() for layer in self.layers if layer.window is not None)
        return CacheReport(self.bytes_per_token(), [layer.bytes_per_token() for layer in self.layers],
                           self.bytes_allocated(), tail, min(layer.capacity for layer in self.layers),
                           max(self.lengths), self.batch)
