#!/usr/bin/env bash
# The package as a user gets it: `pip wheel .`, the wheel installed into a fresh virtualenv, and the
# demo's whole pipeline run with the installed commands from a directory that is not the checkout:
# tiny corpus -> xlmr-train-spm -> xlmr-preprocess -> xlmr-train (40 steps, --preset tiny from the
# package data) -> xlmr-evaluate mbpc (JSON + its plot) -> xlmr-convert xlmr-to-hf (loaded back by
# transformers when it is installed).
# The virtualenv sees the system site-packages (torch and megatron-core are not downloaded again);
# the wheel itself goes into the virtualenv, and its declared requirements are checked against what
# that virtualenv imports. Exit 0 only if every step did and every output is there.
#   bash .ci/wheel_check.sh            # WORK=DIR keeps the wheel, venv and run there (default: a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
STEPS="${STEPS:-40}"
if [ -n "${WORK:-}" ]; then mkdir -p "$WORK"; else WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT; fi
WORK="$(cd "$WORK" && pwd)"
log() { echo "[wheel_check $(date -u +%H:%M:%S)] $*"; }

log "pip wheel . -> $WORK/wheel"
# from a copy of the tree without its ignored files (no stale build/, *.so or egg-info gets in, and
# the checkout gets no build/); --no-build-isolation: setuptools and pybind11 from this environment
mkdir -p "$WORK/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} sh -c '[ -e "{}" ] && echo "{}"' \
  | tar -cf - -T - | tar -xf - -C "$WORK/src"
(cd "$WORK/src" && python -m pip wheel . --no-deps --no-build-isolation -q -w "$WORK/wheel")
WHL="$(ls "$WORK"/wheel/xlmr_mp-*.whl)"
python - "$WHL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["xlmr_mp/presets/tiny.yaml", "xlmr_mp/presets/xxl.yaml", "xlmr_mp/cli/evaluate.py", "xlmr_mp/plotting.py"]
missing = [n for n in need if n not in names] + ([] if any(n.startswith("xlmr_mp/_C") for n in names) else ["xlmr_mp/_C*.so"])
eps = [n for n in names if n.endswith("entry_points.txt")]
if missing or not eps:
    sys.exit(f"wheel {sys.argv[1]} lacks {missing or 'entry_points.txt'}")
print(f"wheel: {len(names)} files, presets, commands and the C++ extension included")
EOF

log "fresh virtualenv (with the system site-packages) + the wheel"
python -m venv --system-site-packages "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --no-deps --ignore-installed --disable-pip-version-check "$WHL"
export PATH="$WORK/venv/bin:$PATH"
unset PYTHONPATH
mkdir -p "$WORK/run"
cd "$WORK/run"                                  # not the checkout: nothing may come from $REPO
"$VPY" - "$REPO" "$WORK/venv" <<'EOF'
import importlib.metadata as md, os, sys
from packaging.requirements import Requirement
repo, venv = sys.argv[1], sys.argv[2]
import xlmr_mp, xlmr_mp._C
assert xlmr_mp.__file__.startswith(venv), f"xlmr_mp imported from {xlmr_mp.__file__}, not the wheel in {venv}"
bad, checked = [], []
for r in map(Requirement, md.requires("xlmr_mp") or []):
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue                                # an extra ([hf], [test], ...)
    checked.append(str(r))
    try:
        v = md.version(r.name)
    except md.PackageNotFoundError:
        bad.append(f"{r} (not installed)")
        continue
    if not r.specifier.contains(v, prereleases=True):
        bad.append(f"{r} (installed {v})")
if bad:
    sys.exit("declared requirements not met: " + "; ".join(bad))
print(f"xlmr_mp from {os.path.dirname(xlmr_mp.__file__)}; requirements met: {', '.join(sorted(checked))}")
EOF
for c in xlmr-train xlmr-preprocess xlmr-train-spm xlmr-merge xlmr-evaluate xlmr-study \
         xlmr-convert xlmr-plan xlmr-compile-kernels xlmr-download-cc100; do
  [ "$(command -v "$c")" = "$WORK/venv/bin/$c" ] || { echo "wheel_check: $c is not the virtualenv's command" >&2; exit 1; }
  "$c" --help >/dev/null
done
log "10 commands installed, each answers --help"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
log "1/6 tiny corpus and held-out sentences"
"$VPY" -c "from xlmr_mp.fixtures.demo_corpus import make_heldout_sentences, make_tiny_corpus
make_tiny_corpus('corpus'); make_heldout_sentences('eval/flores200_devtest')"
log "2/6 xlmr-train-spm"
xlmr-train-spm --input corpus --output-prefix spm/tiny --vocab-size 1000 --soft-vocab-limit --quiet
log "3/6 xlmr-preprocess"
xlmr-preprocess --input corpus --tokenizer spm/tiny.model --output-dir data --workers 1 --quiet
log "4/6 xlmr-train --preset tiny, $STEPS steps"
xlmr-train --preset tiny run_dir=run data.path=data data.tokenizer=spm/tiny.model train.train_steps="$STEPS" \
    optim.warmup_steps=5 train.eval_interval="$STEPS" checkpoint.interval="$STEPS"
log "5/6 xlmr-evaluate mbpc (+ plot)"
xlmr-evaluate mbpc --model run/checkpoints --data eval/flores200_devtest --out eval/mbpc.json --no-progress
log "6/6 xlmr-convert xlmr-to-hf"
xlmr-convert xlmr-to-hf --input run/checkpoints --output hf
"$VPY" - "$STEPS" <<'EOF'
import json, os, sys
steps = int(sys.argv[1])
def need(path):
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        sys.exit(f"wheel_check: {path} was not written")
for p in ("run/metrics.jsonl", "run/config.yaml", "eval/mbpc.json", "eval/mbpc.png", "hf/config.json",
          "hf/model.safetensors", "hf/sentencepiece.bpe.model"):
    need(p)
last = [json.loads(l) for l in open("run/metrics.jsonl")][-1]
latest = open("run/checkpoints/latest").read().strip()
report = json.load(open("eval/mbpc.json"))
assert last["step"] == steps and latest == f"step_{steps:08d}", (last.get("step"), latest)
assert open("eval/mbpc.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
assert len(report["languages"]) == 7 and all(0 < v < 20 for v in report["languages"].values()), report["languages"]
msg = f"step {last['step']} loss {last['loss']:.3f}; mbpc " + ", ".join(f"{k} {v:.2f}" for k, v in report["languages"].items())
try:
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer
except ImportError:
    print(msg + "; transformers not installed: the HF directory was not loaded back")
else:
    tok, model = AutoTokenizer.from_pretrained("hf"), AutoModelForMaskedLM.from_pretrained("hf")
    with torch.no_grad():
        logits = model(**tok(["Health reads city language."], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    print(msg + f"; hf loaded back by transformers (logits {tuple(logits.shape)})")
EOF
log "ok: the wheel ran the demo pipeline from $PWD"
