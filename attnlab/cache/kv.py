"""Per-layer caches of named fields, the whole-model cache, and one forward's cache step.

Storage is allocated once for ``capacity`` positions (``FieldStore``/``TailWindow``); how many
tokens each sequence holds is the decode runtime's bookkeeping (``infer.runtime``), which it
hands to the model as a ``CacheStep`` per forward. The model writes the new tokens where the
step says and reads keys below ``step.lengths``; it never changes lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnlab.cache.policy import CachePolicy, native_format
from attnlab.cache.storage import FieldStore, TailWindow
from attnlab.config.attention import AttentionDims
from attnlab.errors import AttnlabError


@dataclass
class CacheStep:
    """Where one forward's T new tokens go. Device tensors (B,) int32: ``offsets`` (first new
    position), ``valid`` (real new tokens; the rest of the T are right padding and are not
    stored), ``lengths`` = offsets + valid (keys visible after the write); ``positions`` (B, T)
    int64. ``max_length``: a host upper bound of ``lengths`` (kernel planning). ``host_offsets``/
    ``host_valid``: the same numbers as lists when the runtime runs eagerly (None inside a
    captured CUDA graph, where only device-side paths may run)."""

    offsets: torch.Tensor
    valid: torch.Tensor
    lengths: torch.Tensor
    positions: torch.Tensor
    max_length: int
    host_offsets: list[int] | None = None
    host_valid: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[1]

    @classmethod
    def eager(cls, offsets: list[int], valid: list[int], t_len: int, device: torch.device) -> "CacheStep":
        off = torch.tensor(offsets, dtype=torch.int32, device=device)
        val = torch.tensor(valid, dtype=torch.int32, device=device)
        positions = off.to(torch.long).unsqueeze(1) + torch.arange(t_len, device=device)
        return cls(off, val, off + val, positions, max(o + n for o, n in zip(offsets, valid)),
                   list(offsets), list(valid))


def _rows(fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.transpose(1, 2).flatten(2) for name, t in fields.items()}  # (B, T, KV * hd)


class LayerCache:
    """One attention layer's cache: a ``FieldStore`` per stored field of the layer's cache spec
    (``dims.cache_fields``: key fields, then ``v`` unless values are read from a key field,
    ``dims.value_alias``) in its policy format, plus the optional full-precision tail ring.
    Rotary keys are stored after RoPE. ``kernel_plans``: per-shape kernel plans (layouts,
    scratch buffers) that ``attnlab.kernels`` computes once and reuses. ``read``/``stored``
    accept ``v`` for an aliased value field."""

    def __init__(self, dims: AttentionDims, policy: CachePolicy, batch: int, capacity: int,
                 device: torch.device, dtype: torch.dtype):
        per_block = [f.name for f in dims.key_fields if f.row != "token"]
        if per_block:
            raise AttnlabError(f"cache field(s) {', '.join(per_block)} are not one row per token; this cache "
                               "stores per-token rows only")
        self.dims = dims
        self.tail = policy.tail
        self.batch = batch
        self.capacity = capacity
        self.dtype = dtype
        native = native_format(dtype)
        self.row_lengths = {name: dims.num_kv_heads * hd for name, hd in dims.cache_fields.items()}
        self.formats = {name: policy.format_for(name, native) for name in self.row_lengths}
        self.stores = {name: FieldStore(self.formats[name], n, batch, capacity, device, dtype)
                       for name, n in self.row_lengths.items()}
        if dims.value_alias is not None:
            self.formats["v"] = self.formats[dims.value_alias]
        self.window = (TailWindow(policy.tail + policy.rollback, self.row_lengths, batch, device, dtype)
                       if policy.tail else None)
        self.kernel_plans: dict = {}

    def write(self, step: CacheStep, fields: dict[str, torch.Tensor], *, include_tail: bool = True) -> None:
        """Store new tokens (torch path): ``fields[name]`` is (B, KV, T, head_dim). With
        ``include_tail=False`` the exact tail ring is left for ``write_tail`` (called after
        attention has read the older exact tokens a multi-token chunk would otherwise evict)."""
        rows = _rows(fields)
        if step.host_offsets is None:  # inside a graph: one token per sequence, every row valid
            assert step.num_tokens == 1, "device-side cache writes take one token per sequence"
            for name, store in self.stores.items():
                store.write_at(step.offsets, rows[name])
            if include_tail and self.window is not None:
                self.window.write_at(step.offsets, rows)
            return
        for name, store in self.stores.items():
            store.write(step.host_offsets, step.host_valid, rows[name])
        if include_tail:
            self.write_tail(step, fields)

    def write_tail(self, step: CacheStep, fields: dict[str, torch.Tensor]) -> None:
        if self.window is None:
            return
        if step.host_offsets is None:
            self.window.write_at(step.offsets, _rows(fields))
        else:
            self.window.write(step.host_offsets, step.host_valid, _rows(fields))

    def stored(self, name: str) -> str:
        """The stored field behind ``name`` (``v`` -> the aliased key field, if any)."""
        return self.dims.value_field if name == "v" else name

    def read(self, name: str, start: int, end: int) -> torch.Tensor:
        """Positions start..end-1 of field ``name`` as stored (dequantized): (B, KV, c, head_dim)."""
        return self._heads(self.stores[self.stored(name)].read(start, end))

    def read_exact(self, name: str, start: int, end: int, offsets: list[int],
                   fresh: torch.Tensor | None) -> torch.Tensor:
        """Positions start..end-1 at full precision where it is kept: positions >= offsets[b]
        (this forward's tokens) from ``fresh`` (B, KV, T, head_dim), older ones from the tail
        ring; positions neither covers come back as stored (callers never use them as exact)."""
        name = self.stored(name)
        chunk = self.stores[name].read(start, end)
        if self.window is not None:
            lengths = offsets  # the ring holds tokens before this forward
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
        """Bytes one token adds to this layer (per sequence), from the formats."""
        return sum(store.bytes_per_token() for store in self.stores.values())

    def retained_bytes(self, length: int) -> int:
        """Analytic bytes one sequence of ``length`` tokens holds (the tail ring not counted)."""
        return length * self.bytes_per_token()

    def tail_bytes(self) -> int:
        return self.window.bytes_allocated() if self.window is not None else 0

    def fixed_bytes(self) -> int:
        """Allocated bytes that do not grow with the capacity: the tail ring."""
        return self.tail_bytes()

    def bytes_allocated(self) -> int:
        """Field storage plus the tail ring (kernel scratch buffers are not cache bytes)."""
        return sum(store.bytes_allocated() for store in self.stores.values()) + self.tail_bytes()


def layer_cache(dims: AttentionDims, policy: CachePolicy, batch: int, capacity: int, device: torch.device,
                dtype: torch.dtype):
    """The cache a layer with cache spec ``dims`` needs: ``LayerCache`` (every token), or
    ``SummaryLayerCache`` (a window + block summaries) when ``dims.summaries``, ``ChunkedLayerCache``
    (boundary rows + window + recurrent states) when ``dims.chunks``."""
    if dims.summaries is not None:
        from attnlab.cache.summary import SummaryLayerCache

        return SummaryLayerCache(dims, policy, batch, capacity, device, dtype)
    if dims.chunks is not None:
        from attnlab.cache.chunked import ChunkedLayerCache

        return ChunkedLayerCache(dims, policy, batch, capacity, device, dtype)
    return LayerCache(dims, policy, batch, capacity, device, dtype)


@dataclass
class CacheReport:
    """Analytic vs allocated bytes. Storage is allocated once for ``capacity`` positions, so
    for per-token caches ``bytes_allocated == bytes_per_token * batch * capacity + tail_bytes``
    exactly; ``slack_bytes``: capacity not (yet) filled by the longest sequence. Window +
    summary layers (Butterfly) add ``fixed_bytes`` (window ring, running sums) and count their
    summary rows in ``bytes_per_token`` amortised over a block; ``retained_bytes`` is what the
    sequences hold at ``max_length`` tokens each (analytic, every layer kind)."""

    bytes_per_token: int            # per sequence, all layers
    bytes_per_token_layer: list[int]
    bytes_allocated: int
    tail_bytes: int
    capacity: int
    max_length: int
    batch: int
    fixed_bytes: int = 0
    retained_bytes: int = 0

    @property
    def slack_bytes(self) -> int:
        return self.bytes_per_token * self.batch * (self.capacity - self.max_length)

    @property
    def used_bytes(self) -> int:
        return self.bytes_per_token * self.batch * self.max_length


@dataclass
class ModelCache:
    """Caches of every attention layer, allocated for ``batch`` sequences of ``capacity``
    positions."""

    layers: list[LayerCache]
    batch: int
    capacity: int
    policy: CachePolicy = field(default_factory=CachePolicy)

    @classmethod
    def for_model(cls, model, policy: CachePolicy | str | dict | None = None, batch: int = 1,
                  capacity: int | None = None, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> "ModelCache":
        policy = CachePolicy.parse(policy)
        param = next(model.parameters())
        device = device if device is not None else param.device
        dtype = dtype if dtype is not None else param.dtype
        capacity = capacity if capacity is not None else model.config.block_size
        dims = [layer.dims for layer in model.attention_layers()]
        policy.check_fields(dims)
        return cls([layer_cache(d, policy.for_layer(i), batch, capacity, device, dtype) for i, d in enumerate(dims)],
                   batch, capacity, policy)

    def check_rollback(self, lengths: list[int]) -> None:
        for b, n in enumerate(lengths):
            for layer in self.layers:
                layer.check_rollback(b, n)

    def bytes_per_token(self) -> int:
        return sum(layer.bytes_per_token() for layer in self.layers)

    def bytes_allocated(self) -> int:
        return sum(layer.bytes_allocated() for layer in self.layers)

    def report(self, max_length: int) -> CacheReport:
        tail = sum(layer.tail_bytes() for layer in self.layers)
        fixed = sum(layer.fixed_bytes() for layer in self.layers) - tail
        retained = self.batch * sum(layer.retained_bytes(max_length) for layer in self.layers)
        return CacheReport(self.bytes_per_token(), [layer.bytes_per_token() for layer in self.layers],
                           self.bytes_allocated(), tail, self.capacity, max_length, self.batch, fixed, retained)
