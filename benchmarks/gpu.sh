#!/usr/bin/env bash
# The GPU check: every benchmark on CUDA in fp32, bf16 autocast and the references' pure fp16
# (model.precision=reference_fp16), with allocator peaks and images/s, then one sandbox base-to-new
# CoOp seed end to end. Written to run unattended the first time a GPU is lent; each step has its
# own time limit so that the whole check stays under 10 minutes, and a failing step does not stop
# the others. Without CUDA it says so and exits 0.
#
#   bash benchmarks/gpu.sh            # everything; the log goes to $OUT/gpu.log (default runs/gpu-check)
#   bash benchmarks/gpu.sh --list     # the steps it would run, one per line; runs nothing
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-runs/gpu-check}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# label | seconds allowed | command (run from the repository root)
STEPS=(
  "coop-text fp32|30|$PY benchmarks/bench_coop_text.py --device cuda --precision fp32 --classes 1000"
  "coop-text bf16|30|$PY benchmarks/bench_coop_text.py --device cuda --precision bf16 --classes 1000"
  "coop-text fp16|30|$PY benchmarks/bench_coop_text.py --device cuda --precision fp16 --classes 1000"
  "cocoop fp32|30|$PY benchmarks/bench_cocoop.py --device cuda --precision fp32 --batch 32 --classes 100 --repeats 5"
  "cocoop bf16|30|$PY benchmarks/bench_cocoop.py --device cuda --precision bf16 --batch 32 --classes 100 --repeats 5"
  "cocoop fp16|30|$PY benchmarks/bench_cocoop.py --device cuda --precision fp16 --batch 32 --classes 100 --repeats 5"
  "coop-run fp32|30|$PY benchmarks/bench_coop_run.py --device cuda --precision fp32 --repeats 5"
  "coop-run bf16|30|$PY benchmarks/bench_coop_run.py --device cuda --precision bf16 --repeats 5"
  "coop-run fp16|30|$PY benchmarks/bench_coop_run.py --device cuda --precision fp16 --repeats 5"
  "memory fp32|30|$PY benchmarks/bench_memory.py --device cuda --precision fp32"
  "eval fp32|30|$PY benchmarks/bench_eval.py --device cuda --precision fp32 --n 1024 --batch 256 --workers 8"
  "eval bf16|30|$PY benchmarks/bench_eval.py --device cuda --precision bf16 --n 1024 --batch 256 --workers 8"
  "exact-step bf16|60|$PY benchmarks/bench_exact_step.py --device cuda --precision bf16"
  "loader|30|$PY benchmarks/bench_loader.py --n 1024 --workers 8"
  "sandbox coop seed 1|150|$PY -m promptlab.cli sweep sandbox/coop_base2new seeds=1 device=cuda --out $OUT/sandbox-coop"
)

if [ "${1:-}" = "--list" ]; then
  for step in "${STEPS[@]}"; do echo "$step"; done
  exit 0
fi
"$PY" -c "
import sys
try:
    import torch
except ImportError:
    sys.exit(3)
if not torch.cuda.is_available():
    print(f'gpu.sh: no CUDA device visible to torch {torch.__version__}; nothing to run')
    sys.exit(4)
" 2>/dev/null
case $? in
  0) ;;
  3) echo "gpu.sh: $PY cannot import torch; install the project first (README) or set PYTHON=/path/to/python" >&2; exit 2 ;;
  4) exit 0 ;;
  *) echo "gpu.sh: $PY failed to start" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
: >"$LOG"
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')" | tee -a "$LOG"
failed=0
summary=()
for step in "${STEPS[@]}"; do
  IFS='|' read -r label limit cmd <<<"$step"
  echo "=== $label (limit ${limit}s): $cmd" | tee -a "$LOG"
  start=$(date +%s)
  timeout "$limit" bash -c "$cmd" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  took=$(($(date +%s) - start))
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  summary+=("$(printf '%-22s rc=%-3s %4ss' "$label" "$rc" "$took")")
done
echo "=== summary (rc 124: over its time limit)" | tee -a "$LOG"
printf '%s\n' "${summary[@]}" | tee -a "$LOG"
echo "$failed step(s) failed; log: $LOG" | tee -a "$LOG"
[ "$failed" -eq 0 ]
