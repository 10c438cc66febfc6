"""Data-pipeline benchmark: blended-index build at run scale, and loader throughput per DP rank.

  python bench/data.py                       # full: 1e9 samples x 100 languages, paper-shape loader
  python bench/data.py --samples 1e8 --steps 20 --out ''   # quicker

1. Blended (language, block) index for `--samples` samples over `--languages` languages with a
   CC-100-like skew (blocks per language log-uniform in [1e4, 1e8]): wall and CPU time of the C++
   build (xlmr_mp._C.blend_window, one thread) and its peak memory per sample (VmHWM of a fresh
   child process above its baseline), checked against q_i afterwards. Peers measured in the same
   run: this project's numpy reference and megatron-core's blending helper
   (helpers_cpp.build_blending_indices, O(N x L)) on smaller N, as samples/s ratios.
   Scheduled index (data.alpha_schedule + data.language_schedule, `--skip-schedule` to leave out):
   the same N and languages in 3 phases (alpha 0.7 over the 60 largest languages, 0.5 over 80,
   0.3 over all; boundaries at N/3 and 2N/3) built by xlmr_mp._C.blend_window_phase, with the
   same time and bytes-per-sample figures, the per-phase frequency error against that phase's
   q_i, and the ratio to the static index measured in the same run.
2. Loader samples/s for one DP rank at the XLM-R paper's shape (global batch 8192 x 512 at DP=512:
   16 sequences per rank per step, vocab 250002), with 0 and 2 worker processes, on a synthetic
   100-language corpus, against the rate a training step consumes sequences: from the measured
   step time (--step-seconds) or, by default, from the step FLOPs of XLM-R Base/Large on one H100
   (989 TFLOP/s dense bf16) at 100% MFU (an upper bound on consumption) and 50% MFU.
Results go to --out (default bench/results/data_cpu.txt) with date, commit and command.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import bench_log  # noqa: E402  (bench/, beside this script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from xlmr_mp.atomic import atomic_write_text  # noqa: E402

H100_BF16_FLOPS = 989e12
SHAPES = {"base": dict(layers=12, hidden=768, ffn=3072), "large": dict(layers=24, hidden=1024, ffn=4096)}
VOCAB = 250002
LINES = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LINES.append(msg)


def vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def language_blocks(n_lang: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.exp(rng.uniform(np.log(1e4), np.log(1e8), n_lang)).astype(np.int64)


def blend_child(n: int, n_lang: int) -> None:
    """Runs in a fresh process: build the full index, report time, memory and frequency error."""
    if hasattr(os, "sched_setaffinity"):  # one core, as the target says
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from xlmr_mp import _C
    from xlmr_mp.data.blend import TOTAL_WEIGHT, BlendSpec, sampling_weights
    blocks = language_blocks(n_lang)
    spec = BlendSpec(sampling_weights(blocks, 0.3), blocks, seed=1234)
    base_kib = vm_kib("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    lang = np.empty(n, dtype=spec.lang_dtype)
    block = np.empty(n, dtype=spec.block_dtype)
    chunk = 50_000_000
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        _C.blend_window(spec.weights, spec.offsets, spec.n_blocks, TOTAL_WEIGHT, spec.seed, s, lang[s:e], block[s:e])
        el = time.perf_counter() - t0
        print(f"  [blend] {e:,}/{n:,} samples, {e / el / 1e6:.1f} M samples/s", file=sys.stderr, flush=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_kib = vm_kib("VmHWM")
    freq = np.bincount(lang, minlength=n_lang) / n
    rel = float(np.max(np.abs(freq - spec.q) / spec.q))
    print(json.dumps(dict(wall=wall, cpu=cpu, peak_bytes=(peak_kib - base_kib) * 1024, rel=rel,
                          lang_dtype=str(lang.dtype), block_dtype=str(block.dtype),
                          qmin=float(spec.q.min()), qmax=float(spec.q.max()))))


def phased_blend(n: int, n_lang: int):
    """The benchmark's 3-phase schedule: (PhasedBlend, phase starts, per-phase shares)."""
    from xlmr_mp.data.blend import PhasedBlend, sampling_weights
    blocks = language_blocks(n_lang)
    order = np.argsort(-blocks)                      # languages join largest first
    shares = []
    for frac, alpha in ((0.6, 0.7), (0.8, 0.5), (1.0, 0.3)):
        on = order[:max(1, int(round(frac * n_lang)))]
        q = np.zeros(n_lang)
        q[on] = sampling_weights(blocks[on], alpha)
        shares.append(q)
    starts = [0, n // 3, 2 * n // 3]
    return PhasedBlend(starts, shares, blocks, seed=1234), starts, shares


def phased_child(n: int, n_lang: int) -> None:
    """Runs in a fresh process: build the full 3-phase index, report time, memory and errors."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from xlmr_mp import _C
    from xlmr_mp.data.blend import TOTAL_WEIGHT
    base_kib = vm_kib("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    pb, starts, shares = phased_blend(n, n_lang)
    setup_cpu = time.process_time() - c0
    lang = np.empty(n, dtype=pb.lang_dtype)
    block = np.empty(n, dtype=pb.block_dtype)
    chunk = 50_000_000
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        p = pb.phase_index(s)
        while s < e:                                 # a chunk may cross a phase boundary
            ph = pb.phases[pb.phase_index(s)]
            stop = e if ph.end is None else min(e, ph.end)
            _C.blend_window_phase(ph.weights, ph.offsets, ph.kbase, pb.n_blocks, TOTAL_WEIGHT, pb.seed,
                                  s - ph.start, lang[s:stop], block[s:stop])
            s = stop
        el = time.perf_counter() - t0
        print(f"  [phased] {e:,}/{n:,} samples, {e / el / 1e6:.1f} M samples/s (phase {p})", file=sys.stderr, flush=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_kib = vm_kib("VmHWM")
    rel = []
    bounds = starts + [n]
    for p, q in enumerate(shares):
        seg = lang[bounds[p]:bounds[p + 1]]
        freq = np.bincount(seg, minlength=n_lang) / len(seg)
        on = q > 0
        rel.append(float(np.max(np.abs(freq[on] - q[on]) / q[on])) if not np.any(freq[~on]) else float("inf"))
    print(json.dumps(dict(wall=wall, cpu=cpu, setup_cpu=setup_cpu, peak_bytes=(peak_kib - base_kib) * 1024, rel=rel,
                          active=[int((q > 0).sum()) for q in shares])))


def bench_phased(n: int, n_lang: int, static: dict) -> None:
    log(f"== scheduled index: {n:,} samples, {n_lang} languages, 3 phases (alpha 0.7/0.5/0.3 over 60/80/100% "
        f"of the languages), C++ blend_window_phase, one core ==")
    out = subprocess.run([sys.executable, __file__, "--_phased-child", str(n), str(n_lang)], check=True,
                         stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1")).stdout
    r = json.loads(out.strip().splitlines()[-1])
    log(f"build: {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU ({n / r['cpu'] / 1e6:.1f} M samples/s CPU) incl. "
        f"phase setup {r['setup_cpu'] * 1e3:.1f} ms CPU; static index in this run: {static['cpu']:.1f} s CPU -> "
        f"scheduled / static CPU time = {r['cpu'] / static['cpu']:.2f}x")
    log(f"peak memory above baseline: {r['peak_bytes'] / n:.2f} bytes/sample (static: "
        f"{static['peak_bytes'] / n:.2f}); the phase tables are {3 * n_lang * 24} bytes")
    log("per-phase drawn frequency vs that phase's q_i: max relative error " +
        ", ".join(f"phase {p} ({a} languages) {e:.2e}" for p, (e, a) in enumerate(zip(r["rel"], r["active"]))))


def bench_blend(n: int, n_lang: int) -> dict:
    from xlmr_mp.data.blend import BlendSpec, blend_window_reference, sampling_weights
    log(f"== blended index: {n:,} samples over {n_lang} languages (C++, one thread pinned to one core) ==")
    out = subprocess.run([sys.executable, __file__, "--_blend-child", str(n), str(n_lang)], check=True,
                         stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1")).stdout
    r = json.loads(out.strip().splitlines()[-1])
    log(f"build: {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU ({n / r['wall'] / 1e6:.1f} M samples/s wall); "
        f"target < 60 s")
    log(f"peak memory above baseline: {r['peak_bytes'] / 2**30:.2f} GiB = {r['peak_bytes'] / n:.2f} bytes/sample "
        f"(language {r['lang_dtype']} + block {r['block_dtype']}); target <= 16")
    log(f"q_i in [{r['qmin']:.2e}, {r['qmax']:.3f}]; drawn frequency vs q_i over all {n:,}: "
        f"max relative error {r['rel']:.2e}")
    cpp_rate = n / r["cpu"]
    blocks = language_blocks(n_lang)
    spec = BlendSpec(sampling_weights(blocks, 0.3), blocks, seed=1234)
    m = 1_000_000
    t = time.process_time()
    blend_window_reference(spec, 0, m)
    ref_rate = m / (time.process_time() - t)
    log(f"peer numpy reference (same result): {ref_rate / 1e6:.2f} M samples/s CPU -> C++ is "
        f"{cpp_rate / ref_rate:.1f}x faster")
    try:
        from megatron.core.datasets import helpers_cpp
        m = 20_000_000
        di, dsi = np.zeros(m, dtype=np.int16), np.zeros(m, dtype=np.int64)
        t = time.process_time()
        helpers_cpp.build_blending_indices(di, dsi, spec.q, n_lang, m, False)
        meg_rate = m / (time.process_time() - t)
        log(f"peer megatron-core build_blending_indices (greedy O(N*L), 10 bytes/sample, no shuffle): "
            f"{meg_rate / 1e6:.2f} M samples/s CPU -> {n / meg_rate:.0f} s for {n:,}; C++ blend is "
            f"{cpp_rate / meg_rate:.1f}x faster")
    except ImportError:
        log("peer megatron-core helpers_cpp: not available")
    return r


def write_corpus(root: str, n_lang: int, seed: int = 0) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    import torch
    rng = np.random.default_rng(seed)
    tokens = np.exp(rng.uniform(np.log(3e4), np.log(6e5), n_lang)).astype(np.int64)
    for i, n_tok in enumerate(tokens):
        os.makedirs(os.path.join(root, f"l{i:03d}"), exist_ok=True)
        b = IndexedDatasetBuilder(os.path.join(root, f"l{i:03d}", "train.bin"), dtype=np.int32)
        done = 0
        while done < n_tok:
            lens = rng.integers(5, 60, 40)
            doc = rng.integers(4, VOCAB - 1, int(lens.sum()))
            doc[np.cumsum(lens) - 1] = 2
            b.add_document(torch.from_numpy(doc), lens.tolist())
            done += int(lens.sum())
        b.finalize(os.path.join(root, f"l{i:03d}", "train.idx"))


def train_seq_flops(shape: dict, seq: int = 512) -> float:
    """Training FLOPs of one sequence: 6 x (matmul params + tied LM head) per token + attention."""
    L, h, f = shape["layers"], shape["hidden"], shape["ffn"]
    per_token = 6 * (L * (4 * h * h + 2 * h * f) + h * h + h * VOCAB) + 12 * L * seq * h
    return per_token * seq


def bench_loader(steps: int, n_lang: int, step_seconds: float) -> None:
    import torch
    torch.set_num_threads(1)
    from xlmr_mp.data.config import DataConfig
    from xlmr_mp.data.loader import MLMLoader
    log("")
    log(f"== loader: global batch 8192 x 512 at DP=512 (16 sequences per rank per step), {n_lang} languages ==")
    rates = {}
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        write_corpus(root, n_lang)
        log(f"synthetic corpus written in {time.perf_counter() - t:.1f} s")
        for workers in (0, 2):
            cfg = DataConfig(path=root, seq_length=512, num_workers=workers, seed=1)
            t = time.perf_counter()
            loader = MLMLoader(cfg, dp_rank=37, dp_size=512, micro_batch=16, global_batch=8192, vocab_size=VOCAB)
            open_s = time.perf_counter() - t
            for _ in range(3):
                next(loader)
            t, c = time.perf_counter(), time.process_time()
            for _ in range(steps):
                b = next(loader)
            el, cpu = time.perf_counter() - t, time.process_time() - c
            assert b["input_ids"].shape == (16, 512)
            rates[workers] = steps * 16 / el
            extra = f"; {steps * 16 / cpu:.0f} sequences per CPU-second of this process" if workers == 0 else ""
            log(f"num_workers={workers}: {rates[workers]:.0f} sequences/s per rank wall "
                f"({el / steps * 1e3:.1f} ms per 16-sequence step{extra}; corpus opened + packed in {open_s:.1f} s)")
    best = max(rates.values())
    log("")
    log("== consumption by a training step (per GPU, 16 sequences per step) ==")
    if step_seconds > 0:
        need = 16 / step_seconds
        log(f"measured step {step_seconds:.3f} s -> {need:.0f} sequences/s; loader/consumption = {best / need:.1f}x")
    for name, shape in SHAPES.items():
        fl = train_seq_flops(shape)
        for mfu in (1.0, 0.5):
            need = mfu * H100_BF16_FLOPS / fl
            log(f"XLM-R {name}: {fl / 1e12:.2f} TFLOP/sequence; H100 at {mfu:.0%} MFU consumes {need:.0f} "
                f"sequences/s ({16 / need * 1e3:.0f} ms/step); loader (num_workers=0) / consumption = "
                f"{rates[0] / need:.1f}x, best = {best / need:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=float, default=1e9)
    ap.add_argument("--languages", type=int, default=100)
    ap.add_argument("--steps", type=int, default=40, help="timed loader steps")
    ap.add_argument("--step-seconds", type=float, default=0.0, help="a measured training step time, if any")
    ap.add_argument("--skip-blend", action="store_true")
    ap.add_argument("--skip-loader", action="store_true")
    ap.add_argument("--skip-schedule", action="store_true", help="leave out the 3-phase scheduled index")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "data_cpu.txt"))
    ap.add_argument("--_blend-child", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_phased-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._blend_child:
        blend_child(*args._blend_child)
        return
    if args._phased_child:
        phased_child(*args._phased_child)
        return
    from xlmr_mp.data.blend import have_cpp
    if not have_cpp():
        raise SystemExit("xlmr_mp._C is not built: run `python setup.py build_ext --inplace` (or pip install -e .)")
    log(bench_log.header("data.py"))
    log(f"# command: python {' '.join(sys.argv)}")
    log(f"# machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start "
        f"(shared machine: wall times are inflated by other jobs; CPU times are this process's)")
    if not args.skip_blend:
        static = bench_blend(int(args.samples), args.languages)
        if not args.skip_schedule:
            bench_phased(int(args.samples), args.languages, static)
    if not args.skip_loader:
        bench_loader(args.steps, args.languages, args.step_seconds)
    log(f"# load average at end {os.getloadavg()[0]:.1f}")
    if args.out:
        atomic_write_text(args.out, "\n".join(LINES) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
