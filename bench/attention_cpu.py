#!/usr/bin/env python
"""The fused CPU attention kernel (xlmr_mp/kernels/attention_cpu.py, csrc/attention_cpu.cpp)
against its peer, torch's scaled_dot_product_attention (the CPU flash kernel), forward + backward
over the same [B, S, heads, 3, D] fused-QKV input, fp32, in the same run. Each shape is timed in
alternating rounds (ours, SDPA, ours, ...) and the medians are printed with their ratio; the
largest difference of the outputs and of the QKV gradients is printed beside them.

    OMP_NUM_THREADS=1 python bench/attention_cpu.py
    OMP_NUM_THREADS=1 python bench/attention_cpu.py --out bench/results/attention_cpu.txt

Default shapes: the tiny preset (micro 8, S 64, 4 heads of 16), the scaling studies' S=128 at head
dims 16-42, and S=256/512 with 64-dim heads (where the model keeps SDPA: MAX_SEQ).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time


import torch  # noqa: E402
import bench_log  # noqa: E402  (bench/, beside this script)

from xlmr_mp.kernels import attention_cpu  # noqa: E402

SHAPES = [(8, 64, 4, 16), (8, 128, 4, 16), (8, 128, 4, 32), (8, 128, 4, 42), (8, 256, 8, 64), (2, 512, 16, 64)]


def _parse_shape(text: str):
    try:
        b, s, h, d = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: give BxSxHEADSxD, e.g. 8x64x4x16") from None
    return b, s, h, d


def _round(fn, qkv, grad, bias, scale, n):
    t0 = time.perf_counter()
    for _ in range(n):
        x = qkv.detach().requires_grad_(True)
        fn(x, bias, scale).backward(grad)
    return (time.perf_counter() - t0) / n


def bench_shape(B, S, NH, D, rounds, pad):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, S, NH, 3, D, generator=g)
    grad = torch.randn(B, S, NH * D, generator=g)
    bias = None
    if pad:
        keep = torch.ones(B, S)
        keep[:, S - S // 8:] = 0
        bias = ((1.0 - keep) * torch.finfo(torch.float32).min)[:, None, None, :]
    scale = 1.0 / math.sqrt(D)
    outs = []
    for fn in (attention_cpu.attention, attention_cpu.attention_ref):
        x = qkv.clone().requires_grad_(True)
        o = fn(x, bias, scale)
        o.backward(grad)
        outs.append((o.detach(), x.grad))
    err_out = (outs[0][0] - outs[1][0]).abs().max().item()
    err_grad = (outs[0][1] - outs[1][1]).abs().max().item()
    n = max(2, int(3e7 / (B * NH * S * S * D)))           # ~10-50 ms a round
    ours, peer = [], []
    for fn in (attention_cpu.attention, attention_cpu.attention_ref):
        _round(fn, qkv, grad, bias, scale, 2)             # warm-up
    for _ in range(rounds):
        ours.append(_round(attention_cpu.attention, qkv, grad, bias, scale, n))
        peer.append(_round(attention_cpu.attention_ref, qkv, grad, bias, scale, n))
    mo, mp = statistics.median(ours), statistics.median(peer)
    flops = 12 * B * NH * S * S * D                       # 2 GEMMs forward, 4 backward, 2 B H S^2 D each
    return (f"B={B} S={S} heads={NH} D={D}{' pad' if pad else ''}: ours {mo * 1e3:.3f} ms "
            f"({flops / mo / 1e9:.1f} GFLOP/s), SDPA {mp * 1e3:.3f} ms, ratio SDPA/ours {mp / mo:.2f} "
            f"(min {min(peer) / max(ours):.2f}, max {max(peer) / min(ours):.2f}); "
            f"max |diff| out {err_out:.1e} grad {err_grad:.1e}; kernel used in the model: "
            f"{attention_cpu.applies(qkv, bias, 0.0)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=_parse_shape, action="append", help="BxSxHEADSxD (repeatable; default: "
                    + ", ".join("x".join(map(str, s)) for s in SHAPES) + ")")
    ap.add_argument("--rounds", type=int, default=7, help="alternating timing rounds per shape (median)")
    ap.add_argument("--pad", action="store_true", help="also time each shape with 1/8 padding keys")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default="", help="append the result to this file")
    a = ap.parse_args(argv)
    if attention_cpu._ext() is None:
        print("attention_cpu: the kernel is unavailable here (xlmr_mp._C without it, or no AVX2/FMA)", file=sys.stderr)
        return 2
    rows = (bench_shape(*shape, a.rounds, pad) for shape in a.shape or SHAPES
            for pad in ((False, True) if a.pad else (False,)))
    bench_log.cpu_kernel_run("attention_cpu.py", argv, f"fp32 forward + backward, median of {a.rounds} alternating "
                             "rounds", rows, a.note, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
