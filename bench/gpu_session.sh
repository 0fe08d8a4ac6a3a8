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
GPUS=$(nvidia-smi -L | wc -l)  # one rank per GPU: NCCL allows no two ranks of a group on one GPU
# One DeepSeek-V3-size FP8 layer served on the GPU in this process (errors with their traceback).
FP8_SERVE='
import os, torch
os.environ["CUDA_LAUNCH_BLOCKING"] = "1"
from elastic_ep.config import ModelSpec
from elastic_ep.serving.compute import combine_rank
from elastic_ep.serving.weights import weights_for_slots
spec = ModelSpec(num_layers=1, num_experts=64, hidden=7168, intermediate=2048, quant="fp8", block=(128, 128))
rows = torch.zeros((64, spec.expert_format.row_bytes), dtype=torch.uint8, device="cuda")
for n in (64, 512, 4096):
    slots = torch.randint(0, 64, (n * 8,), device="cuda")
    x = torch.randn(n, 7168, device="cuda").to(torch.bfloat16)
    w, index = weights_for_slots(rows, spec.expert_format, "bfloat16", slots)
    out = combine_rank(w, x, torch.arange(n, device="cuda").repeat_interleave(8), index, torch.rand(n * 8, device="cuda"))
    torch.cuda.synchronize(); print(n, "tokens:", tuple(out.shape), "max memory", torch.cuda.max_memory_allocated() >> 20, "MiB")
'
case "${1:-serving}" in
  serving)
    step gpu_tests 150 -m pytest -q -p no:cacheprovider tests/gpu
    step serving 200 -m bench.serving --device cuda --ranks 2 --calls 10 --json "$OUT/serving.json"
    step serving_faults 220 -m bench.serving_faults --device cuda --layers-per-step 1 --json "$OUT/serving_faults.json" ;;
  short)  # one 10-minute call: the FP8 serving path, the serving data paths, serving through faults, the FP8 recovery
    step fp8_serve 40 -c "$FP8_SERVE"
    step serving 140 -m bench.serving --device cuda --ranks "$GPUS" --calls 5 --json "$OUT/serving.json"
    step serving_faults 180 -m bench.serving_faults --device cuda --layers-per-step 1 --json "$OUT/serving_faults.json"
    step fp8_recovery 200 -m bench.fp8_recovery --layers 2 --json "$OUT/fp8_recovery.json" ;;
  faults)  # what little device time is left: the serving gap first, then the data paths
    step serving_faults 200 -m bench.serving_faults --device cuda --layers-per-step 1 --json "$OUT/serving_faults.json"
    step serving 150 -m bench.serving --device cuda --ranks 2 --calls 5 --json "$OUT/serving.json" ;;
  recovery)
    step fp8_recovery 300 -m bench.fp8_recovery --layers 2 --json "$OUT/fp8_recovery.json"
    step gpu_recovery 250 -m bench.gpu_recovery --json "$OUT/gpu_recovery.json" ;;
esac
