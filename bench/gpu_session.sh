#!/usr/bin/env bash
# One batch of this wave's GPU measurements, for a lent machine (see shared/gpu-host/README.md for the
# install line that must run first). Writes tables and JSON under $OUT; each step has its own time limit.
#   bash bench/gpu_session.sh serving   # tests/gpu, bench.serving, bench.serving_faults
#   bash bench/gpu_session.sh short     # serving, serving_faults, fp8_recovery within one 10-minute call
#   bash bench/gpu_session.sh recovery  # bench.fp8_recovery, bench.gpu_recovery
set -u
OUT="${OUT:-/tmp/eep-gpu-out}"; mkdir -p "$OUT"
step() {  # step NAME SECONDS CMD...: run CMD under a limit, keep its output, never stop the batch
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s)"
  timeout -s ABRT "$limit" python3 -X faulthandler "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name rc=$?"; tail -n 30 "$OUT/$name.log"
  cp /tmp/ray/session_latest/logs/raylet.err "$OUT/$name.raylet.err" 2>/dev/null; python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1 || true
}
nvidia-smi -L
case "${1:-serving}" in
  serving)
    step gpu_tests 150 -m pytest -q -p no:cacheprovider tests/gpu
    step serving 200 -m bench.serving --device cuda --ranks 2 --calls 10 --json "$OUT/serving.json"
    step serving_faults 220 -m bench.serving_faults --device cuda --layers-per-step 1 --json "$OUT/serving_faults.json" ;;
  short)  # one 10-minute call: the serving data paths, serving through faults, the FP8 recovery
    step serving 170 -m bench.serving --device cuda --ranks 2 --calls 8 --json "$OUT/serving.json"
    step serving_faults 190 -m bench.serving_faults --device cuda --layers-per-step 1 --json "$OUT/serving_faults.json"
    step fp8_recovery 200 -m bench.fp8_recovery --layers 2 --json "$OUT/fp8_recovery.json" ;;
  faults)  # what little device time is left: the serving gap first, then the data paths
    step serving_faults 200 -m bench.serving_faults --device cuda --layers-per-step 1 --json "$OUT/serving_faults.json"
    step serving 150 -m bench.serving --device cuda --ranks 2 --calls 5 --json "$OUT/serving.json" ;;
  recovery)
    step fp8_recovery 300 -m bench.fp8_recovery --layers 2 --json "$OUT/fp8_recovery.json"
    step gpu_recovery 250 -m bench.gpu_recovery --json "$OUT/gpu_recovery.json" ;;
esac
