#!/usr/bin/env python
"""Masked-LM head: ours (gather the masked positions, then dense/GELU/LN and the chunked
vocab-parallel loss of the tied decoder on those only: the model path), the previous path (the
same positions with their [masked, V] logits materialised), and a head that projects every position and takes
F.cross_entropy with ignore_index (what HF's XLMRobertaForMaskedLM and Megatron-LM's BERT do).
Both run forward + backward in the same invocation; time and peak memory are printed with ratios.

    python bench/mlm_head.py                               # 16 x 512, 15% masked, V=250002, H=1024
    python bench/mlm_head.py --batch 2 --out bench/results/mlm_head_cpu.txt

Peak memory: on CUDA, torch.cuda.max_memory_allocated above the inputs and weights; on CPU, each
variant runs in its own subprocess and we report its peak RSS (VmHWM, reset once inputs exist) above the RSS
after the inputs and weights were allocated (includes allocator slack; a coarse but fair measure).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


import torch  # noqa: E402
import bench_log  # noqa: E402  (bench/, beside this script)
import torch.nn.functional as F  # noqa: E402

from xlmr_mp.atomic import atomic_write_text  # noqa: E402
from xlmr_mp.ids import IGNORE_INDEX  # noqa: E402
from xlmr_mp.metrics import peak_rss_bytes, reset_peak_rss  # noqa: E402


def _setup(args, device):
    from xlmr_mp import kernels
    from xlmr_mp.model.config import ModelConfig
    from xlmr_mp.model.xlmr import MLMHead
    from xlmr_mp.parallel.vocab import padded_vocab_size
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=1, num_heads=16,
                      ffn_size=4 * args.hidden)
    vp = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    head = MLMHead(cfg, vp).to(device=device, dtype=dtype)
    kernels.apply(head, device)           # the model's path in training: the fused paths applied
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.02, generator=None)
    weight = torch.nn.Parameter((torch.randn(vp, args.hidden, generator=g) * 0.02).to(device=device, dtype=dtype))
    hidden = torch.randn(args.batch, args.seq, args.hidden, generator=g).to(device=device, dtype=dtype)
    hidden.requires_grad_(True)
    labels = torch.full((args.batch, args.seq), IGNORE_INDEX, dtype=torch.long)
    pick = torch.rand(args.batch, args.seq, generator=g) < args.mask_frac
    labels[pick] = torch.randint(3, args.vocab, (int(pick.sum()),), generator=g)
    return head, weight, hidden, labels.to(device), int(pick.sum())


def _chunked(head, weight, hidden, labels):
    """The model path (MLMHead.masked_loss_sum): masked positions gathered, then the chunked
    vocab-parallel loss (parallel/vocab.py), never holding the [masked, V] fp32 logits."""
    loss_sum, count = head.masked_loss_sum(hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), weight)
    return loss_sum / count


def _gathered(head, weight, hidden, labels):
    """The previous model path: masked positions gathered, [masked, V] logits materialised, then
    the vocab-parallel cross-entropy."""
    from xlmr_mp.parallel.vocab import vocab_parallel_cross_entropy
    h = hidden.reshape(-1, hidden.shape[-1])
    flat = labels.reshape(-1)
    sel = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    logits = head(h.index_select(0, sel), weight)
    return vocab_parallel_cross_entropy(logits, flat.index_select(0, sel)).mean()


def _full(head, weight, hidden, labels):
    """HF XLMRobertaLMHead + F.cross_entropy: every position projected onto the real vocabulary."""
    from xlmr_mp.kernels import ops
    x = ops.bias_gelu(F.linear(hidden, head.dense.weight), head.dense.bias)
    x = head.layernorm(x)
    V = head.vocab_size
    logits = F.linear(x, weight[:V], head.bias[:V])               # [B, S, V]
    return F.cross_entropy(logits.reshape(-1, V).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure(args, variant: str) -> dict:
    """Time (median of --iters fwd+bwd) and peak extra memory of one variant, in this process."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads) if device.type == "cpu" else None
    head, weight, hidden, labels, n_masked = _setup(args, device)
    fn = {"chunked": _chunked, "gathered": _gathered, "full": _full}[variant]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
        reset_peak_rss()
    times = []
    loss = None
    for i in range(args.warmup + args.iters):
        for p in (weight, hidden, *head.parameters()):
            p.grad = None
        sync()
        t0 = time.perf_counter()
        loss = fn(head, weight, hidden, labels)
        loss.backward()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        print(f"  {variant}: iter {i + 1}/{args.warmup + args.iters} {times[-1] * 1e3 if times else 0:.1f} ms",
              file=sys.stderr, flush=True)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        peak = peak_rss_bytes() / 2 ** 20 - base
    return {"variant": variant, "ms": statistics.median(times) * 1e3, "peak_mb": peak,
            "loss": loss.item(), "masked": n_masked}


LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--mask-frac", type=float, default=0.15)
    p.add_argument("--vocab", type=int, default=250002)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="", help="also write the report here (temp file, then rename)")
    p.add_argument("--no-full", action="store_true",
                   help="skip the full-projection head (it needs > 24 GiB at 16 x 512 on a CPU)")
    p.add_argument("--note", default="", help="a line recorded with the result (the machine's state, ...)")
    p.add_argument("--_child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print("RESULT " + json.dumps(measure(args, args._child)), flush=True)
        return 0
    results = {}
    for variant in ("chunked", "gathered") + (() if args.no_full else ("full",)):
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            results[variant] = measure(args, variant)
        else:  # own process, so its high-water mark is this variant's peak alone
            cmd = [sys.executable, os.path.abspath(__file__), "--_child", variant,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--mask-frac", str(args.mask_frac),
                   "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--dtype", args.dtype,
                   "--device", args.device, "--iters", str(args.iters), "--warmup", str(args.warmup),
                   "--threads", str(args.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            sys.stderr.write(r.stderr)
            if r.returncode:
                print(f"{variant} run failed (exit {r.returncode})", file=sys.stderr)
                return r.returncode
            results[variant] = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    c, g = results["chunked"], results["gathered"]
    f = results.get("full")
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({args.threads} threads)"
    commit = bench_log.commit()
    mem_how = ("torch.cuda.max_memory_allocated above inputs+weights" if args.device.startswith("cuda")
               else "peak RSS (VmHWM, reset after inputs+weights) above RSS after inputs+weights, one subprocess per variant")
    lines = [
        f"# bench/mlm_head.py  {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  commit {commit}",
        f"# command: python bench/mlm_head.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        f"# device: {dev}; dtype {args.dtype}; tokens {args.batch}x{args.seq}, masked {g['masked']} "
        f"({args.mask_frac:.0%}), V={args.vocab}, H={args.hidden}; median of {args.iters} fwd+bwd after "
        f"{args.warmup} warmup",
        f"# memory: {mem_how}",
        f"chunked (ours, model) : {c['ms']:10.1f} ms   peak {c['peak_mb']:10.1f} MiB   loss {c['loss']:.4f}",
        f"gathered (previous)   : {g['ms']:10.1f} ms   peak {g['peak_mb']:10.1f} MiB   loss {g['loss']:.4f}",
        f"ratio gathered/chunked: time {g['ms'] / c['ms']:.2f}x   memory {g['peak_mb'] / max(c['peak_mb'], 1e-9):.2f}x",
    ]
    if f is not None:
        lines[-1:-1] = [f"full projection (HF)  : {f['ms']:10.1f} ms   peak {f['peak_mb']:10.1f} MiB   loss {f['loss']:.4f}"]
        lines.append(f"ratio full/chunked    : time {f['ms'] / c['ms']:.2f}x   memory {f['peak_mb'] / max(c['peak_mb'], 1e-9):.2f}x")
    esize = torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    vp = -(-args.vocab // 128) * 128
    lines.append(f"# both peaks include the decoder weight gradient ({vp * args.hidden * esize / 2 ** 20:.0f} MiB); "
                 f"all-position logits alone are {args.batch * args.seq * args.vocab * esize / 2 ** 20:.0f} MiB "
                 f"vs {g['masked'] * vp * esize / 2 ** 20:.0f} MiB gathered")
    if not args.device.startswith("cuda"):
        lines.append(f"# load average (1 min) at the start: {LOAD_AT_START:.2f}")
    if args.note:
        lines.append(f"# note: {args.note}")
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write_text(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
