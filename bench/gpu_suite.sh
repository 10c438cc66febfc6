#!/usr/bin/env bash
# One prepared GPU validation run (an H100 / H200, about 8 minutes): every GPU figure the project
# claims comes from here. Any session that draws a GPU runs it first (DEVELOPERS.md).
#
#   bash bench/gpu_suite.sh                  # on the GPU machine; results in bench/results/gpu_suite_<time>/
#   bash bench/gpu_suite.sh --out DIR        # results in DIR
#   bash bench/gpu_suite.sh --dry-run        # CPU: every step at a tiny shape (CI: tests/test_gpu_suite_dryrun.py)
#
# Steps (each under its own time limit; a failing step is recorded and the suite goes on):
#   build        the CUDA extension xlmr_mp._cuda when it is missing
#   kernel_tests tests/test_kernels_gpu.py (fused kernels against float64 references)
#   kernels      bench/kernels_gpu.py bf16 and fp16 (fused vs eager vs torch.compile, % of copy bandwidth,
#                the FASTER_ON entries for xlmr_mp/kernels/dispatch.py)
#   train_*      bench/train_step.py at large and base, bf16 and fp16, fused kernels (XLMR_MP_KERNELS=fused)
#                against the torch references (=reference) and against HF XLMRobertaForMaskedLM in the
#                same run, each with the planner's predicted peak memory next to the measured one
#   mlm_head     bench/mlm_head.py at 16 x 512 (the chunked masked head against the materialised one
#                and the full projection)
# Output: DIR/env.txt (device, commit, torch, time), DIR/commands.txt (every command run, with its
# exit status and seconds), one log / result file per step, DIR/summary.txt (the figure lines).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown option $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-python}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
[ -n "$OUT" ] || OUT="$ROOT/bench/results/gpu_suite_$STAMP"
mkdir -p "$OUT"
cd "$ROOT" || exit 2

if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_suite.sh: no CUDA device visible; run on the GPU machine, or use --dry-run on a CPU" >&2
  exit 2
fi

{
  echo "suite: bench/gpu_suite.sh $([ "$DRY" = 1 ] && echo --dry-run)"
  echo "time: $STAMP"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git diff --quiet 2>/dev/null || echo '(uncommitted changes)')"
  "$PY" -c "import torch; print('torch:', torch.__version__, 'cuda:', torch.version.cuda); print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (dry run)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
: > "$OUT/commands.txt"
FAILED=0

# step NAME LIMIT_S CMD...: run CMD under `timeout`, output to OUT/NAME.log, record command and status
step() {
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "[gpu_suite] $name: $*" >&2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ${limit}s-limit $((SECONDS - t0))s: $*" >> "$OUT/commands.txt"
  [ $rc = 0 ] || { FAILED=$((FAILED + 1)); echo "[gpu_suite] $name FAILED (rc $rc), see $OUT/$name.log" >&2; }
}

if [ "$DRY" = 1 ]; then
  export XLMR_MP_KERNELS=reference
  TINY=(--preset tiny --device cpu --steps 1 --warmup 0 --micro-batch 2 --seq 32)
  step build 60 "$PY" -c "import xlmr_mp._C"
  step kernel_tests 300 "$PY" -m pytest -q --collect-only tests/test_kernels_gpu.py
  step kernels 60 "$PY" bench/kernels_gpu.py --help
  step train_large_bf16_fused 300 "$PY" bench/train_step.py "${TINY[@]}" --precision bf16 --plan CPU --out "$OUT/train_step.txt"
  step train_large_bf16_reference 300 "$PY" bench/train_step.py "${TINY[@]}" --precision bf16 --no-peer --out "$OUT/train_step.txt"
  step train_base_fp16_fused 300 "$PY" bench/train_step.py "${TINY[@]}" --precision fp32 --no-peer --plan CPU --out "$OUT/train_step.txt"
  step mlm_head 300 "$PY" bench/mlm_head.py --device cpu --batch 1 --seq 32 --vocab 1000 --hidden 64 --iters 1 --threads 1 --out "$OUT/mlm_head.txt"
else
  if ! "$PY" -c "import xlmr_mp._cuda" 2>/dev/null; then
    step build 300 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  fi
  step kernel_tests 120 "$PY" -m pytest -q tests/test_kernels_gpu.py
  step kernels_bf16 60 "$PY" bench/kernels_gpu.py --dtype bf16 --iters 30 --out "$OUT/kernels_bf16.json"
  step kernels_fp16 60 "$PY" bench/kernels_gpu.py --dtype fp16 --iters 30 --no-compile --out "$OUT/kernels_fp16.json"
  LARGE=(--preset large --micro-batch 16 --seq 512 --steps 5 --warmup 2 --plan "$(
    "$PY" -c "import torch; n = torch.cuda.get_device_name(); print('H200' if 'H200' in n else 'H100' if 'H100' in n else 'A100-80')")")
  BASE=(--preset base --micro-batch 32 --seq 512 --steps 5 --warmup 2)
  XLMR_MP_KERNELS=fused step train_large_bf16_fused 90 "$PY" bench/train_step.py "${LARGE[@]}" --precision bf16 --out "$OUT/train_step.txt"
  XLMR_MP_KERNELS=reference step train_large_bf16_reference 60 "$PY" bench/train_step.py "${LARGE[@]}" --precision bf16 --no-peer --out "$OUT/train_step.txt"
  XLMR_MP_KERNELS=fused step train_large_fp16_fused 60 "$PY" bench/train_step.py "${LARGE[@]}" --precision fp16 --no-peer --out "$OUT/train_step.txt"
  XLMR_MP_KERNELS=fused step train_base_bf16_fused 60 "$PY" bench/train_step.py "${BASE[@]}" --precision bf16 --out "$OUT/train_step.txt"
  XLMR_MP_KERNELS=fused step train_base_fp16_fused 45 "$PY" bench/train_step.py "${BASE[@]}" --precision fp16 --no-peer --out "$OUT/train_step.txt"
  step mlm_head 60 "$PY" bench/mlm_head.py --dtype bfloat16 --iters 3 --out "$OUT/mlm_head.txt"
fi

{
  echo "# $(head -3 "$OUT/env.txt" | tr '\n' ' ')"
  grep -h -E "^(ours|peer|ratio|optimizer-state|planner|chunked|gathered|full)" "$OUT/train_step.txt" "$OUT/mlm_head.txt" 2>/dev/null
  grep -h -E "FASTER_ON|copy bandwidth" "$OUT"/kernels*.log 2>/dev/null
  echo "steps failed: $FAILED"
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
[ "$FAILED" = 0 ]
