"""Typed spec of training/evaluation data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from attnlab.config.base import StrictModel
from attnlab.config.upcycle import TeacherSamples


class TokenizerConfig(StrictModel):
    """``byte``: UTF-8 bytes (vocab 256). ``gpt2``: tiktoken's GPT-2 BPE (vocab 50257), read from
    ``path`` (a local ``.tiktoken`` file) when given, else from tiktoken's cache/download."""

    type: Literal["byte", "gpt2"] = "byte"
    path: str | None = None


class DataConfig(StrictModel):
    """Where tokens come from.

    - ``source: tokens`` — a prepared token file: ``.npy`` (uint16/uint32/int32/int64) or raw
      ``.bin`` read as ``bin_dtype``; memory-mapped.
    - ``source: text`` — a text file, a folder of text files, or a ``.jsonl`` file (field
      ``text_field``), tokenized once with ``tokenizer`` into a cached token file.
    - ``source: embedded`` — the running interpreter's standard-library sources: exists on every
      machine, needs no download.
    - ``source: teacher`` — sequences sampled from the run's teacher model (``teacher_samples``),
      for upcycling a model without its tokenizer or corpus.

    The last ``val_fraction`` of the tokens is the held-out split (never trained on).
    """

    source: Literal["tokens", "text", "embedded", "teacher"] = "embedded"
    path: str | None = None
    bin_dtype: Literal["uint16", "uint32"] = "uint16"
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    text_field: str = "text"
    max_tokens: int | None = Field(None, gt=0, description="cap on corpus tokens (embedded/text)")
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    cache_dir: str | None = Field(None, description="where prepared token files go; default <out_dir>/<manifest name>/.data")
    teacher_samples: TeacherSamples = Field(default_factory=TeacherSamples)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.source in ("tokens", "text") and not self.path:
            raise ValueError(f"source '{self.source}' needs 'path'")
        if self.source in ("embedded", "teacher") and self.path:
            raise ValueError(f"source '{self.source}' takes no 'path'")
        return self
