#!/usr/bin/env bash
# The README's first command: install, build the tiny multilingual data set, train the tiny preset on CPU.
#   bash launch/demo.sh                 # everything under runs/demo/
#   STEPS=100 NPROC=2 bash launch/demo.sh   # longer, and data-parallel over 2 CPU processes (gloo)
#   SKIP_INSTALL=1 bash launch/demo.sh      # already installed
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-40}"
NPROC="${NPROC:-1}"
OUT=runs/demo
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== 1/4 install"
if [ "${SKIP_INSTALL:-0}" = 1 ]; then echo "(skipped: SKIP_INSTALL=1)"; else bash .ci/install.sh; fi

echo "== 2/4 tiny corpus -> $OUT/corpus"
python -c "from xlmr_mp.data.tiny_corpus import make_tiny_corpus; make_tiny_corpus('$OUT/corpus')"

echo "== 3/4 SentencePiece (1000 pieces -> vocab 1002) and preprocessing -> $OUT/data"
[ -f "$OUT/spm/tiny.model" ] || python tools/train_spm.py --input "$OUT/corpus" --output-prefix "$OUT/spm/tiny" \
    --vocab-size 1000 --soft-vocab-limit --quiet
[ -f "$OUT/data/.done" ] || { python tools/preprocess_data.py --input "$OUT/corpus" --tokenizer "$OUT/spm/tiny.model" \
    --output-dir "$OUT/data" --workers 1 --quiet && touch "$OUT/data/.done"; }

echo "== 4/4 train the tiny preset for $STEPS steps ($NPROC process(es)); metrics in $OUT/run/metrics.jsonl"
VOCAB=$(python -c "import sentencepiece as s; print(s.SentencePieceProcessor(model_file='$OUT/spm/tiny.model').get_piece_size() + 2)")
ARGS=(--config launch/configs/tiny.yaml run_dir="$OUT/run" data.path="$OUT/data" data.tokenizer="$OUT/spm/tiny.model"
      model.vocab_size="$VOCAB" train.train_steps="$STEPS" optim.warmup_steps=5 checkpoint.resume=false)
if [ "$NPROC" -gt 1 ]; then
  torchrun --standalone --nproc-per-node "$NPROC" -m xlmr_mp.train "${ARGS[@]}"
else
  python -m xlmr_mp.train "${ARGS[@]}"
fi
