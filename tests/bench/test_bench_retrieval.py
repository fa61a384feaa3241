import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from attnlab.bench.retrieval import (
    HEADERS,
    KINDS,
    answer_loglik,
    bootstrap_interval,
    exact_match,
    format_retrieval_table,
    greedy_decode,
    make_task,
    plot_retrieval,
    run_retrieval,
    teacher_forced_logits,
)
from attnlab.cache import CachePolicy
from attnlab.config import ModelConfig
from attnlab.data.tokenizers import ByteTokenizer
from attnlab.errors import ConfigError
from attnlab.model import build_model

BLOCK = 256
TOK = ByteTokenizer()
GPT2_FILE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tokenizers" / "gpt2.tiktoken"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a busy 2-core machine their spinning
    made these tests 15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = {"vocab_size": 256, "d_model": 32, "num_layers": 2, "block_size": BLOCK, "init_std": 0.1,
           "attention": {"type": "standard", "num_heads": 2}}
    return build_model(ModelConfig.model_validate(cfg)).eval()


@pytest.fixture(scope="module")
def gpt2():
    if not GPT2_FILE.is_file():
        pytest.skip(f"no offline GPT-2 tokenizer at {GPT2_FILE}")
    from attnlab.config.data import TokenizerConfig
    from attnlab.data.tokenizers import build_tokenizer

    return build_tokenizer(TokenizerConfig(type="gpt2", path=str(GPT2_FILE)))


# ---------------------------------------------------------------- generation
@pytest.mark.parametrize("kind", KINDS)
def test_generation_is_deterministic_exact_length_and_depth(kind):
    for length in (320, 457, 800):
        for depth in (0.0, 0.3, 0.5, 1.0):
            a = make_task(TOK, kind, length, depth, seed=7)
            assert a == make_task(TOK, kind, length, depth, seed=7)
            assert len(a.prompt) == a.length == length
            text = TOK.decode(list(a.prompt))
            needle = (f" The pass key is {a.answer_text}. Remember it." if kind == "passkey"
                      else f" The value of key {a.key} is {a.answer_text}.")
            needles = re.findall(r" The (?:pass key|value of key \w+) is \d+\.(?: Remember it\.)?", text)
            question = text[text.index(" What is"):]
            header = HEADERS[kind]
            assert text.startswith(header)
            haystack = length - len(header) - sum(map(len, needles)) - len(question)
            assert len(needles) == a.num_keys and haystack > 10
            assert abs(a.depth_actual - depth) <= 0.5 / haystack + 1e-12
            before = a.needle_start - len(header) - sum(len(n) for n in needles if text.index(n) < a.needle_start)
            assert before == round(depth * haystack)
            assert list(a.prompt[a.needle_start: a.needle_start + len(needle)]) == TOK.encode(needle)
            assert text.endswith("The pass key is" if kind == "passkey" else f"The value of key {a.key} is")
            assert TOK.decode(list(a.answer)) == " " + a.answer_text and len(a.answer_text) == 5
    # the needle's content depends on the seed only (paired sweeps); other seeds differ
    assert make_task(TOK, kind, 320, 0.0, seed=7).answer == make_task(TOK, kind, 800, 1.0, seed=7).answer
    assert len({make_task(TOK, kind, 320, 0.5, seed=s).answer for s in range(6)}) > 3


def test_depth_extremes_and_multikey_distractors():
    p0, p1 = make_task(TOK, "passkey", 300, 0.0), make_task(TOK, "passkey", 300, 1.0)
    header = len(TOK.encode(HEADERS["passkey"]))
    assert p0.needle_start == header and p0.depth_actual == 0.0 and p1.depth_actual == 1.0
    needle = len(TOK.encode(f" The pass key is {p1.answer_text}. Remember it."))
    question = len(TOK.encode(" What is the pass key? The pass key is"))
    assert p1.needle_start + needle + question == 300
    m = make_task(TOK, "multikey", 500, 0.5, seed=3, num_keys=6)
    text = TOK.decode(list(m.prompt))
    pairs = re.findall(r"The value of key (\w+) is (\d+)\.", text)
    assert len(pairs) == 6 and len({n for n, _ in pairs}) == 6 and len({v for _, v in pairs}) == 6
    assert (m.key, m.answer_text) in pairs and m.num_keys == 6


def test_filler_stream_is_used_and_wraps():
    stream = np.arange(65, 91)  # "A".."Z", shorter than the haystack
    t = make_task(TOK, "passkey", 300, 0.5, seed=1, filler=stream)
    text = TOK.decode(list(t.prompt))
    assert "ABCDEFGHIJKLMNOPQRSTUVWXYZ" in text and "grass" not in text
    assert t == make_task(TOK, "passkey", 300, 0.5, seed=1, filler=list(stream))


def test_gpt2_tokenizer_lengths(gpt2):
    for kind in KINDS:
        for length in (120, 333):
            t = make_task(gpt2, kind, length, 0.4, seed=2)
            assert len(t.prompt) == length
            assert gpt2.decode(list(t.answer)) == " " + t.answer_text
            assert t.answer_text in gpt2.decode(list(t.prompt))


@pytest.mark.parametrize("call, key", [
    (lambda: make_task(TOK, "passkey", 300, -0.1), "depths"),
    (lambda: make_task(TOK, "passkey", 300, 1.5), "depths"),
    (lambda: make_task(TOK, "passkey", 300, float("nan")), "depths"),
    (lambda: make_task(TOK, "passkey", 100, 0.5), "lengths"),
    (lambda: make_task(TOK, "passkey", 0, 0.5), "lengths"),
    (lambda: make_task(TOK, "needle", 300, 0.5), "kinds"),
    (lambda: make_task(TOK, "passkey", 300, 0.5, num_keys=3), "num_keys"),
    (lambda: make_task(TOK, "multikey", 300, 0.5, num_keys=0), "num_keys"),
    (lambda: make_task(TOK, "passkey", 300, 0.5, num_digits=0), "num_digits"),
    (lambda: make_task(TOK, "passkey", 300, 0.5, filler=[]), "filler"),
])
def test_bad_task_inputs(call, key):
    with pytest.raises(ConfigError) as err:
        call()
    assert str(err.value).startswith(f"{key}:") and "\n" not in str(err.value)


def test_bad_runner_inputs(model):
    def run(**kw):
        args = {"kinds": ["passkey"], "lengths": [150], "depths": [0.5], "trials": 1} | kw
        with pytest.raises(ConfigError) as err:
            run_retrieval(model, TOK, **args)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert run(trials=0).startswith("trials:")
    assert run(kinds=["pass"]).startswith("kinds:")
    assert run(kinds=[]).startswith("kinds:")
    assert run(depths=[2]).startswith("depths:")
    assert run(lengths=[0]).startswith("lengths:")
    msg = run(lengths=[BLOCK])
    assert msg.startswith("lengths:") and f"block_size {BLOCK}" in msg and f"length {BLOCK}" in msg
    assert run(lengths=[BLOCK - 4]).startswith("lengths:")   # the 6-token answer's last input is past block_size
    (ok,) = run_retrieval(model, TOK, kinds=["passkey"], lengths=[BLOCK - 5], depths=[0.5], trials=1,
                          decode=oracle(TOK))
    assert ok["accuracy"] == 1.0
    msg = run(lengths=[100])
    assert msg.startswith("lengths:") and "cannot hold" in msg


# ---------------------------------------------------------------- pure scoring
def test_exact_match_hand_made():
    assert exact_match([1, 2, 3], [1, 2, 3])
    assert exact_match([1, 2, 3, 9, 9], [1, 2, 3])         # trailing tokens after the answer are ignored
    assert not exact_match([1, 2], [1, 2, 3])               # too short
    assert not exact_match([1, 2, 4], [1, 2, 3])            # partial match is wrong
    assert not exact_match([0, 1, 2, 3], [1, 2, 3])         # answer not at the start
    assert not exact_match([], [1]) and not exact_match([1], [])
    assert exact_match(torch.tensor([5, 6]), (5, 6))


def test_answer_loglik_hand_made():
    assert answer_loglik(torch.zeros(3, 10), [1, 2, 3]) == pytest.approx(-math.log(10))
    sharp = torch.full((2, 4), -1e4)
    sharp[0, 1] = sharp[1, 3] = 0.0
    assert answer_loglik(sharp, [1, 3]) == pytest.approx(0.0, abs=1e-9)
    assert answer_loglik(sharp, [1, 2]) == pytest.approx(-5e3, rel=1e-3)   # mean of 0 and -1e4
    logits = torch.tensor([[math.log(3.0), 0.0]])                          # p = 0.75, 0.25
    assert answer_loglik(logits, [1]) == pytest.approx(math.log(0.25))
    with pytest.raises(ValueError):
        answer_loglik(torch.zeros(2, 4), [1])


def test_bootstrap_interval():
    assert bootstrap_interval([1.0] * 5) == (1.0, 1.0) and bootstrap_interval([0.0]) == (0.0, 0.0)
    values = [1.0, 0.0] * 10
    lo, hi = bootstrap_interval(values)
    assert (lo, hi) == bootstrap_interval(values) and lo < 0.5 < hi and 0.2 < lo and hi < 0.8
    assert bootstrap_interval([1.0] * 40 + [0.0] * 10)[0] > bootstrap_interval([1.0] * 4 + [0.0])[0]


# ---------------------------------------------------------------- end to end
def oracle(tokenizer, *, wrong: str | None = None):
    """Reads the prompt and answers the question (``wrong``: a corrupted answer)."""
    def decode(model, prompts, max_new_tokens, policy):
        out = []
        for p in prompts:
            text = tokenizer.decode(p)
            asked = re.search(r"What is the value of key (\w+)\?", text)
            pattern = rf"The value of key {asked.group(1)} is (\d+)\." if asked else r"The pass key is (\d+)\."
            digits = re.search(pattern, text).group(1)
            if wrong == "last_digit":
                digits = digits[:-1] + str((int(digits[-1]) + 1) % 10)
            elif wrong == "other_key":
                digits = next(v for v in re.findall(r"The value of key \w+ is (\d+)\.", text) if v != digits)
            out.append(tokenizer.encode(" " + digits) + ([ord("!")] * 2 if wrong is None else []))
        return out
    return decode


def test_suite_end_to_end_two_policies(model):
    common = {"kinds": KINDS, "lengths": [96, 160], "depths": [0.0, 1.0], "trials": 2, "seed": 1,
              "header": False}
    with pytest.raises(ConfigError, match="multikey"):  # 96 tokens cannot hold multikey: checked before running
        run_retrieval(model, TOK, **common, policy="fp32", decode=lambda *a: pytest.fail("ran"))
    common["kinds"] = ["passkey"]
    notes = []
    fp32 = run_retrieval(model, TOK, **common, policy="fp32", progress=notes.append)
    q8 = run_retrieval(model, TOK, **common, policy="q8_0")
    assert len(fp32) == len(q8) == 4 and len(notes) == 4 and "accuracy" in notes[0]
    for a, b in zip(fp32, q8):
        assert (a["kind"], a["length"], a["depth"], a["trials"]) == (b["kind"], b["length"], b["depth"], 2)
        assert a["policy"] == "fp32" and b["policy"] == "q8_0"
        assert a["accuracy"] == 0.0 and a["accuracy_lo"] <= a["accuracy"] <= a["accuracy_hi"]
        assert -math.log(256) - 2 < a["answer_loglik"] < 0 and a["answer_tokens"] == 6
        assert a["answer_loglik"] == pytest.approx(b["answer_loglik"], abs=0.05)
        assert all(isinstance(v, (str, int, float)) for v in a.values())
    multi = run_retrieval(model, TOK, kinds=["multikey"], lengths=[200], depths=[0.25], trials=2, num_keys=2)
    assert multi[0]["num_keys"] == 2 and multi[0]["policy"] == "native"


def test_greedy_decode_agrees_with_teacher_forcing(model):
    """The runtime's greedy tokens, teacher-forced back, are each the argmax of their logits."""
    tasks = [make_task(TOK, "passkey", 140, d, seed=4) for d in (0.0, 1.0)]
    prompts = [list(t.prompt) for t in tasks]
    policy = CachePolicy.parse("fp32")
    generated = greedy_decode(model, prompts, 6, policy)
    logits = teacher_forced_logits(model, policy, prompts, generated)
    for gen, lg in zip(generated, logits):
        assert lg.argmax(-1).tolist() == gen


def test_oracle_scores_100_and_wrong_answers_score_0(model):
    args = {"lengths": [240], "trials": 3, "policy": "fp32", "num_keys": 3}
    right = run_retrieval(model, TOK, kinds=KINDS, depths=[0.0, 0.5, 1.0], decode=oracle(TOK), **args)
    assert [r["accuracy"] for r in right] == [1.0] * 6 and all(r["accuracy_lo"] == 1.0 for r in right)
    assert [r["num_keys"] for r in right] == [1] * 3 + [3] * 3
    rows = run_retrieval(model, TOK, kinds=KINDS, depths=[0.5], decode=oracle(TOK, wrong="last_digit"), **args)
    assert [r["accuracy"] for r in rows] == [0.0] * 2 and all(r["accuracy_hi"] == 0.0 for r in rows)
    (row,) = run_retrieval(model, TOK, kinds=["multikey"], depths=[0.5], decode=oracle(TOK, wrong="other_key"), **args)
    assert row["accuracy"] == 0.0
    # half right, half wrong: the interval is wide and contains 0.5
    flaky = oracle(TOK)
    calls = []

    def half(model_, prompts, n, policy):
        calls.append(1)
        out = flaky(model_, prompts, n, policy)
        return [o if i % 2 == 0 else o[:5] + [o[5] ^ 1] + o[6:] for i, o in enumerate(out)]

    (row,) = run_retrieval(model, TOK, kinds=["passkey"], lengths=[140], depths=[0.5], trials=10, decode=half,
                           batch_size=10)
    assert calls == [1] and row["accuracy"] == 0.5 and row["accuracy_lo"] < 0.5 < row["accuracy_hi"]


def test_table_and_plot(model, tmp_path):
    rows = run_retrieval(model, TOK, kinds=["passkey"], lengths=[130, 200], depths=[0.0, 1.0], trials=1,
                         decode=oracle(TOK))
    table = format_retrieval_table(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 4 and lines[0].startswith("| kind |")
    assert "| passkey | 1 | native | 130 | 0 | 1 | 1.000 | [1.000, 1.000] |" in lines[2]
    pytest.importorskip("matplotlib")
    path = plot_retrieval(rows, tmp_path / "plots" / "retrieval.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- as a suite benchmark
def spec(**kw):
    from types import SimpleNamespace

    base = {"kinds": ["passkey"], "lengths": [140], "depths": [0.5], "trials": 2, "policy": None, "seed": 0,
            "num_keys": None, "num_digits": 5, "filler": "sentences", "header": True, "tokenizer_path": None,
            "batch_size": 8}
    return SimpleNamespace(**(base | kw))


def test_suite_entry_point(model):
    from attnlab.bench.context import BenchContext
    from attnlab.bench.retrieval import run_retrieval_bench
    from attnlab.errors import AttnlabError

    heldout = np.frombuffer(b"Once upon a time there was a little fox who liked to run. " * 4, dtype=np.uint8)
    ctx = BenchContext(model=model, device=torch.device("cpu"), dtype=torch.float32, run_key="t", tokenizer=TOK,
                       cache_policy="q8_0", heldout=heldout)
    (row,) = run_retrieval_bench(spec(), ctx)
    assert row["policy"] == "q8_0" and row["trials"] == 2                 # the run's policy
    (row,) = run_retrieval_bench(spec(filler="heldout", policy="fp32"), ctx)
    assert row["policy"] == "fp32" and row["answer_loglik"] < 0
    ctx.heldout = None
    with pytest.raises(ConfigError, match="^filler: 'heldout' needs"):
        run_retrieval_bench(spec(filler="heldout"), ctx)
    ctx.tokenizer = None
    with pytest.raises(AttnlabError, match="needs a tokenizer"):
        run_retrieval_bench(spec(), ctx)


def test_tokenizer_outside_the_model_vocab(model, gpt2):
    with pytest.raises(ConfigError, match="^tokenizer: token id .* outside the model's vocab"):
        run_retrieval(model, gpt2, kinds=["passkey"], lengths=[100], depths=[0.5], trials=1)


def test_retrieval_is_a_manifest_benchmark_type():
    from attnlab.bench.suite import RUNNERS
    from attnlab.config.bench import validate_benchmarks
    from attnlab.errors import ConfigError

    [cfg] = validate_benchmarks([{"type": "retrieval", "lengths": [200], "depths": [0.0, 1.0], "trials": 2}], "b")
    assert cfg.kinds == ["passkey", "multikey"] and cfg.name == "retrieval"
    assert RUNNERS["retrieval"] == "attnlab.bench.retrieval:run_retrieval_bench"
    with pytest.raises(ConfigError, match=r"b\[0\]\.depths\[1\]: depth 1.5 is outside \[0, 1\]"):
        validate_benchmarks([{"type": "retrieval", "lengths": [200], "depths": [0.5, 1.5]}], "b")
    with pytest.raises(ConfigError, match=r"b\[0\]\.lengths\[0\]"):
        validate_benchmarks([{"type": "retrieval", "lengths": [0]}], "b")
