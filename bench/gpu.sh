#!/usr/bin/env bash
# The GPU checks in one run, at most 8 minutes on one GPU (with WITH_VLLM=1 and a CUDA vLLM in the venv, up to 9.5
# more: run that as a second call, `WITH_VLLM=1 SKIP_CORE=1 bench/gpu.sh`, to stay within a 10-minute call):
# the tests marked `gpu` (CUDA float32 and bfloat16 against the CPU, speculative greedy = plain greedy on CUDA,
# adapter experts on CUDA) and the throughput bench on GPU shapes (a 1B-class base, 100M-class experts, random
# weights), writing JSON; with vLLM, bench/vllm.py on the embedded family and the overlap case (below).
#
#   bench/gpu.sh [OUT_DIR]      (default bench/results/gpu; needs a CUDA build of torch in .venv)
#
# Writes OUT_DIR/gpu-tests.xml (JUnit), OUT_DIR/throughput-gpu.json, OUT_DIR/speculative-gpu.json and
# OUT_DIR/summary.json (with vLLM also OUT_DIR/vllm-gpu.json and OUT_DIR/vllm-overlap-gpu.json). Time limits:
# tests 210 s, throughput table 150 s, speculative 100 s; vLLM 200 s, overlap 360 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench/results/gpu}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT_DIR"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device visible to $PY (install a CUDA build of torch first, see README)" >&2
  exit 2
fi
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

start=$(date +%s)
tests_rc=0 table_rc=0 spec_rc=0
if [ "${SKIP_CORE:-0}" != 1 ]; then
timeout 210 "$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider --junitxml "$OUT_DIR/gpu-tests.xml"
tests_rc=$?
# two runs, each writing its JSON, so a slow section cannot take the other's numbers with it
timeout 150 "$PY" bench/throughput.py --shapes gpu --concurrency 1 8 32 --repeats 2 --skip speculative \
  --out "$OUT_DIR/throughput-gpu.json"
table_rc=$?
timeout 100 "$PY" bench/throughput.py --shapes gpu --skip table --spec-k 2 4 --spec-min-prob 0 0.6 \
  --out "$OUT_DIR/speculative-gpu.json"
spec_rc=$?
fi
# logitfuse inside vLLM (docs/vllm.md), asked for with WITH_VLLM=1 where the device's venv has a CUDA vllm
if [ "${WITH_VLLM:-0}" = 1 ] && "$PY" -c "import vllm" 2>/dev/null; then
  VLLM_USE_V2_MODEL_RUNNER=0 timeout 200 "$PY" bench/vllm.py --out "$OUT_DIR/vllm-gpu.json" || true
  # the experts' catch-up overlapping vLLM's forward (LOGITFUSE_VLLM_OVERLAP=0, then 1: two engines one after the
  # other) at GPU shapes (random weights: 1.1B base, 110M pair), bfloat16, CUDA graphs, synchronous scheduling
  # (the overlap reads the previous step's token on the host); also checks that both give the same fused tokens
  timeout 360 "$PY" bench/vllm.py --shapes gpu --dtype bfloat16 --cuda-graphs --no-async-scheduling --overlap \
    --skip-engine --tokens 64 --out "$OUT_DIR/vllm-overlap-gpu.json" || true
fi
bench_rc=$(( table_rc != 0 ? table_rc : spec_rc ))
seconds=$(( $(date +%s) - start ))

"$PY" - "$OUT_DIR" "$tests_rc" "$bench_rc" "$seconds" <<'PY'
import json, sys, torch
out, tests_rc, bench_rc, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tests_rc": tests_rc,
           "bench_rc": bench_rc, "seconds": seconds}
open(f"{out}/summary.json", "w").write(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary))
PY
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
