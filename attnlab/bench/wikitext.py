"""The ``wikitext`` benchmark: WikiText word perplexity computed the way lm-evaluation-harness's
``wikitext`` task does, from a local WikiText file.

lm-eval's task reads WikiText at the document level (one Wikipedia article per document), feeds
each article through its WikiText detokenizer (`` @-@ `` -> ``-``, spaces before punctuation and
inside brackets and quotes removed, ...), scores the detokenized text by
``loglikelihood_rolling`` (disjoint windows of ``max_length`` tokens, each token predicted once,
the first conditioned on end-of-text) and reports, summed over articles,

    word_perplexity = exp(-sum(loglik) / sum(words)),  words = len(re.split(r"\\s+", article))
    byte_perplexity = exp(-sum(loglik) / sum(bytes)),  bits_per_byte = -sum(loglik) / sum(bytes) / ln 2

where words and UTF-8 bytes are counted on the article *before* detokenization. Those are the
numbers papers (e.g. Attamba's WikiText-2 word perplexity) quote. Here the articles come from a
local file in the WikiText format (``wiki.valid.tokens`` / ``.raw``): an article starts at a line
`` = Title = `` (one ``=`` on each side; sections have more). The token-level perplexity of the
same predictions and a bootstrap interval over articles (a ratio of sums, resampled by article)
are recorded beside them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from attnlab.bench.context import BenchContext, bench_tokenizer
from attnlab.bench.downstream import score_requests
from attnlab.bench.lm_eval_adapter import rolling_windows
from attnlab.errors import AttnlabError, InputError

ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")


def split_articles(text: str) -> list[str]:
    """WikiText text -> articles, each from its title line to the line before the next title
    (lines joined with "\\n", each article ending in one; text before the first title dropped)."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if ARTICLE_TITLE.match(line)]
    bounds = starts + [len(lines)]
    return ["\n".join(lines[a:b]).rstrip("\n") + "\n" for a, b in zip(bounds, bounds[1:])]


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's word tokenization (the rules of lm-eval's ``wikitext_detokenizer``)."""
    s = text
    s = s.replace("s '", "s'")  # contractions
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)  # the harness's (literal-slash) pattern, kept as is
    for sep, plain in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):  # number separators
        s = s.replace(sep, plain)
    for mark in (":", ";", ".", "!", "?", ","):  # punctuation
        s = s.replace(f" {mark} ", f"{mark} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)  # brackets
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)  # quotes
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for heading, joined in (("= = = =", "===="), ("= = =", "==="), ("= =", "==")):  # section markers
        s = s.replace(heading, joined)
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ")
    s = s.replace(" 's", "'s")
    return s


def count_words(article: str) -> int:
    return len(re.split(r"\s+", article))


def weighted_perplexity(loglik: list[float], weights: list[int]) -> float:
    return math.exp(-sum(loglik) / sum(weights))


def bootstrap_ratio_interval(loglik: list[float], weights: list[int], *, resamples: int = 2000,
                             seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap over articles of exp(-sum(loglik) / sum(weights)); None below 2."""
    import numpy as np

    if len(loglik) < 2:
        return None
    ll, w = np.asarray(loglik, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(ll), size=(resamples, len(ll)))
    ppl = np.exp(-ll[idx].sum(1) / w[idx].sum(1))
    alpha = (1 - level) / 2
    return float(np.quantile(ppl, alpha)), float(np.quantile(ppl, 1 - alpha))


def read_articles(path: str | Path, first: int, count: int | None) -> list[str]:
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"wikitext benchmark: cannot read {path}: {err}") from None
    articles = split_articles(text)
    if not articles:
        raise InputError(f"wikitext benchmark: {path} has no WikiText article (no ' = Title = ' line)")
    if first >= len(articles):
        raise InputError(f"wikitext benchmark: first_article={first} but {path} has {len(articles)} articles")
    return articles[first: first + count if count is not None else None]


def run_wikitext(cfg, ctx: BenchContext) -> list[dict]:
    """One row: articles, words, bytes, tokens, ``word_perplexity`` (with its bootstrap interval
    over articles), ``byte_perplexity``, ``bits_per_byte``, ``token_perplexity``, per article
    log-likelihoods and word counts."""
    tokenizer = bench_tokenizer(cfg, ctx)
    articles = read_articles(cfg.path, cfg.first_article, cfg.num_articles)
    block = ctx.model.config.block_size
    max_len = min(cfg.max_length or block, block)
    eot = getattr(tokenizer, "eot_id", None)
    prefix = eot if eot is not None else 0
    loglik, words, nbytes, ntokens = [], [], [], []
    for article in articles:
        ids = list(tokenizer.encode(wikitext_detokenize(article)))
        windows = rolling_windows(ids, prefix, max_len)
        loglik.append(sum(s.logprob for s in score_requests(ctx.model, windows)) if windows else 0.0)
        words.append(count_words(article))
        nbytes.append(len(article.encode("utf-8")))
        ntokens.append(len(ids))
    if not sum(ntokens):
        raise AttnlabError("wikitext benchmark: the articles tokenized to nothing")
    interval = bootstrap_ratio_interval(loglik, words)
    total = -sum(loglik)
    return [{
        "articles": len(articles), "words": sum(words), "bytes": sum(nbytes), "tokens": sum(ntokens),
        "max_length": max_len, "nll_sum": total,
        "word_perplexity": weighted_perplexity(loglik, words),
        "word_perplexity_low": interval[0] if interval else None,
        "word_perplexity_high": interval[1] if interval else None,
        "byte_perplexity": weighted_perplexity(loglik, nbytes),
        "bits_per_byte": total / sum(nbytes) / math.log(2),
        "token_perplexity": weighted_perplexity(loglik, ntokens),
        "article_loglik": loglik, "article_words": words,
    }]


__all__ = ["bootstrap_ratio_interval", "count_words", "read_articles", "run_wikitext", "split_articles",
           "weighted_perplexity", "wikitext_detokenize"]
