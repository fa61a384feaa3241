"""Validation of what callers hand to the decode runtime: prompts and prefill chunk sizes."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from attnlab.errors import InputError

PAD_ID = 0  # fed by finished sequences and as right padding; never read back (beyond each length)


# ---------------------------------------------------------------- validation
def check_prompts(model, prompts) -> list[list[int]]:
    """``prompts`` as a list of non-empty lists of in-vocab ints, else a one-line InputError."""
    if not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)) or not prompts:
        raise InputError("prompts: expected a non-empty list of token-id lists")
    if not isinstance(prompts[0], (Sequence, torch.Tensor)) or isinstance(prompts[0], (str, bytes)):
        raise InputError("prompts: expected a list of token-id lists (wrap a single prompt as [prompt])")
    vocab = model.config.vocab_size
    out = []
    for i, prompt in enumerate(prompts):
        ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        if not ids:
            raise InputError(f"prompt {i} is empty: a prompt needs at least one token")
        try:
            ids = [operator.index(t) for t in ids]  # ints, numpy ints; not floats or strings
        except TypeError:
            raise InputError(f"prompt {i}: token ids must be integers, got {ids[:8]!r}") from None
        for t in ids:
            if not 0 <= t < vocab:
                raise InputError(f"prompt {i}: token id {t} is outside the model's vocab (size {vocab})")
        out.append(ids)
    return out


def check_chunk_size(model, chunk_size: int | None) -> int:
    block = model.config.block_size
    chunk = block if chunk_size is None else chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= block:
        raise InputError(f"prefill chunk size must lie in 1..block_size ({block}), got {chunk_size!r}")
    return chunk


