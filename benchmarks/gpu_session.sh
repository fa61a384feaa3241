#!/usr/bin/env bash
# One GPU session: CUDA tests (kernels, runtime), the decode-attention benchmark and the
# end-to-end decode benchmark, logs under RESULTS_DIR
# (default benchmarks/results).
#   RESULTS_DIR=my_results bash benchmarks/gpu_session.sh [--no-attention] [--no-e2e]   (~9 min on an H200;
#   TEST_LIMIT / ATTN_LIMIT / E2E_LIMIT cap each part in seconds)
# Run from the repository root with attnlab installed (pip install -e .; docs/benchmarks.md).
set -o pipefail
RESULTS=${RESULTS_DIR:-benchmarks/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > "$RESULTS/nvidia-smi.csv" 2>&1
python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
start=$(date +%s)
PARALLEL=$(python3 -c 'import xdist' 2>/dev/null && echo "-n 8")  # pytest-xdist when installed
timeout ${TEST_LIMIT:-140} python3 -m pytest tests/kernels tests/infer/test_infer_runtime_cuda.py tests/cache -q $PARALLEL -p no:cacheprovider -rfE > "$RESULTS/gpu_tests.log" 2>&1
echo "tests rc=$? in $(( $(date +%s) - start )) s"; grep -E "passed|failed|FAILED|ERROR" "$RESULTS/gpu_tests.log" | tail -15
if [[ " $* " != *" --no-attention "* ]]; then
  timeout ${ATTN_LIMIT:-90} python3 benchmarks/decode_attention.py --quick --out "$RESULTS" --time-limit ${ATTN_TIME:-70} > "$RESULTS/decode_attention.log" 2>&1
  echo "decode_attention rc=$? at $(( $(date +%s) - start )) s"; grep -E "^- |target|met" "$RESULTS/decode_attention.md" | head -20
fi
if [[ " $* " != *" --no-e2e "* ]]; then
  timeout ${E2E_LIMIT:-300} python3 benchmarks/decode_e2e.py --out "$RESULTS" --time-limit ${E2E_TIME:-250} 2>&1 | tee "$RESULTS/decode_e2e.log" | grep -vE "^W[0-9]{4}"
  echo "e2e rc=$? total $(( $(date +%s) - start )) s"
fi
