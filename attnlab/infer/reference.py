"""Reference generation: re-runs the full forward over the (windowed) sequence every step.

Slow (quadratic) but obviously right; cached decoding is tested against it.
"""

from __future__ import annotations

import torch

from attnlab.infer.sampling import SamplingConfig, select_next


@torch.no_grad()
def generate_uncached(model, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(0.0),
                      *, seed: int | None = None, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """New token ids after ``prompt`` (stops early after emitting one of ``stop_ids``)."""
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    block = model.config.block_size
    ids = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        window = torch.tensor([ids[-block:]], device=device)
        logits = model(window)[:, -1]
        nxt = int(select_next(logits, sampling, generator)[0])
        ids.append(nxt)
        out.append(nxt)
        if nxt in stop_ids:
            break
    return out
