"""Decoder language model assembled from per-layer specs and topology nodes."""

from attnlab.model.decoder import DecoderLM, build_model

__all__ = ["DecoderLM", "build_model"]
