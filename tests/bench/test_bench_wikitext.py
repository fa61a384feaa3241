"""The wikitext benchmark: article split, detokenizer (hand cases, and lm-eval's own function when
installed), word/byte perplexity arithmetic against an independent per-token sum."""

import math
from pathlib import Path

import pytest
import torch

from attnlab.bench.context import BenchContext
from attnlab.bench.wikitext import (bootstrap_ratio_interval, count_words, run_wikitext, split_articles,
                                    wikitext_detokenize)
from attnlab.config import ModelConfig
from attnlab.config.bench import WikitextBench
from attnlab.data.tokenizers import ByteTokenizer
from attnlab.errors import InputError
from attnlab.model import build_model

SHARED = (Path(__file__).resolve().parents[2] / ".." / "shared").resolve()
WIKI = SHARED / "data" / "text" / "wikitext-2-valid.tokens.txt"

SAMPLE = (" \n = First = \n \n The cat @-@ like animal , 1 @,@ 000 strong ( really ) . \n \n"
          " = = Section = = \n \n It 's \" quoted \" . \n = Second = \n \n Short one . \n")


def test_articles_split_at_top_level_titles_only():
    articles = split_articles(SAMPLE)
    assert [a.split("\n")[0] for a in articles] == [" = First = ", " = Second = "]
    assert " = = Section = = " in articles[0] and articles[1].endswith(" Short one . \n")


def test_detokenizer_by_hand():
    text = split_articles(SAMPLE)[0]
    out = wikitext_detokenize(text)
    assert "cat-like animal, 1,000 strong (really)." in out
    assert "It's \"quoted\"." in out and "== Section ==" in out


def test_detokenizer_equals_lm_evals():
    pw = pytest.importorskip("lm_eval.tasks.wikitext.preprocess_wikitext")
    if not WIKI.is_file():
        pytest.skip(f"needs {WIKI}")
    for article in split_articles(WIKI.read_text(encoding="utf-8")):
        assert wikitext_detokenize(article) == pw.wikitext_detokenizer({"page": article})
        assert pw.process_results({"page": article}, [-1.0])["word_perplexity"][1] == count_words(article)


def test_word_perplexity_is_the_summed_loglik_over_original_words(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({"vocab_size": 256, "d_model": 32, "num_layers": 1, "block_size": 16,
                                      "attention": {"type": "standard", "num_heads": 2}})
    model = build_model(cfg).eval()
    path = tmp_path / "wiki.tokens"
    path.write_text(SAMPLE, encoding="utf-8")
    ctx = BenchContext(model=model, device=torch.device("cpu"), dtype=torch.float32, run_key="t",
                       tokenizer=ByteTokenizer())
    (row,) = run_wikitext(WikitextBench(path=str(path)), ctx)
    # independent: lm-eval's disjoint rolling windows spelled out per token (L = 16): token i of the
    # first window sees the prefix and tokens[:i]; of a later window ending at e, tokens[e - L - 1:i]
    total, nbytes = 0.0, 0
    for article in split_articles(SAMPLE):
        tokens = list(ByteTokenizer().encode(wikitext_detokenize(article)))
        n = len(tokens)
        with torch.no_grad():
            for i in range(n):
                if i < 16:
                    ctx_ids = [0] + tokens[:i]
                else:
                    end = min(n, 16 * (i // 16) + 16)
                    ctx_ids = tokens[end - 17:i]
                logits = model(torch.tensor([ctx_ids]))[0, -1].log_softmax(-1)
                total += float(logits[tokens[i]])
        nbytes += len(article.encode())
    assert row["articles"] == 2 and row["bytes"] == nbytes
    assert row["words"] == sum(count_words(a) for a in split_articles(SAMPLE))
    assert math.isclose(row["word_perplexity"], math.exp(-sum(row["article_loglik"]) / row["words"]), rel_tol=1e-12)
    assert math.isclose(row["bits_per_byte"], -sum(row["article_loglik"]) / nbytes / math.log(2), rel_tol=1e-12)
    assert math.isclose(-row["nll_sum"], total, rel_tol=1e-4)


def test_bootstrap_ratio_interval_brackets_the_estimate():
    ll, w = [-10.0, -30.0, -12.0, -50.0], [5, 10, 6, 20]
    lo, hi = bootstrap_ratio_interval(ll, w)
    est = math.exp(102 / 41)
    assert lo <= est <= hi and lo < hi
    assert bootstrap_ratio_interval([-1.0], [1]) is None


def test_bad_files_are_one_line_errors(tmp_path):
    from attnlab.bench.wikitext import read_articles

    (tmp_path / "none.txt").write_text("no titles here\n")
    with pytest.raises(InputError, match="no WikiText article"):
        read_articles(tmp_path / "none.txt", 0, None)
    with pytest.raises(InputError, match="cannot read"):
        read_articles(tmp_path / "missing.txt", 0, None)
    (tmp_path / "w.txt").write_text(SAMPLE)
    with pytest.raises(InputError, match="first_article=5"):
        read_articles(tmp_path / "w.txt", 5, None)
