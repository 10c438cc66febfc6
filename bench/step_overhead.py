#!/usr/bin/env python
"""How much of a small training step is fixed per-step cost: our trainer step and the peer's
(Hugging Face XLMRobertaForMaskedLM + torch AdamW, same shape) timed at several micro-batch sizes in
the same process, in alternating rounds, and each fitted by least squares to

    step time = fixed + per_sample * micro_batch

`fixed` is what a step costs whatever the batch: per-op dispatch, autograd, Python, the optimizer
(the accumulation count is held constant). Where `fixed` is a large share of a step, a fused
kernel moves the step less than its own speed-up; each run prints that share at the largest
micro-batch (the recorded fits: bench/results/step_overhead_cpu.txt).

    python bench/step_overhead.py                                        # tiny preset, micro 1 2 4 8
    python bench/step_overhead.py --micro 1 4 16 --rounds 5 --out bench/results/step_overhead_cpu.txt
    python bench/step_overhead.py --plot bench/results/step_overhead_cpu.png     # the points and fitted lines

CPU only (fp32, one process, torch's default threads unless --threads).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch  # noqa: E402

import bench_log  # noqa: E402
import train_step as ts  # noqa: E402  (config, random batches, the peer)


def _fit(xs, ys):
    """(intercept, slope) of the least-squares line through (xs, ys)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4, 8], help="micro-batch sizes (at least 2)")
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of 5 timed steps each (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value config overrides")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default="", help="append the result to this file")
    ap.add_argument("--plot", default="", help="write the measured points and fitted lines to this PNG")
    a = ap.parse_args()
    if len(set(a.micro)) < 2:
        raise SystemExit("--micro: give at least two different micro-batch sizes to fit a line")
    if a.threads:
        torch.set_num_threads(a.threads)
    from xlmr_mp.distributed import init_distributed
    from xlmr_mp.parallel.state import init_parallel
    from xlmr_mp.train import Trainer
    init_distributed("auto", "cpu")
    device = torch.device("cpu")
    steps = {}
    for mb in a.micro:
        args = argparse.Namespace(preset=a.preset, micro_batch=mb, accum=a.accum, seq=0, precision="fp32", tp=1,
                                  pp=1, virtual_stages=1, zero=False, compile=False, recompute="none", device="cpu",
                                  steps=5, warmup=2, set=a.set)
        cfg = ts.build_config(args, 1)
        tr = Trainer(cfg, init_parallel(1, 1), device, ts.RandomBatches(cfg.model.vocab_size, cfg.data.seq_length, mb))
        steps[("ours", mb)] = tr.train_step
        steps[("hf", mb)] = ts.peer_step(args, cfg, device)
    times = ts.alternating_blocks(steps, a.rounds, on_progress=lambda r: print(
        f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}    # ms per step
    m = cfg.model
    lines = [f"# {bench_log.utc_stamp()}  commit {bench_log.commit()}  cpus {os.cpu_count()}  "
             f"threads {torch.get_num_threads()}  torch {torch.__version__}",
             f"# command: python bench/step_overhead.py {' '.join(sys.argv[1:])}",
             f"preset={a.preset} hidden={m.hidden_size} layers={m.num_layers} ffn={m.ffn_size} vocab={m.vocab_size} "
             f"seq={cfg.data.seq_length} accum={a.accum} fp32 cpu; medians of {a.rounds} alternating rounds x 5 steps",
             "micro  ours ms/step  HF ms/step  ours/HF speed"]
    for mb in a.micro:
        lines.append(f"{mb:5d}  {med[('ours', mb)]:12.1f}  {med[('hf', mb)]:10.1f}  {med[('hf', mb)] / med[('ours', mb)]:13.2f}")
    big = max(a.micro)
    fits = {}
    for who, name in (("ours", "ours"), ("hf", "HF")):
        fixed, per = fits[who] = _fit(a.micro, [med[(who, mb)] for mb in a.micro])
        lines.append(f"{name}: fixed {fixed:.1f} ms/step + {per:.2f} ms per sample of the micro-batch; "
                     f"fixed share at micro {big}: {100 * fixed / med[(who, big)]:.0f}%")
    if a.note:
        lines.append(f"note: {a.note}")
    bench_log.emit("\n".join(lines), a.out)
    if a.plot:
        _plot(a, med, fits, f"{a.preset} (hidden {m.hidden_size}, {m.num_layers} layers, seq {cfg.data.seq_length}), "
              f"accum {a.accum}, fp32, {torch.get_num_threads()} threads, commit {bench_log.commit()}")


def _plot(a, med, fits, title):
    from xlmr_mp.plotting import pyplot, save_figure
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = sorted(set(a.micro))
    for who, name, color in (("ours", "xlmr_mp", "tab:blue"), ("hf", "HF XLM-R + AdamW", "tab:orange")):
        fixed, per = fits[who]
        ax.plot(xs, [med[(who, mb)] for mb in xs], "o", color=color, label=f"{name}: fixed {fixed:.1f} + {per:.2f}/sample")
        ax.plot([0] + xs, [fixed + per * x for x in [0] + xs], "-", color=color, alpha=0.6)
    ax.set_xlabel("micro-batch size (sequences)")
    ax.set_ylabel("ms per optimizer step")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, a.plot, dpi=120)
    print(f"plot: {a.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
