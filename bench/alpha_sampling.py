"""XLM-R alpha sampling on the 129 languages of ../shared/corpus: p_i, q_i and drawn frequencies.

  python bench/alpha_sampling.py [--corpus ../shared/corpus] [--samples 1000000] [--alpha 0.3]

Sizes come from the corpus's STATS.tsv: `lines` (sentences, data.share_unit=sentences) and `bytes`
(a proxy for data.share_unit=tokens). Blocks per language ~ bytes / 2000 (about 512 tokens). The
first --samples samples of the blended stream (xlmr_mp.data.blend) are drawn and their language
frequencies compared with q_i. Writes bench/results/alpha_sampling_shared_corpus.{txt,png}.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np

import bench_log  # bench/, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from xlmr_mp.atomic import atomic_write_text
from xlmr_mp.plotting import pyplot, save_figure


def main() -> None:
    from xlmr_mp.data.blend import BlendSpec, blend_window, sampling_weights
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=os.path.join(ROOT, "..", "shared", "corpus"))
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "alpha_sampling_shared_corpus"))
    args = ap.parse_args()
    stats = os.path.join(args.corpus, "STATS.tsv")
    if not os.path.isfile(stats):
        raise SystemExit(f"{stats} not found: pass --corpus <dir of the shared corpus>")
    with open(stats) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    langs = [r["iso"] for r in rows]
    lines = np.array([int(r["lines"]) for r in rows], dtype=np.float64)
    nbytes = np.array([int(r["bytes"]) for r in rows], dtype=np.float64)
    blocks = np.maximum(1, nbytes // 2000).astype(np.int64)
    out = [bench_log.header("alpha_sampling.py"), f"# command: python {' '.join(sys.argv)}",
           f"# {len(langs)} languages of {os.path.abspath(args.corpus)}; alpha={args.alpha}; "
           f"{args.samples:,} samples drawn from the blended stream (seed 1234)"]
    results = {}
    for unit, sizes in (("sentences", lines), ("bytes", nbytes)):
        q = sampling_weights(sizes, args.alpha)
        lang, _ = blend_window(BlendSpec(q, blocks, seed=1234), 0, args.samples)
        freq = np.bincount(lang, minlength=len(q)) / args.samples
        rel = np.abs(freq - q) / q
        results[unit] = (sizes / sizes.sum(), q, freq, rel)
        out.append(f"share_unit={unit}: max |freq - q_i| / q_i = {rel.max():.2e} (mean {rel.mean():.2e}); "
                   f"all within 1%: {bool(rel.max() < 0.01)}; p range [{(sizes / sizes.sum()).min():.2e}, "
                   f"{(sizes / sizes.sum()).max():.2e}] -> q range [{q.min():.2e}, {q.max():.2e}]")
    p, q, freq, rel = results["sentences"]
    pb, qb, freqb, relb = results["bytes"]
    out.append("")
    out.append(f"{'lang':<8}{'lines':>8}{'p_i':>10}{'q_i':>10}{'drawn':>10}{'rel.err':>10}"
               f"{'bytes':>10}{'p_i':>10}{'q_i':>10}{'drawn':>10}{'rel.err':>10}")
    for i in np.argsort(-p):
        out.append(f"{langs[i]:<8}{int(lines[i]):>8}{p[i]:>10.5f}{q[i]:>10.5f}{freq[i]:>10.5f}{rel[i]:>10.1e}"
                   f"{int(nbytes[i]):>10}{pb[i]:>10.5f}{qb[i]:>10.5f}{freqb[i]:>10.5f}{relb[i]:>10.1e}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write_text(args.out + ".txt", "\n".join(out) + "\n")
    print("\n".join(out[:6]))
    print(f"wrote {args.out}.txt")
    plt = pyplot()
    if plt is None:
        return
    order = np.argsort(-pb)
    fig, ax = plt.subplots(figsize=(22, 6))
    x = np.arange(len(order))
    ax.bar(x - 0.2, pb[order], 0.4, label="p_i (share of bytes)", color="#999999")
    ax.bar(x + 0.2, qb[order], 0.4, label=f"q_i = p_i^{args.alpha} / sum", color="#1f77b4")
    ax.plot(x + 0.2, freqb[order], "r.", ms=4, label=f"drawn frequency ({args.samples:,} samples)")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([langs[i] for i in order], rotation=90, fontsize=7)
    ax.set_xlim(-1, len(order))
    ax.set_ylabel("fraction of samples")
    ax.set_title(f"XLM-R language sampling on ../shared/corpus ({len(langs)} languages, alpha={args.alpha}): "
                 f"max relative error of drawn vs q_i = {relb.max():.1e}")
    ax.legend()
    save_figure(fig, args.out + ".png")
    print(f"wrote {args.out}.png")


if __name__ == "__main__":
    main()
