"""The lm-evaluation-harness adapter. Its logic (``AttnlabLMCore``) is tested without lm_eval; the
subclass of ``lm_eval.api.model.LM`` only where lm_eval is installed."""

import importlib
import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch

from attnlab.bench.lm_eval_adapter import AttnlabLMCore, rolling_windows
from attnlab.config import ModelConfig
from attnlab.data.tokenizers import ByteTokenizer
from attnlab.errors import AttnlabError
from attnlab.infer.reference import generate_uncached
from attnlab.model import build_model

BLOCK = 32
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({"vocab_size": 256, "d_model": 32, "num_layers": 2, "block_size": BLOCK,
                                      "init_std": 0.2,
                                      "attention": {"type": "decoupled", "num_heads": 2, "sem_dim": 16, "geo_dim": 16}})
    return build_model(cfg).eval()


def req(*args):
    """Stands in for lm_eval's Instance: the adapter reads only ``.args``."""
    return SimpleNamespace(args=args)


@torch.no_grad()
def token_logprobs(model, tokens: list[int], prefix: int) -> list[float]:
    """log p(tokens[i] | prefix, tokens[:i]) by one full forward (len(tokens) <= BLOCK)."""
    ids = torch.tensor([[prefix] + tokens[:-1]])
    logprobs = torch.log_softmax(model(ids)[0], dim=-1)
    return [logprobs[i, t].item() for i, t in enumerate(tokens)]


def test_loglikelihood_and_empty_context(model):
    lm = AttnlabLMCore(model, TOK, prefix_token_id=10)
    (ll, greedy), (ll_empty, _) = lm.loglikelihood([req("Hello", " world"), req("", "abc")])
    ids = TOK.encode("Hello world")
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], dim=-1)
    assert ll == pytest.approx(sum(logprobs[i - 1, ids[i]].item() for i in range(5, len(ids))), abs=1e-4)
    assert greedy == all(int(logprobs[i - 1].argmax()) == ids[i] for i in range(5, len(ids)))
    assert ll_empty == pytest.approx(sum(token_logprobs(model, TOK.encode("abc"), prefix=10)), abs=1e-4)


def test_rolling_windows_predict_every_token_once_with_maximal_context():
    tokens = list(range(10))
    windows = rolling_windows(tokens, prefix_id=99, max_len=4)
    assert windows == [([99], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
    # joined, each window is one forward of at most max_len inputs
    assert all(len(c) + len(p) - 1 <= 4 for c, p in windows)
    assert rolling_windows([], 99, 4) == []


def test_loglikelihood_rolling_sums_every_token(model):
    lm = AttnlabLMCore(model, TOK, prefix_token_id=10)
    short = "A short text."
    (total,) = lm.loglikelihood_rolling([req(short)])
    assert total == pytest.approx(sum(token_logprobs(model, TOK.encode(short), prefix=10)), abs=1e-4)
    long_text = "Rolling windows cover a text longer than one block, token by token."
    tokens = TOK.encode(long_text)
    expected = 0.0
    with torch.no_grad():
        for ctx, pred in rolling_windows(tokens, 10, BLOCK):
            inputs = (ctx + pred)[:-1]
            logprobs = torch.log_softmax(model(torch.tensor([inputs]))[0], -1)[-len(pred):]
            expected += sum(logprobs[i, t].item() for i, t in enumerate(pred))
    assert lm.loglikelihood_rolling([req(long_text)])[0] == pytest.approx(expected, abs=1e-3)


def test_generate_until_is_greedy_and_honours_stops_and_max_gen_toks(model):
    lm = AttnlabLMCore(model, TOK, cache_policy="fp32")
    prompt = "Once upon"
    reference = generate_uncached(model, TOK.encode(prompt), 12)
    (text,) = lm.generate_until([req(prompt, {"max_gen_toks": 12, "until": []})])
    assert TOK.encode(text) == reference or text == TOK.decode(reference)
    (short,) = lm.generate_until([req(prompt, {"max_new_tokens": 3})])  # an alias of max_gen_toks
    assert short == TOK.decode(reference[:3])
    stop = TOK.decode(reference[4:6])
    (cut,) = lm.generate_until([req(prompt, {"max_gen_toks": 12, "until": stop, "do_sample": False})])
    assert cut == TOK.decode(reference)[: TOK.decode(reference).index(stop)]
    assert lm.generate_until([req(prompt, {"max_gen_toks": 0})]) == [""]


def test_core_properties_and_errors(model):
    lm = AttnlabLMCore(model, TOK, max_length=1000)
    assert lm.max_length == BLOCK and lm.prefix_token_id == 0 and lm.eot_token_id is None
    assert lm.tok_decode(lm.tok_encode("héllo")) == "héllo" and lm.tokenizer_name == "byte"
    with pytest.raises(AttnlabError, match="tokenizer"):
        AttnlabLMCore(model, None)


def test_attnlab_imports_without_lm_eval(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    monkeypatch.setitem(sys.modules, "lm_eval.api", None)
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    import attnlab.bench.lm_eval_adapter as adapter

    adapter = importlib.reload(adapter)
    assert adapter.AttnlabLMCore is not None
    with pytest.raises(AttnlabError, match="pip install lm-eval"):
        _ = adapter.AttnlabLM


def test_subclass_of_the_harness_lm(model):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional (pip install lm-eval)")
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM

    from attnlab.bench.lm_eval_adapter import AttnlabLM

    lm = AttnlabLM(model, TOK, cache_policy="q8_0")
    assert isinstance(lm, LM) and lm.rank == 0 and lm.world_size == 1
    requests = [Instance("loglikelihood", {}, ("Hello", " world"), 0),
                Instance("loglikelihood_rolling", {}, "Hello world", 1),
                Instance("generate_until", {}, ("Hello", {"until": ["\n"], "max_gen_toks": 4}), 2)]
    (ll, greedy), = lm.loglikelihood(requests[:1])
    assert ll < 0 and isinstance(greedy, bool)
    (rolling,) = lm.loglikelihood_rolling(requests[1:2])
    assert rolling == pytest.approx(AttnlabLMCore(model, TOK).loglikelihood_rolling([req("Hello world")])[0])
    (text,) = lm.generate_until(requests[2:])
    assert isinstance(text, str) and "\n" not in text


def test_lm_eval_spec_needs_a_task_and_plain_local_names():
    from attnlab.config.bench import validate_benchmarks
    from attnlab.errors import ConfigError

    (spec,) = validate_benchmarks([{"type": "lm_eval", "local_tasks": {"arc": "a.jsonl"}, "tasks": ["piqa", "arc"]}],
                                  "bench")
    assert spec.all_tasks == ["piqa", "arc"]
    for bad, needle in (({}, "at least one task"), ({"local_tasks": {"../x": "a.jsonl"}}, "plain name"),
                        ({"tasks": ["a,b"]}, "no commas")):
        with pytest.raises(ConfigError, match=needle):
            validate_benchmarks([{"type": "lm_eval", **bad}], "bench")


def test_local_task_yaml_names_the_file_and_the_loader(tmp_path):
    from attnlab.bench.lm_eval_local import LOADER_MODULE, load_jsonl, write_local_tasks

    data = tmp_path / "mc.jsonl"
    data.write_text('{"query": "Q: 1+1?", "choices": ["2", "3"], "gold": 0}\n\n', encoding="utf-8")
    folder = write_local_tasks({"mine": str(data)}, tmp_path / "tasks")
    text = (folder / "mine.yaml").read_text()
    assert "task: \"mine\"" in text and str(data.resolve()) in text and f"!function {LOADER_MODULE}.load_jsonl" in text
    assert (folder / f"{LOADER_MODULE}.py").is_file()
    if importlib.util.find_spec("datasets") is not None:
        assert load_jsonl(str(data), version=1.0)["test"][0] == {"query": "Q: 1+1?", "choices": ["2", "3"], "gold": 0}
