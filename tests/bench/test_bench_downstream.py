import json
import math
from pathlib import Path

import pytest
import torch

from attnlab.bench.context import BenchContext
from attnlab.bench.downstream import (
    ChoiceExample,
    LambadaExample,
    encode_pair,
    evaluate_choice,
    evaluate_lambada,
    load_task,
    run_downstream,
    score_requests,
)
from attnlab.config import ModelConfig
from attnlab.config.bench import DownstreamBench
from attnlab.data.tokenizers import ByteTokenizer
from attnlab.errors import AttnlabError, DataError
from attnlab.model import build_model

BLOCK = 48
SHARED = (Path(__file__).resolve().parents[2] / ".." / "shared").resolve()
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({"vocab_size": 256, "d_model": 32, "num_layers": 2, "block_size": BLOCK,
                                      "init_std": 0.2,  # peaked distributions: choices differ clearly
                                      "attention": {"type": "decoupled", "num_heads": 2, "sem_dim": 16, "geo_dim": 16}})
    return build_model(cfg).eval()


def context(model, **kw):
    return BenchContext(model=model, device=torch.device("cpu"), dtype=torch.float32, run_key="test", **kw)


@torch.no_grad()
def loop_loglik(model, ctx_ids: list[int], cont_ids: list[int]) -> tuple[float, bool]:
    """The obvious computation, one token at a time with its own forward. The documented
    truncation: continuation tokens go in pieces of BLOCK; the tokens of a piece ending at ``e``
    (exclusive, in the joint sequence) see the context from ``e - 1 - BLOCK`` on."""
    whole, total, greedy = ctx_ids + cont_ids, 0.0, True
    for p in range(len(ctx_ids), len(whole)):
        end = min(len(whole), len(ctx_ids) + ((p - len(ctx_ids)) // BLOCK + 1) * BLOCK)
        prefix = whole[max(0, end - 1 - BLOCK): p]
        logprobs = torch.log_softmax(model(torch.tensor([prefix]))[0, -1], dim=-1)
        total += logprobs[whole[p]].item()
        greedy = greedy and int(logprobs.argmax()) == whole[p]
    return total, greedy


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


CHOICE = [{"query": "The cat sat on the", "choices": ["mat.", "moon", "a very long answer here"], "gold": 0},
          {"query": "Question: 2 + 2 =\n", "choices": ["4", "five"], "gold": 1},
          {"query": "x" * 60, "choices": ["y", "z!"], "gold": 1}]  # context longer than block_size


def test_scores_match_an_explicit_loop_and_pick_acc_and_acc_norm(model, tmp_path):
    fmt, examples = load_task(write_jsonl(tmp_path / "t.jsonl", CHOICE))
    assert fmt == "choice"
    assert examples[0].continuations == [" mat.", " moon", " a very long answer here"]
    assert examples[1].continuations == ["4", "five"]  # the query ends with whitespace: no separator
    result = evaluate_choice(model, TOK, examples)
    acc, acc_norm = [], []
    for ex, scores in zip(examples, result["scores"]):
        # the harness's split: a context's trailing whitespace is scored as part of the continuation
        expected = [loop_loglik(model, TOK.encode(c.rstrip()), TOK.encode(c[len(c.rstrip()):] + k))[0]
                    for c, k in zip(ex.contexts, ex.continuations)]
        assert scores == pytest.approx(expected, abs=1e-4)
        normed = [e / len(a) for e, a in zip(expected, ex.answers)]  # characters, as lm-eval
        acc.append(float(max(range(len(expected)), key=expected.__getitem__) == ex.gold))
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == ex.gold))
    assert result["acc"] == pytest.approx(sum(acc) / 3) and result["acc_norm"] == pytest.approx(sum(acc_norm) / 3)
    assert result["n"] == 3 and result["truncated"] == 1 and result["perplexity"] is None
    p = sum(acc) / 3
    assert result["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 2))


def test_acc_norm_divides_by_utf8_bytes_of_the_answer(model):
    """Force a disagreement: two answers whose summed log-likelihoods order one way and whose
    per-byte log-likelihoods order the other way."""
    ex = ChoiceExample(["Q:", "Q:"], [" ab", " abcdefgh"], ["ab", "abcdefgh"], gold=1)
    short, long_ = (loop_loglik(model, TOK.encode("Q:"), TOK.encode(k))[0] for k in ex.continuations)
    result = evaluate_choice(model, TOK, [ex])
    assert result["scores"][0] == pytest.approx([short, long_], abs=1e-4)
    assert result["acc"] == float(long_ > short)
    assert result["acc_norm"] == float(long_ / 8 > short / 2)
    assert short > long_ and long_ / 8 > short / 2  # this tiny model happens to disagree: acc 0, acc_norm 1


def test_long_continuations_are_scored_in_rolling_pieces(model):
    ctx_ids, cont_ids = TOK.encode("abc" * 5), TOK.encode("the quick brown fox jumps over the lazy dog! " * 3)
    assert len(cont_ids) > 2 * BLOCK
    score = score_requests(model, [(ctx_ids, cont_ids), (ctx_ids, cont_ids[:3])], token_budget=100)
    expected, greedy = loop_loglik(model, ctx_ids, cont_ids)
    assert score[0].logprob == pytest.approx(expected, abs=1e-3) and score[0].is_greedy == greedy
    assert score[0].tokens == len(cont_ids) and score[0].truncated and not score[1].truncated
    assert score[1].logprob == pytest.approx(loop_loglik(model, ctx_ids, cont_ids[:3])[0], abs=1e-4)


def test_is_greedy_and_lambada_metrics(model):
    ctx_ids = TOK.encode("Once upon a time")
    greedy_ids, ids = [], list(ctx_ids)
    for _ in range(3):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        greedy_ids.append(nxt)
        ids.append(nxt)
    hit, miss = score_requests(model, [(ctx_ids, greedy_ids), (ctx_ids, greedy_ids[:2] + [(greedy_ids[2] + 1) % 256])])
    assert hit.is_greedy and not miss.is_greedy
    examples = [LambadaExample("Once upon a", " time"), LambadaExample("She said hello", " world")]
    result = evaluate_lambada(model, TOK, examples)
    loops = [loop_loglik(model, TOK.encode(e.context), TOK.encode(e.continuation)) for e in examples]
    tokens = sum(len(e.continuation) for e in examples)
    assert result["nll_per_token"] == pytest.approx(-sum(ll for ll, _ in loops) / tokens, abs=1e-5)
    assert result["ppl_per_token"] == pytest.approx(math.exp(result["nll_per_token"]))
    # lm-eval's LAMBADA perplexity: per item, exp(-mean of the summed log-likelihoods)
    assert result["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in loops) / len(loops)), rel=1e-5)
    assert result["acc"] == sum(g for _, g in loops) / 2 and result["acc_norm"] is None


def test_every_format_parses_and_auto_detects(tmp_path):
    wino = write_jsonl(tmp_path / "w.jsonl", [{"context_options": ["Anna gave Bo a gift because Anna",
                                                                    "Anna gave Bo a gift because Bo"],
                                               "continuation": "was generous.", "gold": 0}])
    hella = write_jsonl(tmp_path / "h.jsonl", [{"ctx": "A man [title] is cooking", "endings": ["a", "b", "c", "d"],
                                                "label": "2"}])
    lamb = write_jsonl(tmp_path / "l.jsonl", [{"context": "He opened the", "continuation": "door"}])
    fmt, (w,) = load_task(wino)
    assert fmt == "winogrande" and w.continuations == [" was generous."] * 2 and w.answers == ["was generous."] * 2
    assert w.contexts[1].endswith("Bo") and w.gold == 0
    fmt, (h,) = load_task(hella)
    assert fmt == "hellaswag" and h.gold == 2 and h.contexts[0] == "A man. is cooking" and h.continuations[0] == " a"
    fmt, (lam,) = load_task(lamb)
    assert fmt == "lambada" and lam.continuation == " door"
    assert load_task(lamb, "lambada")[0] == "lambada"
    with pytest.raises(DataError, match="missing key 'query'"):
        load_task(lamb, "choice")


def test_limit_and_malformed_lines_name_file_and_line(tmp_path):
    good = CHOICE[0]
    path = write_jsonl(tmp_path / "t.jsonl", [good, "", good, good])
    assert len(load_task(path, limit=2)[1]) == 2 and len(load_task(path)[1]) == 3
    cases = [("{not json", "not valid JSON"), ('["a list"]', "expected a JSON object"),
             (json.dumps({**good, "gold": 3}), "'gold'=3 is outside 0..2"),
             (json.dumps({**good, "choices": "mat"}), "'choices' must be list"),
             (json.dumps({"foo": 1}), "cannot detect the task format")]
    for i, (line, message) in enumerate(cases):
        bad = write_jsonl(tmp_path / f"bad{i}.jsonl", [good, line] if i < 4 else [line])
        with pytest.raises(DataError, match=message) as err:
            load_task(bad)
        assert f"bad{i}.jsonl:{2 if i < 4 else 1}:" in str(err.value)
    with pytest.raises(DataError, match="not found"):
        load_task(tmp_path / "missing.jsonl")


def test_encode_pair_keeps_the_joint_tokenization():
    class Words:  # a tokenizer whose merges cross the boundary: "ab" is one token
        eot_id = 99

        def encode(self, text):
            out, i = [], 0
            while i < len(text):
                if text.startswith("ab", i):
                    out.append(0)
                    i += 2
                else:
                    out.append(ord(text[i]))
                    i += 1
            return out

    assert encode_pair(Words(), "xa", "b") == ([120, 97], [98])  # "xab" -> [x, ab] is no extension of [x, a]
    assert encode_pair(Words(), "x", "ab") == ([120], [0])
    assert encode_pair(Words(), "", "ab") == ([99], [0])  # empty context: the end-of-text token


def test_trailing_context_whitespace_moves_into_the_continuation_as_in_lm_eval():
    from attnlab.data.tokenizers import build_tokenizer
    from attnlab.config.data import TokenizerConfig

    path = SHARED / "data" / "tokenizers" / "gpt2.tiktoken"
    if not path.is_file():
        pytest.skip(f"needs {path}")
    tok = build_tokenizer(TokenizerConfig(type="gpt2", path=str(path)))
    ctx, cont = encode_pair(tok, "Answer: ", "Planetary")
    assert ctx == tok.encode("Answer:") and cont == tok.encode("Answer: Planetary")[len(ctx):]
    assert tok.decode(cont) == " Planetary" and len(cont) == len(tok.encode(" Planetary"))
    ctx, cont = encode_pair(tok, "Question?\n", "Yes")  # PIQA-style queries ending in a newline
    assert tok.decode(ctx) == "Question?" and tok.decode(cont) == "\nYes"
    assert encode_pair(tok, "  ", "Hi")[0] == [tok.eot_id]  # whitespace only: the end-of-text token
    # without trailing whitespace nothing moves
    assert encode_pair(tok, "Answer:", " Planetary") == (tok.encode("Answer:"), tok.encode(" Planetary"))


def test_run_downstream_rows_and_tokenizer_errors(model, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", CHOICE)
    lamb = write_jsonl(tmp_path / "l.jsonl", [{"context": "He opened the", "continuation": "door"}])
    cfg = DownstreamBench(tasks=[{"name": "mini", "path": str(path), "limit": 2},
                                 {"name": "lam", "path": str(lamb), "format": "lambada"}])
    rows = run_downstream(cfg, context(model, tokenizer=TOK))
    assert [(r["task"], r["format"], r["n"]) for r in rows] == [("mini", "choice", 2), ("lam", "lambada", 1)]
    for r in rows:
        assert "scores" not in r and all(isinstance(v, (str, int, float, bool, type(None))) for v in r.values())
    with pytest.raises(AttnlabError, match="needs a tokenizer"):
        run_downstream(cfg, context(model))


def test_copa_from_shared_data(model):
    copa = SHARED / "data" / "eval" / "copa.jsonl"
    if not copa.is_file():
        pytest.skip(f"shared reference data not found at {copa} (../shared is absent)")
    cfg = DownstreamBench(tasks=[{"name": "copa", "path": str(copa), "limit": 20}])
    (row,) = run_downstream(cfg, context(model, tokenizer=TOK))
    assert row["task"] == "copa" and row["format"] == "choice" and row["n"] == 20
    assert 0 <= row["acc"] <= 1 and 0 <= row["acc_norm"] <= 1 and row["continuation_tokens"] > 20 * 2 * 10


def test_hellaswag_hf_fields_are_read_as_lm_eval_builds_the_query():
    record = {"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow [title] on",
              "ctx_b": "the window", "endings": ["smiles.", "[header] leaves."], "label": "0"}
    from attnlab.bench.downstream import detect_format, parse_example

    assert detect_format(record) == "hellaswag"
    ex = parse_example(record, "hellaswag", "t:1")
    assert ex.contexts[0] == "Removing ice from car: Then, the man writes over the snow. on The window"
    assert ex.answers == ["smiles.", " leaves."] and ex.gold == 0


def test_acc_norm_divides_by_characters_or_bytes(model):
    from attnlab.bench.downstream import ChoiceExample

    ex = ChoiceExample(["Q:", "Q:"], [" é", " ab"], ["é", "ab"], 0)  # 1 vs 2 characters, 2 vs 2 bytes
    chars = evaluate_choice(model, TOK, [ex])
    by_bytes = evaluate_choice(model, TOK, [ex], acc_norm_by="bytes")
    lls = chars["scores"][0]
    assert chars["acc_norm"] == float(lls[0] / 1 > lls[1] / 2)
    assert by_bytes["acc_norm"] == float(lls[0] / 2 > lls[1] / 2)
