"""Before/after of attnlab's lm-eval conventions on hand-made requests (issue 15), against
lm-evaluation-harness itself:

    python benchmarks/harness_conventions_check.py GPT2_TIKTOKEN OUT

Builds a small random DBA model with the GPT-2 vocabulary, exports it (partial-rotary Phi3 + the
tokenizer) and scores each (context, continuation) three ways: lm-eval's ``hf`` model on the export,
attnlab now (``AttnlabLM``: trailing whitespace of the context moved into the continuation, as the
harness does), and attnlab before that change (context and continuation encoded separately, as
given). Needs lm-eval, accelerate and transformers."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(argv: list[str]) -> int:
    tiktoken_path, out = Path(argv[0]), Path(argv[1])
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from attnlab.api import build_model
    from attnlab.bench.downstream import score_requests
    from attnlab.bench.lm_eval_adapter import lm_eval_class
    from attnlab.config.data import TokenizerConfig
    from attnlab.convert import export_hf
    from attnlab.data.tokenizers import build_tokenizer

    cfg = TokenizerConfig(type="gpt2", path=str(tiktoken_path))
    tok = build_tokenizer(cfg)
    torch.manual_seed(0)
    model = build_model({"vocab_size": 50257, "d_model": 64, "num_layers": 2, "block_size": 128, "init_std": 0.1,
                         "attention": {"type": "decoupled", "num_heads": 4, "sem_dim": 16, "geo_dim": 32}}).eval()
    folder = export_hf(model, out, tokenizer=cfg)
    requests = [("Question: Which planet is known as the Red Planet?\nAnswer: ", "Planetary"),
                ("Question: How do I ready a guinea pig cage?\n", "Provide the guinea pig with bedding."),
                ("The capital of France is ", "Paris"),
                ("The capital of France is", " Paris")]
    hf = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=1)
    theirs = hf.loglikelihood([Instance("loglikelihood", {}, r, 0) for r in requests], disable_tqdm=True)
    ours = lm_eval_class()(model, tok).loglikelihood([Instance("loglikelihood", {}, r, 0) for r in requests])
    before = score_requests(model, [(tok.encode(c), tok.encode(x)) for c, x in requests])
    print(f"{'context':>58} | {'continuation':>22} | lm-eval hf | attnlab now | attnlab before")
    for (c, x), (lh, _), (la, _), b in zip(requests, theirs, ours, before):
        print(f"{c!r:>58} | {x!r:>22} | {lh:10.4f} | {la:11.4f} | {b.logprob:14.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
