"""What the caches of windowed attention layers share: a ring of the newest raw rows per
sequence (``window + extra`` slots; slot = position mod ring size; ``slot_position`` says which
position a slot holds, -1 when empty), one ``FieldStore`` per stored per-token field in its policy
format. ``SummaryLayerCache`` (Butterfly) and ``ChunkedLayerCache`` (Attamba, sliding window)
add their own pools on top."""

from __future__ import annotations

import torch

from attnlab.cache.policy import CachePolicy, native_format
from attnlab.cache.storage import FieldStore
from attnlab.config.attention import AttentionDims
from attnlab.errors import AttnlabError


def head_rows(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).flatten(2)  # (B, KV, T, d) -> (B, T, KV * d)


class WindowRingCache:
    """The shared part (module docstring); ``what`` names the cache kind in errors."""

    #: decode runs as torch ops on device-side positions only (a runtime may capture it)
    device_side_decode = True

    def __init__(self, dims: AttentionDims, policy: CachePolicy, batch: int, capacity: int,
                 device: torch.device, dtype: torch.dtype, *, ring_size: int, what: str):
        if dims.value_alias is not None or dims.null_token:
            raise AttnlabError(f"a {what} cache stores separate keys and values and no null token")
        self.dims = dims
        self.batch, self.capacity, self.dtype = batch, capacity, dtype
        self.ring_size = ring_size
        native = native_format(dtype)
        self.row_lengths = {name: dims.num_kv_heads * hd for name, hd in dims.token_fields.items()}
        self.formats = {name: policy.format_for(name, native) for name in dims.cache_fields}
        self.ring = {name: FieldStore(self.formats[name], n, batch, ring_size, device, dtype)
                     for name, n in self.row_lengths.items()}
        self.slot_position = torch.full((batch, ring_size), -1, dtype=torch.long, device=device)
        self.kernel_plans: dict = {}

    def ring_rows(self, pos: torch.Tensor, fresh: dict[str, torch.Tensor]):
        """The whole ring as (B, KV, R, d) keys and values, with each sequence's newest token (at
        ``pos``) taken exactly from ``fresh`` rather than as stored, and the position of every
        slot (B, R) (-1: empty)."""
        newest = torch.arange(self.ring_size, device=pos.device) == (pos % self.ring_size).unsqueeze(1)
        out = []
        for name in ("k", "v"):
            rows = self.ring[name].read(0, self.ring_size)  # (B, R, n)
            rows = torch.where(newest.unsqueeze(-1), head_rows(fresh[name]).to(rows.dtype), rows)
            out.append(self._heads(rows))
        return out[0], out[1], self.slot_position

    def _heads(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.unflatten(2, (self.dims.num_kv_heads, -1)).transpose(1, 2)

    def tail_bytes(self) -> int:
        return 0
