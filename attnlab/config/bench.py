"""Typed benchmark specs, declared per manifest group (``groups[i].benchmarks``) or built from
``attnlab bench`` arguments."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

from attnlab.config.base import _KEYED, StrictModel
from attnlab.config.limits import check_count, limits_from

#: list fields whose items have a lower bound, checked for manifests by ``validate_benchmarks`` (a
#: config built directly leaves them to the benchmark, which raises the same ConfigError)
ITEM_MINIMUM = {"prompt_lengths": 1, "gen_lengths": 0, "contexts": 1, "lengths": 1}


def _check_policy_text(text: str | None) -> str | None:
    """A cache policy string must parse (known fields and formats) at compile time."""
    if text is None:
        return None
    from attnlab.cache.policy import CachePolicy
    from attnlab.errors import ConfigError

    try:
        CachePolicy.parse(text)
    except ConfigError as err:
        reason = str(err).split(" (got ")[0]
        raise ValueError(f"not a valid cache policy: {reason}") from None
    return text


def _check_lengths(value, info: ValidationInfo):
    """Lengths/contexts/seq_len at most ``limits.max_context``."""
    maximum = limits_from(info.context).max_context
    if not isinstance(value, list):
        check_count(value, maximum, info.field_name, "max_context")
        return value
    for i, item in enumerate(value):
        try:
            check_count(item, maximum, f"{info.field_name}[{i}]", "max_context")
        except ValueError as err:
            raise ValueError(f"{_KEYED}[{i}]: {err}") from None
    return value


class _BenchBase(StrictModel):
    id: str | None = Field(None, description="name of this benchmark's outputs; default: its type")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")

    @field_validator("policy", mode="after", check_fields=False)
    @classmethod
    def _check_policy(cls, value: str | None) -> str | None:
        return _check_policy_text(value)

    @property
    def name(self) -> str:
        return self.id or self.type


class PerplexityBench(_BenchBase):
    """Held-out NLL/perplexity by full forward and by token-by-token cached decode per policy."""

    type: Literal["perplexity"] = "perplexity"
    windows: int = Field(16, gt=0)
    seq_len: int | None = Field(None, gt=0, description="default: model.block_size")
    batch_size: int = Field(8, gt=0)
    policies: list[str] = Field(default_factory=list, description="cache policies; empty: fp16 q8_0 q4_0 nf4 + heterogeneous")

    @field_validator("policies", mode="after")
    @classmethod
    def _check_policies(cls, value: list[str]) -> list[str]:
        for i, text in enumerate(value):
            try:
                _check_policy_text(text)
            except ValueError as err:
                raise ValueError(f"{_KEYED}[{i}]: {text!r} is {err}") from None
        return value

    _lengths = field_validator("seq_len", mode="after")(_check_lengths)


class LatencyBench(_BenchBase):
    """Prefill tokens/s and decode ms/token over prompt lengths x generation lengths."""

    type: Literal["latency"] = "latency"
    prompt_lengths: list[int] = Field(default_factory=lambda: [128, 512], min_length=1)
    gen_lengths: list[int] = Field(default_factory=lambda: [32], min_length=1)
    batch_size: int = Field(1, gt=0)
    warmup: int = Field(1, ge=0)
    repeats: int = Field(5, gt=0)
    policy: str | None = None

    _lengths = field_validator("prompt_lengths", "gen_lengths", mode="after")(_check_lengths)


class MemoryBench(_BenchBase):
    """KV bytes/token analytic vs allocated, peak device memory, and the long-context
    decomposition standard fp16 -> this architecture fp16 -> this architecture under its policy."""

    type: Literal["memory"] = "memory"
    contexts: list[int] = Field(default_factory=lambda: [1024, 4096], min_length=1)
    policy: str | None = Field(None, description="default: the run's cache policy, else heterogeneous")
    measure_up_to: int = Field(8192, gt=0, description="measure allocations up to this context; estimate beyond")
    chunk: int | None = Field(None, gt=0, description="prefill chunk; default block_size")

    _lengths = field_validator("contexts", "measure_up_to", mode="after")(_check_lengths)


class ContextSweepBench(_BenchBase):
    """Chunked prefill to each length; last-chunk loss, prefill time, decode-at-context ms, ok.
    A failure (out of memory, ...) is recorded for that point and the sweep continues."""

    type: Literal["context_sweep"] = "context_sweep"
    lengths: list[int] = Field(default_factory=lambda: [512, 2048], min_length=1)
    chunk: int | None = Field(None, gt=0, description="prefill chunk; default block_size")
    policy: str | None = None
    decode_tokens: int = Field(4, gt=0)

    _lengths = field_validator("lengths", mode="after")(_check_lengths)


class DownstreamTask(StrictModel):
    name: str
    path: str
    format: Literal["auto", "choice", "winogrande", "lambada", "hellaswag"] = "auto"
    limit: int | None = Field(None, gt=0)
    acc_norm_by: Literal["chars", "bytes"] = Field("chars", description="acc_norm's length: characters (lm-eval) or UTF-8 bytes")


class DownstreamBench(_BenchBase):
    """Multiple-choice tasks scored by log-likelihood from local JSONL: accuracy and
    length-normalized accuracy (LAMBADA: last-word accuracy and perplexity)."""

    type: Literal["downstream"] = "downstream"
    tasks: list[DownstreamTask] = Field(min_length=1)
    tokenizer_path: str | None = Field(None, description="local .tiktoken for GPT-2-tokenized models")


class QualityBench(_BenchBase):
    """Smoke test against a reference: top-k overlap, top-1 agreement, KL, greedy agreement."""

    type: Literal["quality"] = "quality"
    reference: str = Field("fp16", description="'fp16' (same model, fp16 cache) or 'run:<id>' (another run of the group)")
    policy: str | None = None
    windows: int = Field(4, gt=0)
    seq_len: int | None = Field(None, gt=0)
    top_k: int = Field(5, gt=0)
    greedy_tokens: int = Field(32, gt=0)

    _lengths = field_validator("seq_len", mode="after")(_check_lengths)

    @field_validator("reference", mode="after")
    @classmethod
    def _check_reference(cls, value: str) -> str:
        if value != "fp16" and not (value.startswith("run:") and len(value) > 4):
            raise ValueError("reference must be 'fp16' or 'run:<id>'")
        return value


class RetrievalBench(_BenchBase):
    """Synthetic long-context retrieval (``attnlab.bench.retrieval``): passkey and multi-key
    needle-in-a-haystack; accuracy (bootstrap 95% interval over trials) and the answer's
    log-likelihood per kind x length x depth, through cached decode under ``policy``."""

    type: Literal["retrieval"] = "retrieval"
    kinds: list[Literal["passkey", "multikey"]] = Field(default_factory=lambda: ["passkey", "multikey"], min_length=1)
    lengths: list[int] = Field(min_length=1)
    depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)
    trials: int = Field(10, gt=0)
    policy: str | None = None
    seed: int = Field(0, ge=0)
    num_keys: int | None = Field(None, gt=0, le=32, description="multikey pairs; default 4 (passkey has 1)")
    num_digits: int = Field(5, gt=0, le=32)
    filler: Literal["sentences", "heldout"] = "sentences"
    header: bool = True
    tokenizer_path: str | None = Field(None, description="local .tiktoken for GPT-2-tokenized checkpoints")
    batch_size: int = Field(8, gt=0)

    _lengths = field_validator("lengths", mode="after")(_check_lengths)

    @field_validator("depths", mode="after")
    @classmethod
    def _check_depths(cls, value: list[float]) -> list[float]:
        for i, d in enumerate(value):
            if not 0.0 <= d <= 1.0:
                raise ValueError(f"{_KEYED}[{i}]: depth {d} is outside [0, 1] (a fraction of the haystack)")
        return value


class WikitextBench(_BenchBase):
    """WikiText word perplexity the lm-eval way (``attnlab.bench.wikitext``) from a local WikiText
    file (``wiki.valid.tokens`` format): articles ``first_article`` .. + ``num_articles``."""

    type: Literal["wikitext"] = "wikitext"
    path: str = Field(min_length=1, description="a WikiText file (articles start at ' = Title = ' lines)")
    first_article: int = Field(0, ge=0)
    num_articles: int | None = Field(None, gt=0)
    max_length: int | None = Field(None, gt=0, description="rolling-window length; default and maximum block_size")
    tokenizer_path: str | None = Field(None, description="local .tiktoken for GPT-2-tokenized checkpoints")

    _max_length = field_validator("max_length", mode="after")(_check_lengths)


class LmEvalBench(_BenchBase):
    """lm-evaluation-harness tasks through ``lm_eval.simple_evaluate`` with the ``AttnlabLM``
    adapter (``attnlab.bench.lm_eval_adapter``; needs ``pip install attnlab[eval]``): one row per
    task x metric (value, stderr, documents). Log-likelihoods use full forwards; generation tasks
    decode through the cache under ``policy`` (default: the run's)."""

    type: Literal["lm_eval"] = "lm_eval"
    tasks: list[str] = Field(default_factory=list, description="task (or group) names of lm-eval's registry or the include paths")
    local_tasks: dict[str, str] = Field(default_factory=dict, description="task name -> a local multiple-choice JSONL "
                                        "file ({query, choices, gold}) evaluated as an lm-eval task")
    include_path: list[str] = Field(default_factory=list, description="folders of task YAML files (lm-eval's --include_path)")
    limit: int | None = Field(None, gt=0, description="documents per task (lm-eval's --limit)")
    num_fewshot: int | None = Field(None, ge=0)
    policy: str | None = None
    batch_size: int = Field(1, gt=0)
    bootstrap_iters: int = Field(100000, ge=0, description="bootstrap resamples for the stderr of non-mean metrics")
    seed: int = Field(0, ge=0, description="lm-eval's random seeds (few-shot sampling, shuffles)")
    tokenizer_path: str | None = Field(None, description="local .tiktoken for GPT-2-tokenized checkpoints")

    @field_validator("tasks", mode="after")
    @classmethod
    def _check_tasks(cls, value: list[str]) -> list[str]:
        for i, name in enumerate(value):
            if not name.strip() or "," in name:
                raise ValueError(f"{_KEYED}[{i}]: task name {name!r} must be one non-empty name (no commas)")
        return value

    @field_validator("local_tasks", mode="after")
    @classmethod
    def _check_local(cls, value: dict[str, str]) -> dict[str, str]:
        import re

        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", name):
                raise ValueError(f"local task name {name!r} must be a plain name ([A-Za-z0-9_.-], <= 100)")
        return value

    @model_validator(mode="after")
    def _some_task(self) -> "LmEvalBench":
        if not self.tasks and not self.local_tasks:
            raise ValueError("name at least one task (tasks) or local JSONL file (local_tasks)")
        return self

    @property
    def all_tasks(self) -> list[str]:
        return list(dict.fromkeys([*self.tasks, *self.local_tasks]))


BenchConfig = Annotated[
    Union[PerplexityBench, LatencyBench, MemoryBench, ContextSweepBench, DownstreamBench, QualityBench,
          RetrievalBench, WikitextBench, LmEvalBench],
    Field(discriminator="type"),
]


def validate_benchmarks(items: list, prefix: str, context: dict | None = None) -> list:
    """Validate a list of benchmark mappings; errors name ``prefix[i].key``. ``context``:
    ``{"limits": Limits}`` (lengths and contexts are checked against ``max_context``)."""
    from pydantic import TypeAdapter, ValidationError

    from attnlab.config.base import validation_error_to_config_error
    from attnlab.errors import ConfigError

    adapter = TypeAdapter(BenchConfig)
    out, names = [], set()
    for i, item in enumerate(items):
        where = f"{prefix}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(where, "expected a mapping with a 'type'", item)
        try:
            cfg = adapter.validate_python(item, strict=True, context=context)
        except ValidationError as err:
            raise validation_error_to_config_error(err, where, item) from None
        for key, minimum in ITEM_MINIMUM.items():
            for j, value in enumerate(getattr(cfg, key, None) or []):
                if value < minimum:
                    raise ConfigError(f"{where}.{key}[{j}]", f"must be >= {minimum}", value)
        if cfg.name in names:
            raise ConfigError(f"{where}.id", "duplicate benchmark name in this group; give each an 'id'", cfg.name)
        names.add(cfg.name)
        out.append(cfg)
    return out
