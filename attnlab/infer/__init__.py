"""Inference: the decode runtime (one decode loop), sampling, cached generation (chunked prefill + batched decode) and speculative
decoding with a draft model."""

from attnlab.infer.generate import GenerationResult, GenerationStats, generate
from attnlab.infer.runtime import DecodeRuntime
from attnlab.infer.reference import generate_uncached
from attnlab.infer.sampling import SamplingConfig, filtered_probs, select_next
from attnlab.infer.speculative import (SpeculativeResult, SpeculativeStats, accept_or_resample,
                                       speculative_generate, speculative_step_distribution)

__all__ = ["DecodeRuntime", "GenerationResult", "GenerationStats", "SamplingConfig", "SpeculativeResult", "SpeculativeStats",
           "accept_or_resample", "filtered_probs", "generate", "generate_uncached", "select_next",
           "speculative_generate", "speculative_step_distribution"]
