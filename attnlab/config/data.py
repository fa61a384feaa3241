"""Typed spec of training/evaluation data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from attnlab.config.base import StrictModel
from attnlab.config.upcycle import TeacherSamples


class TokenizerConfig(StrictModel):
    """``byte``: UTF-8 bytes (vocab 256). ``gpt2``: tiktoken's GPT-2 BPE (vocab 50257), read from
    ``path`` (a local ``.tiktoken`` file) when given, else from tiktoken's cache/download."""

    type: Literal["byte", "gpt2"] = "byte"
    path: str | None = None


class RetrievalMix(StrictModel):
    """``data.source: retrieval_mix``: fixed-length documents of ``length + 1`` tokens, each a
    synthetic retrieval task (``attnlab.data.retrieval_tasks.make_task``: prompt, answer,
    ``terminator``) or a plain-text window of the text at ``data.path``, built by
    ``attnlab.data.retrieval_mix``. Training windows of ``length`` tokens start at document starts.
    ``documents`` train and ``heldout_documents`` held-out documents come from disjoint task seeds
    and disjoint text (the last ``val_fraction`` of the text is the held-out text)."""

    length: int = Field(gt=8, description="tokens per training window; documents have length + 1")
    task_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of documents that are tasks")
    kinds: list[Literal["passkey", "multikey"]] = Field(default_factory=lambda: ["passkey", "multikey"], min_length=1)
    num_keys: int = Field(4, gt=0, le=32, description="multikey pairs per task (passkey always has 1)")
    num_digits: int = Field(5, gt=0, le=32)
    documents: int = Field(4096, gt=0, description="train documents")
    heldout_documents: int = Field(64, gt=0, description="held-out documents (never trained on)")
    sentence_filler: float = Field(0.25, ge=0.0, le=1.0,
                                   description="share of tasks whose haystack is the cycled FILLER_SENTENCES "
                                               "(the rest: the text at data.path)")
    min_task_length: int | None = Field(None, gt=0, description="tasks get a random prompt length in "
                                        "[min_task_length, the longest that fits], the document's rest is text; "
                                        "default: every task fills its document")
    terminator: str = Field(".", min_length=1, description="text after the answer")
    follow_up: bool = Field(False, description="multikey tasks also ask about every other key (with answers) "
                                              "after the first answer: more answer tokens per document")
    header: bool = True
    seed: int = Field(0, ge=0, lt=2 ** 31)

    @field_validator("kinds", mode="after")
    @classmethod
    def _unique_kinds(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"kinds {value} repeat a kind")
        return value

    @model_validator(mode="after")
    def _check(self) -> "RetrievalMix":
        if self.min_task_length is not None and self.min_task_length > self.length:
            raise ValueError(f"min_task_length {self.min_task_length} exceeds length {self.length}")
        if "multikey" in self.kinds and self.num_keys > 9 * 10 ** (self.num_digits - 1):
            raise ValueError(f"num_digits {self.num_digits} gives too few distinct values for {self.num_keys} keys")
        return self


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
    - ``source: retrieval_mix`` — fixed-length documents mixing synthetic retrieval tasks (passkey,
      multi-key) with windows of the text file at ``path`` (``retrieval_mix``).

    The last ``val_fraction`` of the tokens is the held-out split (never trained on); for
    ``retrieval_mix``, separately seeded held-out documents over the last ``val_fraction`` of the text.
    """

    source: Literal["tokens", "text", "embedded", "teacher", "retrieval_mix"] = "embedded"
    path: str | None = None
    bin_dtype: Literal["uint16", "uint32"] = "uint16"
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    text_field: str = "text"
    max_tokens: int | None = Field(None, gt=0, description="cap on corpus tokens (embedded/text)")
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    cache_dir: str | None = Field(None, description="where prepared token files go; default <out_dir>/<manifest name>/.data")
    teacher_samples: TeacherSamples = Field(default_factory=TeacherSamples)
    retrieval_mix: RetrievalMix | None = None

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.source == "retrieval_mix" and self.retrieval_mix is None:
            raise ValueError("source 'retrieval_mix' needs the 'retrieval_mix' section (at least its length)")
        if self.source != "retrieval_mix" and self.retrieval_mix is not None:
            raise ValueError(f"'retrieval_mix' is only read by source 'retrieval_mix', not '{self.source}'")
        if self.source in ("tokens", "text", "retrieval_mix") and not self.path:
            raise ValueError(f"source '{self.source}' needs 'path'")
        if self.source in ("embedded", "teacher") and self.path:
            raise ValueError(f"source '{self.source}' takes no 'path'")
        return self
