#!/usr/bin/env bash
# The README's first command: install what the demo needs, build the tiny multilingual data set,
# train the tiny preset on CPU, score it (masked bits per character per language, with its plot),
# then print where the run's metrics, checkpoints and plot are and the commands to run next.
#   bash launch/demo.sh                 # everything under runs/demo/
#   STEPS=100 NPROC=2 bash launch/demo.sh   # longer, and data-parallel over 2 CPU processes (gloo)
#   SKIP_INSTALL=1 bash launch/demo.sh      # already installed
#   OUT=/tmp/demo bash launch/demo.sh       # somewhere else than runs/demo
#   bash launch/demo.sh train.eval_interval=5   # any config key=value for the training step
# Installs only torch (when missing: the CPU build, pinned as in CI) and this package with its C++
# extension and its commands (`pip install -e .`: sentencepiece, megatron-core, numpy, matplotlib, ...;
# the commands xlmr-train, xlmr-preprocess, ...). Test and cluster tooling (pytest, MPI, SLURM +
# munge, CUDA compiler wheels) is CI's: `bash .ci/install.sh`, run by `bash .ci/run`.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-40}"
NPROC="${NPROC:-1}"
OUT="${OUT:-runs/demo}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PIP="python -m pip install -q --disable-pip-version-check"

echo "== 1/5 install (torch + this package only)"
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
  echo "(skipped: SKIP_INSTALL=1)"
else
  # torch first, so that pip does not choose a CUDA build for a CPU demo (CI pins the same version)
  python -c "import torch" 2>/dev/null || { echo "installing torch 2.13.0"; $PIP torch==2.13.0; }
  if python -c "import xlmr_mp._C, xlmr_mp.cli, sentencepiece, megatron.core, yaml, tqdm" 2>/dev/null \
     && command -v xlmr-train >/dev/null; then
    echo "xlmr_mp already installed"
  else
    echo "installing xlmr_mp (pip install -e .: builds the C++ extension, installs the xlmr-* commands)"
    $PIP -e .
    hash -r
  fi
fi
command -v xlmr-train >/dev/null || {
  echo "demo.sh: the installed commands (xlmr-train, ...) are not on PATH; add pip's scripts folder:" >&2
  echo "  export PATH=\"$(python -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):\$PATH\"" >&2
  exit 2; }
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

echo "== 2/5 tiny corpus -> $OUT/corpus; held-out sentences -> $OUT/eval/flores200_devtest"
python -c "from xlmr_mp.fixtures.demo_corpus import make_heldout_sentences, make_tiny_corpus
make_tiny_corpus('$OUT/corpus'); make_heldout_sentences('$OUT/eval/flores200_devtest')"

echo "== 3/5 SentencePiece (1000 pieces -> vocab 1002) and preprocessing -> $OUT/data"
[ -f "$OUT/spm/tiny.model" ] || xlmr-train-spm --input "$OUT/corpus" --output-prefix "$OUT/spm/tiny" \
    --vocab-size 1000 --soft-vocab-limit --quiet
[ -f "$OUT/data/.done" ] || { xlmr-preprocess --input "$OUT/corpus" --tokenizer "$OUT/spm/tiny.model" \
    --output-dir "$OUT/data" --workers 1 --quiet && touch "$OUT/data/.done"; }

echo "== 4/5 train the tiny preset for $STEPS steps ($NPROC process(es)); metrics in $OUT/run/metrics.jsonl"
# model.vocab_size comes from data.tokenizer (its dictionary size)
ARGS=(--preset tiny run_dir="$OUT/run" data.path="$OUT/data" data.tokenizer="$OUT/spm/tiny.model"
      train.train_steps="$STEPS" optim.warmup_steps=5 checkpoint.resume=false "$@")
if [ "$NPROC" -gt 1 ]; then
  torchrun --standalone --nproc-per-node "$NPROC" -m xlmr_mp.train "${ARGS[@]}"
else
  xlmr-train "${ARGS[@]}"
fi

echo "== 5/5 masked bits per character on the held-out sentences -> $OUT/eval/mbpc.json and .png"
xlmr-evaluate mbpc --model "$OUT/run/checkpoints" --data "$OUT/eval/flores200_devtest" \
    --out "$OUT/eval/mbpc.json" --no-progress

# A two-cell study of this corpus (two seeds of the tiny preset, 20 steps each), ready to run.
printf '%s\n' "name: demo" "corpus: $OUT/corpus" "eval_data: $OUT/eval" "preset: tiny" \
  "overrides: [train.global_batch=8, train.micro_batch=8, data.seq_length=32, model.max_positions=34]" \
  "axes: {languages: {L3: [en, fr, ru]}, vocab: {V500: 500}, seed: [1, 2]}" \
  "budget: {mode: fixed_total, tokens: 5120}" "spm: {sample_size: 3000}" \
  "evaluate: [mbpc]" > "$OUT/study.yaml"

CKPT="$OUT/run/checkpoints"
cat <<EOF

== done. This run:
  metrics      $OUT/run/metrics.jsonl (training steps), $OUT/run/valid.jsonl (bits per character per language)
  config       $OUT/run/config.yaml (the tiny preset + your key=value, resolved)
  checkpoints  $CKPT/$(cat "$CKPT/latest" 2>/dev/null || echo "step_*") (latest; loads at any TP/PP layout)
  plot         $OUT/eval/mbpc.png (numbers: $OUT/eval/mbpc.json)
Next:
  xlmr-evaluate mbpc --model $CKPT --data $OUT/eval/flores200_devtest --out $OUT/eval/mbpc.json
      # other tasks: retrieval, sib200, xnli, udpos, ner (xlmr-evaluate --help)
  xlmr-convert xlmr-to-hf --input $CKPT --output $OUT/hf
      # a Hugging Face directory: AutoModelForMaskedLM.from_pretrained("$OUT/hf"), AutoTokenizer too
  xlmr-study run $OUT/study.yaml --out $OUT/study && xlmr-study report $OUT/study.yaml --out $OUT/study
      # a two-cell study of this corpus: results.csv, figures/, report.md under $OUT/study
  xlmr-train --preset tiny run_dir=$OUT/run2 data.path=$OUT/data data.tokenizer=$OUT/spm/tiny.model train.train_steps=400
      # longer; presets: tiny base large xl xxl mmbert_like (size one first: xlmr-plan --preset large --gpu H100)
EOF
