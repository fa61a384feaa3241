"""Attention over caches: one entry point; fused GPU kernels plug in here, the chunked reference
runs everywhere else."""

from attnlab.kernels.reference import cached_attention_reference


def cached_attention(q, cache, scales, *, q_positions, key_lengths, null_k=None, null_v=None,
                     fresh=None, offsets=None):
    """Dispatch attention over a ``LayerCache`` (see ``cached_attention_reference`` for shapes)."""
    return cached_attention_reference(q, cache, scales, q_positions=q_positions, key_lengths=key_lengths,
                                      null_k=null_k, null_v=null_v, fresh=fresh, offsets=offsets)


__all__ = ["cached_attention", "cached_attention_reference"]
