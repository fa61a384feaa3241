"""attnlab against lm-evaluation-harness itself (skipped without lm_eval): the same requests through
lm-eval's ``hf`` model on an exported folder and through ``AttnlabLM`` give the same log-likelihoods
and choices (standard -> Llama and DBA -> partial-rotary Phi3 exports, contexts with trailing
whitespace); ``attnlab eval`` runs a local JSONL file as a task, saves a bench record, and scores what
attnlab's own downstream benchmark scores on the same file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional (pip install lm-eval)")
pytest.importorskip("transformers", reason="lm-eval's hf model needs transformers")

from lm_eval.api.instance import Instance  # noqa: E402

from attnlab.api import build_model  # noqa: E402
from attnlab.bench.lm_eval_adapter import lm_eval_class  # noqa: E402
from attnlab.config.data import TokenizerConfig  # noqa: E402
from attnlab.convert import export_hf  # noqa: E402
from attnlab.data.tokenizers import ByteTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EVAL = REPO.parent / "shared" / "data" / "eval"
GPT2 = REPO.parent / "shared" / "data" / "tokenizers" / "gpt2.tiktoken"

# (context, choices): hand-made, including what the harness treats specially -- trailing spaces and
# newlines of a context move into the continuation
CASES = [
    ("Question: which planet is red?\nAnswer: ", ["Mars", "Planetary", "the Moon"]),
    ("Question: How do I dry a wet phone?\n", [" Put it in rice.", " Put it in water."]),
    ("The cat sat on the", [" mat", " hat", " keyboard"]),
    ("def f(x):\n    return", [" x ** 2", " None"]),
]


def _model(attention: dict, seed: int, vocab: int = 256):
    torch.manual_seed(seed)
    return build_model({"vocab_size": vocab, "d_model": 32, "num_layers": 2, "block_size": 64, "init_std": 0.1,
                        "norm": "rmsnorm", "mlp": {"type": "swiglu", "d_ff": 48}, "attention": attention}).eval()


def _requests():
    return [Instance(request_type="loglikelihood", doc={}, arguments=(ctx, choice), idx=i)
            for ctx, choices in CASES for i, choice in enumerate(choices)]


@pytest.mark.parametrize("attention", [
    {"type": "standard", "num_heads": 4, "num_kv_heads": 2},
    {"type": "decoupled", "num_heads": 4, "num_kv_heads": 2, "sem_dim": 8, "geo_dim": 16},
], ids=["llama", "dba_phi3"])
@pytest.mark.skipif(not GPT2.is_file(), reason=f"needs {GPT2} (lm-eval's hf model needs an end-of-text token, "
                    "which the byte tokenizer lacks)")
def test_lm_eval_hf_on_an_export_agrees_with_attnlab(attention, tmp_path):
    HFLM = pytest.importorskip("lm_eval.models.huggingface", reason="lm-eval's hf model needs accelerate "
                               "(pip install lm-eval[hf])").HFLM
    from attnlab.data.tokenizers import build_tokenizer

    tok_cfg = TokenizerConfig(type="gpt2", path=str(GPT2))
    ours = _model(attention, seed=3, vocab=50257)
    folder = export_hf(ours, tmp_path / "hf", tokenizer=tok_cfg)
    hf = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=1)
    theirs = hf.loglikelihood(_requests(), disable_tqdm=True)
    mine = lm_eval_class()(ours, build_tokenizer(tok_cfg)).loglikelihood(_requests())
    assert len(theirs) == len(mine) == sum(len(c) for _, c in CASES)
    for (ll_h, greedy_h), (ll_a, greedy_a) in zip(theirs, mine):
        assert abs(ll_h - ll_a) <= 1e-4 and greedy_h == greedy_a
    start = 0
    for _, choices in CASES:  # the chosen answer of every question is the same
        block = slice(start, start + len(choices))
        pick = [max(range(len(choices)), key=lambda i: res[block][i][0]) for res in (theirs, mine)]
        assert pick[0] == pick[1]
        start += len(choices)


@pytest.mark.slow
@pytest.mark.skipif(not (EVAL / "arc_easy.jsonl").is_file(), reason=f"needs {EVAL}")
def test_attnlab_eval_runs_a_shipped_task_and_matches_the_downstream_bench(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tests" / "train"))
    from train_helpers import make_run, model_config, train_config

    from attnlab.bench.suite import Target, run_benchmarks
    from attnlab.cli import main
    from attnlab.config.bench import DownstreamBench
    from attnlab.config.data import DataConfig
    from attnlab.run import execute_run

    run = make_run(tmp_path / "out", "r0", model=model_config(vocab_size=256),
                   data=DataConfig.model_validate({"source": "embedded", "max_tokens": 20000}),
                   train=train_config(steps=2, eval_every=2, log_every=2))
    execute_run(run, "test")
    rc = main(["eval", str(run.run_dir), "--local-task", f"attnlab_arc_easy={EVAL / 'arc_easy.jsonl'}",
               "--limit", "12"])
    assert rc == 0 and "attnlab_arc_easy" in capsys.readouterr().out
    record = json.loads((run.run_dir / "bench" / "lm_eval.json").read_text())
    assert record["type"] == "lm_eval" and record["settings"]
    got = {row["metric"]: row for row in record["rows"]}
    assert got["acc"]["n"] == 12 and got["acc"]["task"] == "attnlab_arc_easy"
    spec = DownstreamBench(tasks=[{"name": "arc", "path": str(EVAL / "arc_easy.jsonl"), "limit": 12}])
    (ours,) = run_benchmarks([spec], Target(run.run_dir), save=False, progress=lambda m: None)
    assert got["acc"]["value"] == pytest.approx(ours.rows[0]["acc"])
    assert got["acc_norm"]["value"] == pytest.approx(ours.rows[0]["acc_norm"])
    assert main(["eval", str(run.run_dir), "--tasks", "no_such_task", "--local-task",
                 f"attnlab_arc_easy={EVAL / 'arc_easy.jsonl'}"]) == 2
    assert "unknown lm-eval task(s) no_such_task" in capsys.readouterr().err


def test_hellaswag_queries_and_endings_equal_lm_evals_preprocessing():
    datasets = pytest.importorskip("datasets")
    from lm_eval.tasks.hellaswag.utils import process_docs

    from attnlab.bench.downstream import parse_example

    records = [
        {"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the window.",
         "ctx_b": "the man", "endings": [" sits [title] down.", "drives away", "cleans [step] it", "waves  hi"],
         "label": "2", "ctx": "unused"},
        {"activity_label": "Baking cookies", "ctx_a": "A woman [header] mixes flour.", "ctx_b": "then she",
         "endings": ["bakes.", "sings.", "runs.", "eats."], "label": "0", "ctx": "unused"},
    ]
    theirs = process_docs(datasets.Dataset.from_list(records))
    for record, doc in zip(records, theirs):
        ours = parse_example(record, "hellaswag", "test")
        assert ours.contexts[0] == doc["query"] and ours.answers == doc["choices"] and ours.gold == doc["gold"]


def test_lambada_perplexity_is_lm_evals_per_item_metric():
    from lm_eval.api.metrics import perplexity

    from attnlab.bench.downstream import LambadaExample, encode_pair, evaluate_lambada, score_requests

    tok = ByteTokenizer()
    model = _model({"type": "standard", "num_heads": 4}, seed=5)
    examples = [LambadaExample("The cat sat on the", " mat"), LambadaExample("She opened the", " window wide")]
    result = evaluate_lambada(model, tok, examples)
    lls = [s.logprob for s in score_requests(model, [encode_pair(tok, e.context, e.continuation) for e in examples])]
    assert result["perplexity"] == pytest.approx(perplexity(lls), rel=1e-9)
    tokens = sum(len(tok.encode(e.continuation)) for e in examples)
    assert result["ppl_per_token"] == pytest.approx(torch.tensor(-sum(lls) / tokens).exp().item(), rel=1e-6)
    assert result["perplexity"] != pytest.approx(result["ppl_per_token"])
