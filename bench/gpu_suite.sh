#!/usr/bin/env bash
# One prepared GPU validation run (one H100 / H200, at most 540 s of wall time, install and build
# included): every GPU figure the project claims comes from here. Any session that draws a GPU runs
# it first (DEVELOPERS.md, bench/README.md).
#
#   bash bench/gpu_suite.sh --wheels .whl --out "$OUT"   # on the GPU machine (results: 2 files in $OUT)
#   bash bench/gpu_suite.sh                  # results in bench/results/gpu_suite_<time>/
#   bash bench/gpu_suite.sh --plan           # print the planned seconds per step, the total and the file count
#   bash bench/gpu_suite.sh --dry-run        # CPU: the plan, then every step at a tiny shape (CI:
#                                            # tests/tools/test_gpu_suite_dryrun.py)
#
# The GPU image (torch 2.11+cu130, transformers, sentencepiece, pybind11, numpy, pyyaml, tqdm,
# safetensors, nvcc; Python 3.12; no network) lacks megatron-core. TP = PP = 1, all this suite runs,
# does not need it (xlmr_mp/parallel/state.py); to have it anyway (the TP / PP tests), carry a wheel
# folder made on any machine with network, from the repository root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl megatron-core==0.16.1
#
# megatron-core needs torch, numpy and packaging>=24.2, which the image has; a package the image
# lacks goes into the same folder the same way (`pip download --no-deps ... -d .whl NAME==VERSION`).
# `--wheels .whl` installs every wheel of the folder by name, from the folder only (pip --no-index).
# The package itself is installed with --no-deps (pip would look for its requirements on the
# network): the install step then imports every requirement the runs need and says what is missing.
#
# Steps, in order, each under its own time limit (the PLAN below: limits add up to the budget with
# the reserve for packing; a step starts with no more than the budget has left; a failing or
# timed-out step is recorded and the suite goes on):
#   install      the --wheels folder (pip --no-index), then the runtime imports (torch, numpy, ...)
#   build        pip install --no-build-isolation --no-deps -e . for this GPU's arch only, when
#                xlmr_mp._C / xlmr_mp._cuda do not import
#   kernel_tests tests/kernels/test_kernels_gpu.py (fused kernels against float64 references)
#   kernels_*    bench/kernels_gpu.py bf16 (torch.compile peers last) and fp16 (no compile): fused vs
#                eager vs compiled, % of copy bandwidth, FASTER_ON entries; JSON after every measurement
#   train_*      bench/train_step.py at large and base, fused kernels (XLMR_MP_KERNELS=fused) against
#                the torch references (=reference) and HF XLMRobertaForMaskedLM in the same run, with
#                the planner's predicted peak memory next to the measured one; the first one at
#                --precision auto (bf16 where the GPU has it)
#   mlm_head     bench/mlm_head.py at 16 x 512 (chunked masked head vs materialised vs full projection)
# Output: OUT/summary.txt (status of every step, the figure lines) and OUT/gpu_suite.tar.gz (env.txt,
# plan.txt, commands.txt with each command's exit status and seconds, every step's log and result
# file), both rewritten after every step, so a suite killed from outside still leaves what it had.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUDGET_S=540        # one device command is at most 600 s, the machine's start and the copies not included
RESERVE_S=10        # the suite's own work around the steps (env.txt, packing after each step)
PLAN=(              # GPU run: step and time limit in seconds
  "install 20"
  "build 160"
  "kernel_tests 50"
  "kernels_bf16 45"
  "kernels_fp16 25"
  "train_large_bf16_fused 75"
  "train_large_bf16_reference 45"
  "train_base_bf16_fused 50"
  "train_base_fp16_fused 35"
  "mlm_head 25"
)
RESULT_FILES=(summary.txt gpu_suite.tar.gz)

DRY=0; PLAN_ONLY=0; OUT=""; WHEELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --plan) PLAN_ONLY=1 ;;
    --out) [ $# -ge 2 ] || { echo "gpu_suite.sh: --out needs a folder" >&2; exit 2; }; OUT="$2"; shift ;;
    --wheels) [ $# -ge 2 ] || { echo "gpu_suite.sh: --wheels needs a folder of .whl files" >&2; exit 2; }; WHEELS="$2"; shift ;;
    -h|--help) sed -n '2,43p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown option $1 (use --dry-run, --plan, --out DIR, --wheels DIR)" >&2; exit 2 ;;
  esac
  shift
done

limit_of() { local want="$1" s; for s in "${PLAN[@]}"; do set -- $s; [ "$1" = "$want" ] && { echo "$2"; return; }; done; echo 0; }
print_plan() {
  local s total=0
  for s in "${PLAN[@]}"; do
    set -- $s
    printf '[plan] %-28s %4d s\n' "$1" "$2"
    total=$((total + $2))
  done
  echo "[plan] total $((total + RESERVE_S)) s (steps $total + packing reserve $RESERVE_S) of a $BUDGET_S s budget"
  echo "[plan] result files: ${#RESULT_FILES[@]} (${RESULT_FILES[*]})"
  [ $((total + RESERVE_S)) -le "$BUDGET_S" ] || { echo "[plan] ERROR: the plan exceeds the budget" >&2; return 1; }
}
if [ "$PLAN_ONLY" = 1 ]; then print_plan; exit $?; fi

if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || { echo "gpu_suite.sh: --wheels $WHEELS is not a folder (make it as the header says)" >&2; exit 2; }
  WHEELS="$(cd "$WHEELS" && pwd)"
fi
PY="${PYTHON:-$(command -v python3 || command -v python)}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
[ -n "$OUT" ] || OUT="$ROOT/bench/results/gpu_suite_$STAMP"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")" || exit 2
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"    # the in-place build, also if pip's install failed

if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_suite.sh: no CUDA device visible; run on the GPU machine, or use --dry-run on a CPU" >&2
  exit 2
fi

T0=$SECONDS
print_plan | tee "$WORK/plan.txt"
{
  echo "suite: bench/gpu_suite.sh $([ "$DRY" = 1 ] && echo --dry-run) ${WHEELS:+--wheels $WHEELS}"
  echo "time: $STAMP"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git diff --quiet 2>/dev/null || echo '(uncommitted changes)')"
  "$PY" -c "import sys, torch; print('python:', sys.version.split()[0], 'torch:', torch.__version__, 'cuda:', torch.version.cuda); print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (dry run)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true
} > "$WORK/env.txt" 2>&1
: > "$WORK/commands.txt"
FAILED=0; SKIPPED=0

summary() {
  echo "# $(head -3 "$WORK/env.txt" | tr '\n' ' ')"
  grep -h "^device:" "$WORK/env.txt"
  grep -h "^\[plan\] total" "$WORK/plan.txt"
  sed 's/^/step /' "$WORK/commands.txt"
  grep -h -E "^(note|preset=|ours|peer|ratio|optimizer-state|planner|chunked|gathered|full)" "$WORK/train_step.txt" "$WORK/mlm_head.txt" 2>/dev/null
  grep -h -E "FASTER_ON|copy bandwidth" "$WORK"/kernels*.log 2>/dev/null
  grep -h -E "^(megatron-core|missing)" "$WORK/install.log" 2>/dev/null
  echo "steps failed: $FAILED, skipped: $SKIPPED, wall $((SECONDS - T0)) s"
}

# Rewrite OUT/summary.txt and OUT/gpu_suite.tar.gz (temporary name, then rename: a kill leaves the last pair)
pack() {
  summary > "$WORK/summary.txt" 2>&1
  cp "$WORK/summary.txt" "$OUT/.summary.txt.tmp" && mv -f "$OUT/.summary.txt.tmp" "$OUT/summary.txt"
  tar -czf "$OUT/.gpu_suite.tar.gz.tmp" -C "$WORK" . && mv -f "$OUT/.gpu_suite.tar.gz.tmp" "$OUT/gpu_suite.tar.gz"
}

# step NAME LIMIT_S CMD...: run CMD under `timeout`, output to NAME.log, record command, status and
# seconds, then pack. On the GPU the limit is capped by what the budget has left.
step() {
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  if [ "$DRY" = 0 ]; then
    local left=$((BUDGET_S - RESERVE_S - (SECONDS - T0)))
    if [ "$left" -lt 5 ]; then
      echo "$name skipped: ${left}s left of the ${BUDGET_S}s budget: $*" >> "$WORK/commands.txt"
      SKIPPED=$((SKIPPED + 1)); pack; return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
  fi
  echo "[gpu_suite] $name (limit ${limit}s): $*" >&2
  if [ "$(type -t "$1")" = function ]; then      # install_step / build_step: through bash, under the same limit
    timeout -k 2 "$((limit - 2))" bash -c '"$@"' _ "$@" > "$WORK/$name.log" 2>&1
  else
    timeout -k 2 "$((limit - 2))" "$@" > "$WORK/$name.log" 2>&1
  fi
  local rc=$?
  echo "$name rc=$rc ${limit}s-limit $((SECONDS - t0))s: $*" >> "$WORK/commands.txt"
  [ $rc = 0 ] || { FAILED=$((FAILED + 1)); echo "[gpu_suite] $name FAILED (rc $rc), see $name.log in the archive" >&2; }
  pack
}
gpu_step() { local name="$1"; shift; step "$name" "$(limit_of "$name")" "$@"; }

# install: the wheels of --wheels DIR by name, from DIR only; then the imports the runs need
install_step() {
  local dry="$1" names=() w
  if [ -n "$WHEELS" ]; then
    for w in "$WHEELS"/*.whl; do [ -e "$w" ] && names+=("$(basename "$w" | sed -E 's/-[0-9][^-]*-.*//; s/_/-/g')"); done
    [ ${#names[@]} -gt 0 ] || names=(megatron-core)      # an empty folder: what the image lacks must be there already
    echo "pip install --no-index --find-links $WHEELS ${names[*]}"
    "$PY" -m pip install $dry --no-index --find-links "$WHEELS" "${names[@]}" || return 1
  else
    echo "no --wheels: nothing installed"
  fi
  "$PY" - <<'EOF'
import importlib
missing = []
for mod in ("torch", "numpy", "sentencepiece", "yaml", "tqdm", "safetensors", "pybind11", "transformers"):
    try:
        importlib.import_module(mod)
    except ImportError as e:
        missing.append(f"{mod} ({e})")
try:
    import warnings
    warnings.simplefilter("ignore")
    import megatron.core
    print("megatron-core:", getattr(megatron.core, "__version__", "present"))
except ImportError:
    print("megatron-core: absent (TP = PP = 1 needs none; TP / PP > 1 runs need it: --wheels)")
print("missing:", ", ".join(missing) if missing else "none")
raise SystemExit(1 if missing else 0)
EOF
}

# build: the package (C++ and CUDA extensions) for this GPU's arch only, unless it imports already
build_step() {
  if (cd / && "$PY" -c "import xlmr_mp._C, xlmr_mp._cuda") 2>/dev/null; then
    echo "xlmr_mp._C and xlmr_mp._cuda import: nothing to build"; return 0
  fi
  local arch; arch="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
  echo "building for TORCH_CUDA_ARCH_LIST=$arch"
  TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" -m pip install -q --no-build-isolation --no-deps -e . || return 1
  (cd / && "$PY" -c "import xlmr_mp._C, xlmr_mp._cuda; print('built: xlmr_mp._C, xlmr_mp._cuda')")
}

export PY WHEELS
export -f install_step build_step

if [ "$DRY" = 1 ]; then
  export XLMR_MP_KERNELS=reference
  TINY=(--preset tiny --device cpu --steps 1 --warmup 0 --micro-batch 2 --seq 32)
  if [ -n "$WHEELS" ]; then step install 300 install_step --dry-run
  else echo "install skipped: no --wheels" >> "$WORK/commands.txt"; SKIPPED=$((SKIPPED + 1)); fi
  step build 60 "$PY" -c "import xlmr_mp._C"
  step kernel_tests 300 "$PY" -m pytest -q --collect-only tests/kernels/test_kernels_gpu.py
  KTINY=(--device cpu --tokens 64 --seq 16 --hidden 32 --heads 2 --vocab-shard 100 --iters 2 --copy-mib 1 --no-compile)
  step kernels_bf16 60 "$PY" bench/kernels_gpu.py "${KTINY[@]}" --dtype bf16 --out "$WORK/kernels_bf16.json"
  step kernels_fp16 60 "$PY" bench/kernels_gpu.py "${KTINY[@]}" --dtype fp16 --out "$WORK/kernels_fp16.json"
  step train_large_bf16_fused 300 "$PY" bench/train_step.py "${TINY[@]}" --precision auto --plan CPU --out "$WORK/train_step.txt"
  step train_large_bf16_reference 300 "$PY" bench/train_step.py "${TINY[@]}" --precision bf16 --no-peer --out "$WORK/train_step.txt"
  step train_base_bf16_fused 300 "$PY" bench/train_step.py "${TINY[@]}" --precision bf16 --no-peer --plan CPU --out "$WORK/train_step.txt"
  step train_base_fp16_fused 300 "$PY" bench/train_step.py "${TINY[@]}" --precision fp32 --no-peer --out "$WORK/train_step.txt"
  step mlm_head 300 "$PY" bench/mlm_head.py --device cpu --batch 1 --seq 32 --vocab 1000 --hidden 64 --iters 1 --threads 1 --out "$WORK/mlm_head.txt"
else
  gpu_step install install_step ""
  gpu_step build build_step
  gpu_step kernel_tests "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_gpu.py
  gpu_step kernels_bf16 "$PY" bench/kernels_gpu.py --dtype bf16 --iters 20 --budget-s "$(( $(limit_of kernels_bf16) - 15 ))" --out "$WORK/kernels_bf16.json"
  gpu_step kernels_fp16 "$PY" bench/kernels_gpu.py --dtype fp16 --iters 20 --no-compile --budget-s "$(( $(limit_of kernels_fp16) - 12 ))" --out "$WORK/kernels_fp16.json"
  GPU_PLAN="$("$PY" -c "import torch; n = torch.cuda.get_device_name(); print('H200' if 'H200' in n else 'H100' if 'H100' in n else 'A100-80')")"
  LARGE=(--preset large --micro-batch 16 --seq 512 --steps 4 --warmup 2 --plan "$GPU_PLAN")
  BASE=(--preset base --micro-batch 32 --seq 512 --steps 4 --warmup 2)
  XLMR_MP_KERNELS=fused gpu_step train_large_bf16_fused "$PY" bench/train_step.py "${LARGE[@]}" --precision auto --note "train_large_bf16_fused: XLMR_MP_KERNELS=fused" --out "$WORK/train_step.txt"
  XLMR_MP_KERNELS=reference gpu_step train_large_bf16_reference "$PY" bench/train_step.py "${LARGE[@]}" --precision bf16 --no-peer --note "train_large_bf16_reference: XLMR_MP_KERNELS=reference" --out "$WORK/train_step.txt"
  XLMR_MP_KERNELS=fused gpu_step train_base_bf16_fused "$PY" bench/train_step.py "${BASE[@]}" --precision bf16 --note "train_base_bf16_fused: XLMR_MP_KERNELS=fused" --out "$WORK/train_step.txt"
  XLMR_MP_KERNELS=fused gpu_step train_base_fp16_fused "$PY" bench/train_step.py "${BASE[@]}" --precision fp16 --no-peer --note "train_base_fp16_fused: XLMR_MP_KERNELS=fused" --out "$WORK/train_step.txt"
  gpu_step mlm_head "$PY" bench/mlm_head.py --dtype bfloat16 --iters 3 --out "$WORK/mlm_head.txt"
fi

pack
cat "$OUT/summary.txt"
echo "[gpu_suite] results: $OUT/${RESULT_FILES[0]} and $OUT/${RESULT_FILES[1]} ($((SECONDS - T0)) s)"
[ "$FAILED" = 0 ]
