#!/usr/bin/env bash
# Train on one machine with torchrun: one process per GPU (or NPROC CPU processes).
#
#   bash launch/local.sh --preset tiny                                  # 1 process
#   NPROC=4 bash launch/local.sh --preset tiny parallel.tensor=2 data.path=...
#   NPROC=8 bash launch/local.sh --preset base train.micro_batch=16
#   bash launch/local.sh --config my.yaml          # a YAML file of your own (`preset: base` as its first key)
#
# NPROC defaults to the number of visible GPUs (1 without GPUs). The layout is checked before
# torchrun starts anything (launch/tools/check_layout.py: exit 2 with a message naming the options);
# the resolved config, commit and command are recorded in RUN_DIR/launch/local-<time>/.
# NCCL settings come from launch/nccl.env. The trainer resumes from RUN_DIR/checkpoints/latest, so
# after a stop (Ctrl-C / SIGTERM: it saves first) the same command continues the run.
# Environment knobs: NPROC, MASTER_PORT (default 29500 + random), PYTHON, OMP_NUM_THREADS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
config="${CONFIG:-}"
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) [ $# -ge 2 ] || { echo "local.sh: --config needs a path" >&2; exit 2; }; config="$2"; shift 2 ;;
    --config=*) config="${1#--config=}"; shift ;;
    --preset) [ $# -ge 2 ] || { echo "local.sh: --preset needs a name" >&2; exit 2; }; config="preset:$2"; shift 2 ;;
    --preset=*) config="preset:${1#--preset=}"; shift ;;
    *=*) overrides+=("$1"); shift ;;
    *) echo "local.sh: unexpected argument '$1': give options as key.sub=value, --preset NAME or --config FILE.yaml" >&2; exit 2 ;;
  esac
done
[ -n "$config" ] || { echo "local.sh: no preset: pass --preset NAME (tiny, base, large, xl, xxl, mmbert_like) or --config FILE.yaml (or set CONFIG)" >&2; exit 2; }
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
fi
# shellcheck disable=SC1091
source launch/nccl.env
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
port="${MASTER_PORT:-$(( 29500 + RANDOM % 20000 ))}"
unset MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK   # torchrun sets them for its workers

layout="$("$PY" launch/tools/check_layout.py --config "$config" --world-size "$NPROC" \
          --tasks-per-node "$NPROC" --record "local-$(date -u +%Y%m%dT%H%M%SZ)-$$" "${overrides[@]}")" || {
  echo "local.sh: layout check failed (message above); nothing was started" >&2; exit 2; }
echo "$layout" | grep '^#'
echo "[local.sh] torchrun: $NPROC processes on 127.0.0.1:$port; preset $config; overrides: ${overrides[*]}"
exec "$PY" -m torch.distributed.run --nnodes=1 --nproc-per-node="$NPROC" --master-addr=127.0.0.1 \
  --master-port="$port" -m xlmr_mp.train --config "$config" "${overrides[@]}"
