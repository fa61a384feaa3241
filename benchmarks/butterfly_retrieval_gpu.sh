#!/usr/bin/env bash
# The GPU part of the Butterfly evaluation (issue 12), in one command:
#   benchmarks/butterfly_retrieval_gpu.sh OUT [STEPS] [TEXT] [key=value ...]
# Runs configs/butterfly/retrieval_gpu.yml: trains the dense retrieval model for STEPS steps
# (default 9000: 295M tokens, about 4 minutes on an H200 at 1.3M tokens/s), retrofits it zero-train
# to Butterfly with four partner rules, benchmarks all five runs (retrieval, perplexity, agreement
# with the dense model) and writes the group report. OUT receives run.log (every line time-stamped)
# and records.tar (each run's bench records, the dense run's train.jsonl and resolved config, the
# report folder). TEXT: the text the mixture draws its haystacks and text documents from; default:
# built into runs/butterfly_corpus.txt from ../shared/data/text (Shakespeare + WikiText-2 valid) and
# the running Python's standard-library sources (about 7 MB: enough that 295M tokens do not
# memorise it). Further key=value arguments are manifest overrides (e.g. data.cache_dir=DIR to
# reuse a retrieval mix built beforehand with the same text). TIME_LIMIT=SECONDS stops the run after
# that long; the records written until then are still packed.
set -u
out=${1:?usage: butterfly_retrieval_gpu.sh OUT [STEPS] [TEXT] [key=value ...]}
steps=${2:-9000}
text=${3:-}
shift $(($# < 3 ? $# : 3))
manifest=configs/butterfly/retrieval_gpu.yml
group=runs/retrieval_gpu/retrofit
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
PYTHONUNBUFFERED=1 ${TIME_LIMIT:+timeout -s INT "$TIME_LIMIT"} attnlab run "$manifest" data.path="$text" train.steps="$steps" train.eval_every=$((steps / 6)) \
  train.warmup_steps=$((steps / 15)) "$@" 2>&1 | while IFS= read -r line; do printf '%s %s\n' "$(date +%T)" "$line"; done \
  | tee "$out/run.log" | grep -v -E '^[0-9:]+ step |W1202' | tail -60
files=$(cd "$group" 2>/dev/null && ls -d */bench/*.json dense/train.jsonl dense/resolved_config.json report 2>/dev/null)
[ -n "$files" ] && tar -C "$group" -cf "$out/records.tar" $files
true
