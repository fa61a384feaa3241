"""Export a DBA run as a Hugging Face partial-rotary Phi3 folder and check it the way a user of
transformers would (issue 15):

    python benchmarks/dba_export_check.py RUN OUT [--prompt TEXT] [--new-tokens N]

Prints the exported architecture, the tokenizer's id parity with attnlab's on the prompt, the
largest logit difference (float32) between attnlab and ``AutoModelForCausalLM`` on held-out
windows of the run, whether greedy generation agrees token for token, and the text transformers
generates. Needs transformers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--prompt", default="def main(argv=None):\n    ")
    parser.add_argument("--new-tokens", type=int, default=60)
    parser.add_argument("--windows", type=int, default=4)
    args = parser.parse_args(argv)

    import transformers

    from attnlab.api import load
    from attnlab.convert import export_hf
    from attnlab.infer.generate import generate
    from attnlab.runfolder import RunFolder

    folder = RunFolder.of(args.run)
    ours = load(args.run).float().eval()
    export_hf(ours, args.out, tokenizer=folder.tokenizer_config())
    config = json.loads((args.out / "config.json").read_text())
    print("exported:", {k: config.get(k) for k in ("architectures", "hidden_size", "num_attention_heads",
                                                   "num_key_value_heads", "head_dim", "partial_rotary_factor")})
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(args.out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(args.out), dtype=torch.float32).eval()
    ids = hf_tok(args.prompt, return_tensors="pt").input_ids
    print("tokenizer ids equal attnlab's:", ids[0].tolist() == folder.tokenizer().encode(args.prompt))

    block = ours.config.block_size
    heldout = np.asarray(folder.heldout_tokens()[: args.windows * block]).astype(np.int64)
    windows = torch.from_numpy(heldout).view(-1, block)
    with torch.no_grad():
        a, b = ours(windows), hf(windows).logits
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                             do_sample=False)
    print(f"max |logit difference| over {windows.shape[0]} x {block} held-out tokens (fp32): "
          f"{(a - b).abs().max().item():.3e} (largest |logit| {a.abs().max().item():.2f}); "
          f"top-1 agreement {(a.argmax(-1) == b.argmax(-1)).float().mean().item():.4f}")
    mine = generate(ours, [ids[0].tolist()], args.new_tokens).tokens[0]
    print("greedy generation equal token for token:", theirs[0, ids.shape[1]:].tolist() == mine)
    print("transformers generate:", repr(hf_tok.decode(theirs[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
