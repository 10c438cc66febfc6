#!/usr/bin/env python
"""Schedule study: static alpha 0.3 against the mmBERT-style annealed schedule and three decay branches.

    python tools/schedule_study.py --out DIR [--corpus ../shared/corpus] [--steps 600] [--branch-at 480]
                                   [--results bench/results/schedule_study]

Runs (each `python -m xlmr_mp.train` on the tiny shape, seq 128, batch 32, wsd learning rate whose
decay is 1-sqrt over the last (steps - branch_at) steps):
  static       alpha 0.3 over all 10 languages, mask 0.15, from scratch to --steps
  annealed     alpha 0.7 -> 0.5 -> 0.3 at 40% / branch_at, languages 6 -> 8 -> 10 joining at the same
               steps, mask 0.3 -> 0.15 -> 0.05, batch warmup 8 -> 32 over the first 5% of tokens;
               its own decay phase is the first branch ("decay_all")
  decay_high   branched from annealed's step-branch_at checkpoint: the decay phase on the 5
               highest-resource languages only (checkpoint.branch_from)
  decay_flat   the same branch point: the decay phase on all 10 languages at alpha 0.01 (nearly uniform)
Each final checkpoint is scored with `tools/evaluate.py mbpc` on FLORES-200 devtest (masked bits per
character, per language); results.csv, results.json and a bar plot (mbpc.png) go to --results.
The study runner (tools/study.py) runs independent grid cells; branches need a parent checkpoint,
hence this driver. Data preparation (one SentencePiece model + one dataset) is done once under --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIGH = ["en", "fr", "de", "ru", "zh"]
LANGS = HIGH + ["es", "ar", "hi", "sw", "ur"]      # joining order: 6, then 8, then all 10


def log(msg: str) -> None:
    print(f"[schedule_study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, log_path: str) -> None:
    log(" ".join(cmd[:6]) + " ...")
    with open(log_path, "a") as f:
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                           env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2")))
    if p.returncode != 0:
        raise SystemExit(f"failed (exit {p.returncode}): see {log_path}")


def prepare(args) -> tuple:
    """One SentencePiece model and one dataset for the 10 languages (skipped when already there)."""
    prep = os.path.join(args.out, "prep")
    spm, data = os.path.join(prep, "spm"), os.path.join(prep, "data")
    os.makedirs(prep, exist_ok=True)
    if not os.path.exists(spm + ".model"):
        run([sys.executable, "tools/train_spm.py", "--input", args.corpus, "--output-prefix", spm,
             "--vocab-size", str(args.vocab), "--alpha", "0.3", "--languages", ",".join(LANGS), "--quiet"],
            os.path.join(prep, "spm.log"))
    if not os.path.exists(os.path.join(data, LANGS[-1], "train.idx")):
        run([sys.executable, "tools/preprocess_data.py", "--input", args.corpus, "--tokenizer", spm + ".model",
             "--output-dir", data, "--languages", ",".join(LANGS), "--workers", "2", "--quiet"],
            os.path.join(prep, "preprocess.log"))
    return spm + ".model", data


def base_overrides(args, spm: str, data: str) -> list:
    decay = args.steps - args.branch_at
    return ["model.num_layers=4", "model.hidden_size=128", "model.num_heads=4", "model.ffn_size=512",
            "model.max_positions=130", "model.dropout=0.1", "model.attention_dropout=0.1",
            f"data.path={data}", f"data.tokenizer={spm}", f"data.languages=[{','.join(LANGS)}]",
            "data.seq_length=128", "train.global_batch=32", "train.micro_batch=8", f"train.train_steps={args.steps}",
            "train.eval_interval=0", "optim.lr=1.0e-3", f"optim.warmup_steps={max(1, args.steps // 20)}",
            "optim.decay=wsd", "optim.wsd_decay=1-sqrt", f"optim.decay_steps={decay}", "optim.min_lr=1.0e-5",
            f"checkpoint.interval={args.branch_at}", "checkpoint.keep_last=5", "logging.interval=10",
            "logging.tensorboard=false"]


def annealed(args) -> list:
    a, b = int(args.steps * 0.4), args.branch_at
    phases = lambda vals, key: "[" + ", ".join(f"{{step: {s}, {key}: {v}}}" for s, v in vals) + "]"  # noqa: E731
    langs = lambda n: "[" + ", ".join(LANGS[:n]) + "]"  # noqa: E731
    warm_tokens = int(0.05 * args.steps * 32 * 128)
    return [f"data.alpha_schedule={phases([(0, 0.7), (a, 0.5), (b, 0.3)], 'alpha')}",
            f"data.language_schedule={phases([(0, langs(6)), (a, langs(8)), (b, langs(10))], 'languages')}",
            f"data.mask_schedule={phases([(0, 0.3), (a, 0.15), (b, 0.05)], 'mask_prob')}",
            f"train.batch_warmup={{start: 8, tokens: {warm_tokens}}}"]


def evaluate(args, run_dir: str, spm: str) -> dict:
    out = os.path.join(run_dir, "mbpc.json")
    if not os.path.exists(out):
        run([sys.executable, "tools/evaluate.py", "mbpc", "--model", os.path.join(run_dir, "checkpoints"),
             "--data", os.path.join(args.eval_data, "flores200_devtest"), "--languages", ",".join(LANGS),
             "--tokenizer", spm, "--out", out, "--no-progress"], os.path.join(run_dir, "eval.log"))
    with open(out) as f:
        return json.load(f)


def per_language(report: dict) -> dict:
    """{language: mBPC} from an evaluate.py mbpc report (its "languages" map)."""
    return {lang: float(v) for lang, v in report["languages"].items() if lang in LANGS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="study directory (prep/ and one run directory per run)")
    ap.add_argument("--corpus", default=os.path.join(ROOT, "..", "shared", "corpus"))
    ap.add_argument("--eval-data", default=None, help="default: CORPUS/eval")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--branch-at", type=int, default=480, help="end of the stable phase (the branch step)")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "schedule_study"))
    args = ap.parse_args()
    args.eval_data = args.eval_data or os.path.join(args.corpus, "eval")
    if not 0 < args.branch_at < args.steps:
        raise SystemExit(f"--branch-at={args.branch_at} must be in (0, --steps={args.steps})")
    for path in (args.corpus, os.path.join(args.eval_data, "flores200_devtest")):
        if not os.path.isdir(path):
            raise SystemExit(f"{path} does not exist (the study reads ../shared/corpus)")
    t0 = time.time()
    spm, data = prepare(args)
    base = [sys.executable, "-m", "xlmr_mp.train", "--config", os.path.join(ROOT, "launch/configs/tiny.yaml"),
            *base_overrides(args, spm, data)]
    runs = {}
    for name, extra in (("static", ["data.alpha=0.3"]), ("annealed", annealed(args))):
        rd = os.path.join(args.out, name)
        run(base + [f"run_dir={rd}"] + extra, os.path.join(args.out, f"{name}.log"))
        runs[name] = rd
    branch = os.path.join(runs["annealed"], "checkpoints", f"step_{args.branch_at:08d}")
    for name, extra in (("decay_high", [f"data.language_schedule=[{{step: 0, languages: [{', '.join(HIGH)}]}}]"]),
                        ("decay_flat", ["data.alpha_schedule=[{step: 0, alpha: 0.7}, "
                                        f"{{step: {int(args.steps * 0.4)}, alpha: 0.5}}, {{step: {args.branch_at}, alpha: 0.01}}]"])):
        rd = os.path.join(args.out, name)
        run(base + annealed(args) + [f"run_dir={rd}", f"checkpoint.branch_from={branch}"] + extra,
            os.path.join(args.out, f"{name}.log"))
        runs[name] = rd
    names = {"static": "static alpha 0.3", "annealed": "annealed, decay_all", "decay_high": "annealed, decay_high",
             "decay_flat": "annealed, decay_flat"}
    table = {k: per_language(evaluate(args, rd, spm)) for k, rd in runs.items()}
    os.makedirs(args.results, exist_ok=True)
    tmp = os.path.join(args.results, "results.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "language", "mbpc"])
        for k, row in table.items():
            for lang in LANGS:
                if lang in row:
                    w.writerow([k, lang, f"{row[lang]:.4f}"])
    os.replace(tmp, os.path.join(args.results, "results.csv"))
    summary = {"wall_s": time.time() - t0, "steps": args.steps, "branch_at": args.branch_at,
               "mean_mbpc": {k: sum(r.values()) / max(len(r), 1) for k, r in table.items()}, "per_language": table}
    with open(os.path.join(args.results, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(table)
    for j, (k, row) in enumerate(table.items()):
        ax.bar([i + j * width for i in range(len(LANGS))], [row.get(l, float("nan")) for l in LANGS], width,
               label=names[k])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(LANGS))], LANGS)
    ax.set_ylabel("mBPC (FLORES-200 devtest, lower is better)")
    ax.set_title(f"schedules at {args.steps} steps (branch at {args.branch_at})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.results, "mbpc.png"), dpi=120)
    for k, v in summary["mean_mbpc"].items():
        log(f"{names[k]:>24s}: mean mBPC {v:.4f}")
    log(f"done in {summary['wall_s'] / 60:.1f} min; results in {args.results}")


if __name__ == "__main__":
    main()
