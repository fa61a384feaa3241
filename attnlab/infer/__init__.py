"""Inference: sampling and generation."""

from attnlab.infer.reference import generate_uncached
from attnlab.infer.sampling import SamplingConfig, filtered_probs, select_next

__all__ = ["SamplingConfig", "filtered_probs", "generate_uncached", "select_next"]
