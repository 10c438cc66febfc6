#!/usr/bin/env bash
# The README's first command: install what the demo needs, build the tiny multilingual data set,
# train the tiny preset on CPU.
#   bash launch/demo.sh                 # everything under runs/demo/
#   STEPS=100 NPROC=2 bash launch/demo.sh   # longer, and data-parallel over 2 CPU processes (gloo)
#   SKIP_INSTALL=1 bash launch/demo.sh      # already installed
#   OUT=/tmp/demo bash launch/demo.sh       # somewhere else than runs/demo
#   bash launch/demo.sh train.eval_interval=5   # any config key=value for the training step
# Installs only torch (when missing: the CPU build, pinned as in CI) and this package with its C++
# extension (`pip install -e .`: sentencepiece, megatron-core, numpy, ...). Test and cluster tooling
# (pytest, MPI, SLURM + munge, CUDA compiler wheels) is CI's: `bash .ci/install.sh`, run by `bash .ci/run`.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-40}"
NPROC="${NPROC:-1}"
OUT="${OUT:-runs/demo}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PIP="python -m pip install -q --disable-pip-version-check"

echo "== 1/4 install (torch + this package only)"
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
  echo "(skipped: SKIP_INSTALL=1)"
else
  # torch first, so that pip does not choose a CUDA build for a CPU demo (CI pins the same version)
  python -c "import torch" 2>/dev/null || { echo "installing torch 2.13.0"; $PIP torch==2.13.0; }
  if python -c "import xlmr_mp._C, sentencepiece, megatron.core, yaml, tqdm" 2>/dev/null; then
    echo "xlmr_mp already installed"
  else
    echo "installing xlmr_mp (pip install -e ., builds the C++ extension)"
    $PIP -e .
  fi
fi

echo "== 2/4 tiny corpus -> $OUT/corpus"
python -c "from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus; make_tiny_corpus('$OUT/corpus')"

echo "== 3/4 SentencePiece (1000 pieces -> vocab 1002) and preprocessing -> $OUT/data"
[ -f "$OUT/spm/tiny.model" ] || python tools/train_spm.py --input "$OUT/corpus" --output-prefix "$OUT/spm/tiny" \
    --vocab-size 1000 --soft-vocab-limit --quiet
[ -f "$OUT/data/.done" ] || { python tools/preprocess_data.py --input "$OUT/corpus" --tokenizer "$OUT/spm/tiny.model" \
    --output-dir "$OUT/data" --workers 1 --quiet && touch "$OUT/data/.done"; }

echo "== 4/4 train the tiny preset for $STEPS steps ($NPROC process(es)); metrics in $OUT/run/metrics.jsonl"
# model.vocab_size comes from data.tokenizer (its dictionary size)
ARGS=(--config launch/configs/tiny.yaml run_dir="$OUT/run" data.path="$OUT/data" data.tokenizer="$OUT/spm/tiny.model"
      train.train_steps="$STEPS" optim.warmup_steps=5 checkpoint.resume=false "$@")
if [ "$NPROC" -gt 1 ]; then
  torchrun --standalone --nproc-per-node "$NPROC" -m xlmr_mp.train "${ARGS[@]}"
else
  python -m xlmr_mp.train "${ARGS[@]}"
fi
