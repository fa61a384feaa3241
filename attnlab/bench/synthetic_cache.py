"""Random cache contents for speed benchmarks: every field of every layer filled with random rows
(stored through the field's own format) up to a context length, without running a prefill."""

from __future__ import annotations

import torch

from attnlab.quant import planar, quantize


@torch.no_grad()
def fill_random(runtime, context: int, *, scale: float = 0.5, chunk: int = 8192, seed: int = 0) -> None:
    """Fill positions 0..context-1 of every sequence of ``runtime`` (a ``DecodeRuntime``) with
    random rows (N(0, scale^2), quantized per the policy; the exact tail ring too) and set the
    lengths to ``context``."""
    if context > runtime.max_length:
        raise ValueError(f"context {context} exceeds the runtime's max_length {runtime.max_length}")
    gen = torch.Generator(device=runtime.device).manual_seed(seed)
    for layer in runtime.cache.layers:
        for name, store in layer.stores.items():
            for start in range(0, context, chunk):
                end = min(context, start + chunk)
                rows = torch.randn(runtime.batch, end - start, store.row_length, device=runtime.device,
                                   generator=gen) * scale
                if store.format.quantized:
                    store.codes[:, start:end], store.scales[:, start:end] = planar.quantize(rows, store.name)
                else:
                    store.data[:, start:end] = quantize(rows, store.name)
                if layer.window is not None:
                    positions = torch.arange(start, end, device=runtime.device)
                    keep = positions >= context - layer.window.size
                    slots = positions[keep] % layer.window.size
                    layer.window.rows[name][:, slots] = rows[:, keep].to(layer.window.rows[name].dtype)
                    layer.window.slot_position[:, slots] = positions[keep]
    runtime.set_lengths([context] * runtime.batch)
