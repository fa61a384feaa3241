#!/usr/bin/env bash
# The GPU part of the Butterfly evaluation (issue 12), in one command:
#   benchmarks/butterfly_retrieval_gpu.sh OUT [STEPS] [TEXT]
# Runs configs/butterfly/retrieval_gpu.yml: trains the dense retrieval model for STEPS steps
# (default 3000: 98M tokens, about 75 s on an H200 at 1.3M tokens/s), retrofits it zero-train to
# Butterfly with four partner rules, benchmarks all five runs (retrieval, perplexity, agreement with
# the dense model) and writes the group report; then copies the records, the report and the log to
# OUT. TEXT: the text the mixture draws its haystacks and text documents from; default: built into
# runs/butterfly_corpus.txt from ../shared/data/text (Shakespeare + WikiText-2 valid) and the
# running Python's standard-library sources (about 7 MB: enough that 98M tokens do not memorise it).
set -u
out=${1:?usage: butterfly_retrieval_gpu.sh OUT [STEPS] [TEXT]}
steps=${2:-3000}
text=${3:-}
manifest=configs/butterfly/retrieval_gpu.yml
mkdir -p "$out" runs
if [ -z "$text" ]; then
  text=runs/butterfly_corpus.txt
  python - "$text" <<'PY'
import pathlib, sys, sysconfig
parts = [pathlib.Path("../shared/data/text", n).read_text(encoding="utf-8")
         for n in ("tinyshakespeare.txt", "wikitext-2-valid.tokens.txt")]
parts += [f.read_text(encoding="utf-8", errors="ignore")
          for f in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))]
pathlib.Path(sys.argv[1]).write_text("\n\n".join(parts), encoding="utf-8")
PY
fi
attnlab run "$manifest" data.path="$text" train.steps="$steps" train.eval_every=$((steps / 4)) \
  train.warmup_steps=$((steps / 15)) 2>&1 | tee "$out/run.log" | grep -v "^step " | grep -v "W1202" | tail -60
for run in dense causal_shift xor random local_only; do
  mkdir -p "$out/runs/$run"
  cp runs/retrieval_gpu/retrofit/$run/bench/*.json "$out/runs/$run/" 2>/dev/null
done
cp runs/retrieval_gpu/retrofit/dense/train.jsonl "$out/runs/dense/" 2>/dev/null
cp -r runs/retrieval_gpu/retrofit/report "$out/report" 2>/dev/null
true
