#!/usr/bin/env bash
# One GPU session: correctness tests (CUDA) + the decode-attention benchmark, logs under $OUT.
#   bash benchmarks/gpu_session.sh [benchmark args...]
# Expects PYTHONPATH to hold attnlab's missing dependencies (see docs/benchmarks.md).
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > "$OUT/nvidia-smi.csv" 2>&1
python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
start=$(date +%s)
timeout 240 python3 -m pytest tests/kernels tests/cache -q -n 8 -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "tests rc=$? in $(( $(date +%s) - start )) s"; tail -5 "$OUT/tests.log"
timeout 400 python3 benchmarks/decode_attention.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -E "^#|target|met" 
echo "bench rc=$? total $(( $(date +%s) - start )) s"
