#!/usr/bin/env bash
# The Attamba comparison (issue 13) on a GPU, in one command:
#   benchmarks/attamba_compare_gpu.sh OUT DATA_DIR [key=value ...]
# Runs configs/attamba/compare.yml (11 arms x 3 seeds) with its data read from DATA_DIR
# (wikitext-2-valid.tokens.txt and gpt2.tiktoken, copies of ../shared/data's) and any further
# overrides, then packs every run's train.jsonl, resolved config and bench records and the group
# report into OUT/records.tar; OUT/run.log has every line time-stamped. TIME_LIMIT=SECONDS stops
# training after that long; the report is then written from the runs finished so far.
set -u
out=${1:?usage: attamba_compare_gpu.sh OUT DATA_DIR [key=value ...]}
data=${2:?usage: attamba_compare_gpu.sh OUT DATA_DIR [key=value ...]}
shift 2
group=runs/attamba_compare/compare
mkdir -p "$out"
PYTHONUNBUFFERED=1 ${TIME_LIMIT:+timeout -s INT "$TIME_LIMIT"} attnlab run configs/attamba/compare.yml \
  data.path="$data/wikitext-2-valid.tokens.txt" data.tokenizer.path="$data/gpt2.tiktoken" \
  vars.wikitext="$data/wikitext-2-valid.tokens.txt" "$@" 2>&1 \
  | while IFS= read -r line; do printf '%s %s\n' "$(date +%T)" "$line"; done \
  | tee "$out/run.log" | grep -v -E '^[0-9:]+ step |W1202' | tail -40
if [ ! -f "$group/report/report.md" ] && ls "$group"/*/best.pt >/dev/null 2>&1; then
  attnlab report $(dirname $(ls "$group"/*/best.pt)) --out "$group/report" 2>&1 | tail -3
fi
files=$(cd "$group" 2>/dev/null && ls -d */bench/*.json */train.jsonl */resolved_config.json report 2>/dev/null)
[ -n "$files" ] && tar -C "$group" -cf "$out/records.tar" $files
true
