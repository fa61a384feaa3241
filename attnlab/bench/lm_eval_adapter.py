"""An lm-evaluation-harness model wrapping an attnlab model and tokenizer.

``lm_eval`` is optional (``pip install attnlab[eval]``) and imported only when the adapter class
is first used, so ``import attnlab`` works without it::

    from attnlab.bench.lm_eval_adapter import AttnlabLM
    import lm_eval
    lm = AttnlabLM(model, tokenizer, cache_policy="k_sem=q4_0,k_geo=q8_0,v=q4_0")
    results = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

The harness API (``lm_eval.api.model.LM``): each request is an ``Instance`` whose ``args`` are

- ``loglikelihood``: ``(context, continuation)`` -> ``(logprob, is_greedy)``;
- ``loglikelihood_rolling``: ``(text,)`` -> the text's total log-likelihood, scored in disjoint
  rolling windows of ``max_length`` tokens conditioned on the prefix token (end-of-text);
- ``generate_until``: ``(context, gen_kwargs)`` with ``until`` (stop strings; end-of-text is
  added), ``max_gen_toks`` (or its aliases) -> the greedy continuation cut before the first stop
  string.

Log-likelihoods use full forwards (as ``bench.downstream`` does); generation decodes through a
``DecodeRuntime`` under ``cache_policy`` (one kept across requests, reset between them), so it
measures the effect of a quantized KV cache. Sampling
arguments (``do_sample``, ``temperature``) are ignored: generation is greedy.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from attnlab.bench.downstream import encode_pair, score_requests
from attnlab.bench.latency import chunked_prefill, greedy_next
from attnlab.cache import CachePolicy
from attnlab.bench.lm_eval_local import write_local_tasks
from attnlab.errors import AttnlabError, DataError
from attnlab.infer.runtime import DecodeRuntime

DEFAULT_MAX_GEN_TOKS = 256
#: generation-length keys of ``gen_kwargs``, by the harness's priority
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


def rolling_windows(tokens: list[int], prefix_id: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, continuation) windows that predict every token of ``tokens`` exactly
    once, each prediction with as much context as ``max_len`` allows (lm-evaluation-harness's
    ``get_rolling_token_windows(context_len=1)`` + ``make_disjoint_window``)."""
    out: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return out
    first = min(max_len, len(tokens))
    out.append(([prefix_id], tokens[:first]))
    done = first
    while done < len(tokens):
        end = min(len(tokens), done + max_len)
        inputs = tokens[end - max_len - 1: end - 1]  # end > max_len: a full window of context
        preds = tokens[done:end]
        out.append((inputs[: len(inputs) - (len(preds) - 1)], preds))
        done = end
    return out


class AttnlabLMCore:
    """The adapter's logic without the ``lm_eval`` base class (usable and testable without it).

    ``max_length``: context tokens one request may use (default and maximum ``block_size``);
    ``prefix_token_id``: conditions empty contexts and rolling windows (default: the tokenizer's
    end-of-text id, else 0)."""

    def __init__(self, model, tokenizer, *, cache_policy: CachePolicy | str | dict | None = None,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 prefix_token_id: int | None = None, batch_size: int = 1):
        super().__init__()
        if tokenizer is None:
            raise AttnlabError("the lm-eval adapter needs a tokenizer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cache_policy = CachePolicy.parse(cache_policy)
        block = model.config.block_size
        self._max_length = block if max_length is None else min(int(max_length), block)
        self._max_gen_toks = int(max_gen_toks)
        eot = getattr(tokenizer, "eot_id", None)
        self._prefix = prefix_token_id if prefix_token_id is not None else (eot if eot is not None else 0)
        self._batch_size = batch_size
        self._runtime: DecodeRuntime | None = None  # reused by generate_until (its CUDA graph too)

    # ------------------------------------------------------------ properties the harness reads
    @property
    def eot_token_id(self) -> int | None:
        return getattr(self.tokenizer, "eot_id", None)

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name", type(self.tokenizer).__name__))

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(list(tokens))

    def _cache_partial(self, method: str, args: tuple, result: Any) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None:
            hook.add_partial(method, args, result)

    # ------------------------------------------------------------ requests
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation tokens, whether greedy decoding reproduces them)
        per ``(context, continuation)``; contexts are cut from the left to fit ``max_length``."""
        args = [tuple(r.args) for r in requests]
        pairs = []
        for context, continuation in args:
            ctx_ids, cont_ids = encode_pair(self.tokenizer, context, continuation, self._prefix)
            pairs.append((ctx_ids[-self._max_length:], cont_ids))
        out = []
        for a, score in zip(args, self._score(pairs)):
            result = (score.logprob, score.is_greedy)
            self._cache_partial("loglikelihood", a, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text, every token predicted once (rolling windows)."""
        out = []
        for request in requests:
            (text,) = tuple(request.args)[:1]
            windows = rolling_windows(self.tok_encode(text), self._prefix, self._max_length)
            total = sum(s.logprob for s in self._score(windows)) if windows else 0.0
            self._cache_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, stopped at the first stop string (cut before it)
        or after ``max_gen_toks`` tokens."""
        out = []
        for request in requests:
            context, gen_kwargs = tuple(request.args)[:2]
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if self.eot_token_id is not None:
                eos = self.tok_decode([self.eot_token_id])
                until = until + ([eos] if eos not in until else [])
            max_new = next((int(kwargs[k]) for k in MAX_TOKEN_KEYS if kwargs.get(k) is not None), self._max_gen_toks)
            text = self._generate(self.tok_encode(context) or [self._prefix], until, max_new)
            self._cache_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    # ------------------------------------------------------------ internals
    def _score(self, pairs):
        return score_requests(self.model, pairs)

    def _generate(self, ids: list[int], until: list[str], max_new: int) -> str:
        """Prompt = the last ``max_length`` tokens; decoding continues through the cache (RoPE
        positions extrapolate past block_size)."""
        if max_new <= 0:
            return ""
        prompt = torch.tensor([ids[-self._max_length:]], device=self.device)
        runtime = self._decode_runtime(prompt.shape[1] + max_new)
        token = greedy_next(chunked_prefill(runtime, prompt))
        new: list[int] = []
        stop_id = self.eot_token_id
        while True:
            t = int(token)
            if stop_id is not None and t == stop_id:
                break
            new.append(t)
            text = self.tok_decode(new)
            if any(s and s in text for s in until) or len(new) >= max_new:
                break
            token = greedy_next(runtime.step(token))
        text = self.tok_decode(new)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text

    def _decode_runtime(self, max_length: int) -> DecodeRuntime:
        """The kept batch-1 runtime, reset; rebuilt when a request needs more positions."""
        runtime = self._runtime
        if runtime is None or runtime.max_length < max_length:
            self._runtime = None  # free the old cache before allocating the new one
            runtime = self._runtime = DecodeRuntime(self.model, self.cache_policy, batch=1, max_length=max_length)
        else:
            runtime.reset()
        return runtime


_CLASS = None


def lm_eval_class() -> type:
    """``AttnlabLM``: ``AttnlabLMCore`` as a subclass of ``lm_eval.api.model.LM`` (imports
    lm_eval on first use)."""
    global _CLASS
    if _CLASS is None:
        try:
            from lm_eval.api.model import LM
        except ImportError as err:
            raise AttnlabError(f"the lm-eval adapter needs lm-evaluation-harness: pip install lm-eval "
                               f"(or attnlab[eval]) ({err})") from None
        _CLASS = type("AttnlabLM", (AttnlabLMCore, LM), {"__module__": __name__, "__doc__": AttnlabLMCore.__doc__})
    return _CLASS


def __getattr__(name: str):
    if name == "AttnlabLM":
        return lm_eval_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- as a suite benchmark
def _task_manager(include_path: list[str], tasks: list[str]):
    """lm-eval's ``TaskManager`` for ``tasks``: the include paths alone when they define every task
    (indexing lm-eval's own thousands of task YAMLs takes seconds), else with lm-eval's registry."""
    from lm_eval.tasks import TaskManager

    from attnlab.errors import ConfigError

    for i, path in enumerate(include_path):
        if not Path(path).is_dir():
            raise ConfigError(f"include_path[{i}]", "is not a folder of lm-eval task YAML files", path)
    if include_path:
        local = TaskManager(include_path=list(include_path), include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=list(include_path) or None)


def lm_eval_rows(results: dict) -> list[dict]:
    """``simple_evaluate``'s result as flat rows: one per task x metric x filter with ``value``,
    ``stderr`` (None where lm-eval gives none), ``n`` (documents scored), ``num_fewshot``, ``version``."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "filter": filt, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None, "n": n,
                         "num_fewshot": results.get("n-shot", {}).get(task),
                         "version": results.get("versions", {}).get(task)})
    return rows


def run_lm_eval(cfg, ctx) -> list[dict]:
    """lm-eval's ``simple_evaluate`` on ``cfg.tasks`` and ``cfg.local_tasks`` (an ``LmEvalBench``;
    local JSONL files become tasks in a temporary include folder) with ``AttnlabLM`` around
    ``ctx.model`` (generation under ``cfg.policy``, else the run's cache policy); rows as
    ``lm_eval_rows``. Unknown tasks, missing include folders and data lm-eval cannot load are
    one-line errors."""
    from attnlab.bench.context import bench_tokenizer

    cls = lm_eval_class()  # a one-line error without lm-eval
    import lm_eval

    for name, path in cfg.local_tasks.items():
        if not Path(path).is_file():
            raise DataError(f"local task {name}: {path} is not a file (a JSONL of {{query, choices, gold}} records)")
    with tempfile.TemporaryDirectory(prefix="attnlab-lm-eval-") as tmp:
        include = list(cfg.include_path) + ([str(write_local_tasks(cfg.local_tasks, tmp))] if cfg.local_tasks else [])
        manager = _task_manager(include, cfg.all_tasks)
        unknown = [t for t in cfg.all_tasks if t not in set(manager.all_tasks)]
        if unknown:
            where = " or the include paths" if include else " (local files: local_tasks; task YAMLs: include_path)"
            raise AttnlabError(f"unknown lm-eval task(s) {', '.join(unknown)}: not in lm-eval's registry{where}")
        lm = cls(ctx.model, bench_tokenizer(cfg, ctx), cache_policy=cfg.policy or ctx.cache_policy,
                 batch_size=cfg.batch_size)
        results = _evaluate(lm_eval, lm, cfg, manager)
    rows = lm_eval_rows(results or {})
    if not rows:
        raise AttnlabError(f"lm-eval returned no metrics for tasks {', '.join(cfg.all_tasks)}")
    return rows


def _evaluate(lm_eval, lm, cfg, manager) -> dict | None:
    """``simple_evaluate`` with the spec's settings; lm-eval's own failures as one line."""
    seed = cfg.seed
    try:
        return lm_eval.simple_evaluate(
            model=lm, tasks=cfg.all_tasks, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
            bootstrap_iters=cfg.bootstrap_iters, task_manager=manager, log_samples=False, verbosity="ERROR",
            random_seed=seed, numpy_random_seed=1234 + seed, torch_random_seed=1234 + seed,
            fewshot_random_seed=1234 + seed)
    except AttnlabError:
        raise
    except Exception as err:  # a task whose data lm-eval cannot fetch offline, a broken task YAML
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise AttnlabError(f"lm-eval failed on tasks {', '.join(cfg.all_tasks)}: {type(err).__name__}: "
                           f"{first}") from None
