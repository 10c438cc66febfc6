"""Benchmark of the fused CUDA kernels (xlmr_mp._cuda) against torch eager and torch.compile of
the same op, forward and backward, on XLM-R shapes.

For each op and pass it prints the time (median of CUDA-event timings), the achieved bandwidth
(bytes the fused kernel design must move / time) and its fraction of the device's measured copy
bandwidth (a device-to-device copy_ of 1 GiB), and the speed-up against eager and compiled torch.
Memory-bound kernels should reach >= 80% of the copy bandwidth. Results go to
bench/results/kernels_<gpu>.json; the ops faster than both torch paths (forward + backward) are
printed as FASTER_ON entries for xlmr_mp/kernels/dispatch.py.

    python bench/kernels_gpu.py [--dtype bf16|fp16] [--tokens 16384] [--iters 50] [--no-compile]

Needs a CUDA GPU and the built extension; exits with a message otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F


from xlmr_mp.atomic import atomic_write  # noqa: E402
from xlmr_mp.kernels import dispatch, fused, mlm_xent, ops  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def time_cuda(fn, iters: int, warmup: int = 5) -> float:
    """Median seconds of fn() over `iters` CUDA-event-timed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def copy_bandwidth(iters: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), iters)
    del src, dst
    return 2 * n / t


def _compile(fn):
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as e:  # noqa: BLE001 - report and go on without it
        print(f"  torch.compile unavailable: {e}", flush=True)
        return None


def _fwd_bwd(fn, inputs, grad):
    """(forward closure, backward closure) of fn(*inputs) with fixed upstream grad."""
    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def bwd():
        out = fn(*inputs)
        torch.autograd.grad(out, leaves, grad)
    return fwd, bwd


def bench_op(name, impls, inputs, grad, bytes_fwd, bytes_bwd, iters, copy_bw, rows):
    """Time forward and forward+backward of each impl; record rows."""
    res = {}
    for impl_name, fn in impls.items():
        if fn is None:
            continue
        try:
            fwd, bwd = _fwd_bwd(fn, inputs, grad)
            tf = time_cuda(fwd, iters)
            tfb = time_cuda(bwd, iters)
            res[impl_name] = (tf, max(tfb - tf, 1e-9), tfb)
        except Exception as e:  # noqa: BLE001 - e.g. a torch.compile failure: report, keep going
            print(f"  {name} [{impl_name}] failed: {type(e).__name__}: {e}", flush=True)
    for impl_name, (tf, tb, tfb) in res.items():
        row = dict(op=name, impl=impl_name, fwd_ms=tf * 1e3, bwd_ms=tb * 1e3, fwd_bwd_ms=tfb * 1e3)
        if impl_name == "fused":
            row.update(fwd_GBps=bytes_fwd / tf / 1e9, bwd_GBps=bytes_bwd / tb / 1e9,
                       fwd_of_copy=bytes_fwd / tf / copy_bw, bwd_of_copy=bytes_bwd / tb / copy_bw)
            for peer in ("eager", "compile"):
                if peer in res:
                    row[f"speedup_vs_{peer}_fwd"] = res[peer][0] / tf
                    row[f"speedup_vs_{peer}_fwd_bwd"] = res[peer][2] / tfb
        rows.append(row)
        extra = ""
        if impl_name == "fused":
            extra = (f"  fwd {row['fwd_GBps']:7.1f} GB/s ({100 * row['fwd_of_copy']:5.1f}% of copy)"
                     f"  bwd {row['bwd_GBps']:7.1f} GB/s ({100 * row['bwd_of_copy']:5.1f}% of copy)")
            for peer in ("eager", "compile"):
                if f"speedup_vs_{peer}_fwd_bwd" in row:
                    extra += f"  x{row[f'speedup_vs_{peer}_fwd_bwd']:.2f} vs {peer}"
        print(f"  {name:32s} {impl_name:8s} fwd {tf * 1e3:8.3f} ms  fwd+bwd {tfb * 1e3:8.3f} ms{extra}",
              flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fused kernel benchmark (GPU)")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch (B * S)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1024, help="1024: XLM-R large; 768: base")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab-shard", type=int, default=250002, help="V / TP columns of the LM head")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/kernels_<gpu>.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.",
              file=sys.stderr)
        return 2
    if dispatch.extension() is None:
        print("xlmr_mp._cuda is not built: pip install --no-build-isolation -e . with a CUDA torch and nvcc",
              file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    s = torch.finfo(dtype).bits // 8
    dev = torch.cuda.get_device_name()
    arch = dispatch.arch(torch.device("cuda"))
    print(f"device: {dev} ({arch}), torch {torch.__version__}, dtype {args.dtype}", flush=True)
    copy_bw = copy_bandwidth(args.iters)
    print(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s (device-to-device copy_, read + write)", flush=True)
    rows: list[dict] = []
    t0 = time.time()
    N, H, I = args.tokens, args.hidden, 4 * args.hidden

    def peers(ref):
        return {"fused": None, "eager": ref, "compile": None if args.no_compile else _compile(ref)}

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda") * scale).to(dtype).requires_grad_(True)

    # 1. bias + GELU on the FFN intermediate [N, 4H]
    x, b = leaf(N, I), leaf(I)
    impls = peers(ops.bias_gelu_ref)
    impls["fused"] = fused.BiasGelu.apply
    bench_op("bias_gelu", impls, (x, b), torch.randn(N, I, device="cuda").to(dtype),
             2 * N * I * s, 3 * N * I * s, args.iters, copy_bw, rows)

    # 2. bias + dropout + add + LayerNorm on [N, H], training (p = 0.1)
    x, b, r, w, lb = leaf(N, H), leaf(H), leaf(N, H), leaf(H), leaf(H)
    impls = peers(lambda *a: ops.bias_dropout_add_layernorm_ref(*a, 0.1, True, 1e-5))
    impls["fused"] = lambda *a: fused.BiasDropoutAddLayerNorm.apply(*a, 0.1, True, 1e-5)
    # fwd: read x, residual; write out, y, keep mask. bwd: rows kernel reads dout, y, mask, writes
    # dresidual, dx; column kernel reads dout, y, dx.
    bench_op("bias_dropout_add_layernorm", impls, (x, b, r, w, lb), torch.randn(N, H, device="cuda").to(dtype),
             (4 * s + 1) * N * H, (8 * s + 1) * N * H, args.iters, copy_bw, rows)

    # 3. scaled masked softmax on [B, heads, S, S] with a padding mask
    B, S = max(1, N // args.seq), args.seq
    sc = leaf(B, args.heads, S, S)
    lengths = torch.randint(S // 2, S + 1, (B,), device="cuda")
    mask = (torch.arange(S, device="cuda")[None, :] >= lengths[:, None]).view(B, 1, 1, S)
    scale = 1 / math.sqrt(H // args.heads)
    impls = peers(lambda t: ops.scaled_masked_softmax_ref(t, mask, scale))
    impls["fused"] = lambda t: fused.ScaledMaskedSoftmax.apply(t, mask, scale)
    n = B * args.heads * S * S
    bench_op("scaled_masked_softmax", impls, (sc,), torch.randn(sc.shape, device="cuda").to(dtype),
             2 * n * s, 3 * n * s, args.iters, copy_bw, rows)

    # 4. MLM shard cross-entropy: logits-only part (stats pass + in-place gradient) on [M, V/TP]
    M, V = max(1, int(0.15 * N)), args.vocab_shard
    logits = (torch.randn(M, V, device="cuda") * 2).to(dtype)
    tgt = torch.randint(0, V, (M,), device="cuda")
    gs = torch.ones(M, device="cuda")

    def xent_fused_fwd():
        return fused.mlm_xent_stats(logits, tgt)

    def xent_eager_fwd():
        lf = logits.float()
        return torch.logsumexp(lf, -1), lf.gather(1, tgt[:, None])

    lse = xent_fused_fwd()[0]
    work = logits.clone()

    def xent_fused_bwd():
        work.copy_(logits)  # the kernel overwrites its input; the copy is timed and subtracted
        fused.mlm_xent_grad_(work, tgt, lse, gs)

    def xent_copy():
        work.copy_(logits)

    def xent_eager_bwd():
        return mlm_xent.shard_xent_grad_ref(logits, tgt, lse, gs)

    comp_fwd = None if args.no_compile else _compile(xent_eager_fwd)
    comp_bwd = None if args.no_compile else _compile(xent_eager_bwd)
    tcopy = time_cuda(xent_copy, args.iters)
    res = {}
    for impl_name, (f, g) in {"fused": (xent_fused_fwd, xent_fused_bwd), "eager": (xent_eager_fwd, xent_eager_bwd),
                              "compile": (comp_fwd, comp_bwd)}.items():
        if f is None:
            continue
        try:
            tf = time_cuda(f, args.iters)
            tb = time_cuda(g, args.iters) - (tcopy if impl_name == "fused" else 0.0)
            res[impl_name] = (tf, max(tb, 1e-9))
        except Exception as e:  # noqa: BLE001
            print(f"  mlm_xent [{impl_name}] failed: {type(e).__name__}: {e}", flush=True)
    for impl_name, (tf, tb) in res.items():
        row = dict(op="mlm_xent", impl=impl_name, fwd_ms=tf * 1e3, bwd_ms=tb * 1e3, fwd_bwd_ms=(tf + tb) * 1e3)
        line = f"  {'mlm_xent (stats / grad_)':32s} {impl_name:8s} fwd {tf * 1e3:8.3f} ms  bwd {tb * 1e3:8.3f} ms"
        if impl_name == "fused":
            row.update(fwd_GBps=M * V * s / tf / 1e9, bwd_GBps=2 * M * V * s / tb / 1e9,
                       fwd_of_copy=M * V * s / tf / copy_bw, bwd_of_copy=2 * M * V * s / tb / copy_bw)
            line += (f"  fwd {row['fwd_GBps']:7.1f} GB/s ({100 * row['fwd_of_copy']:5.1f}% of copy)"
                     f"  bwd {row['bwd_GBps']:7.1f} GB/s ({100 * row['bwd_of_copy']:5.1f}% of copy)")
            for peer in ("eager", "compile"):
                if peer in res:
                    row[f"speedup_vs_{peer}_fwd_bwd"] = sum(res[peer]) / (tf + tb)
                    line += f"  x{row[f'speedup_vs_{peer}_fwd_bwd']:.2f} vs {peer}"
        rows.append(row)
        print(line, flush=True)

    faster = sorted({r["op"] for r in rows if r["impl"] == "fused"
                     and all(r.get(f"speedup_vs_{p}_fwd_bwd", 0.0) > 1.0 for p in ("eager", "compile")
                             if any(q["op"] == r["op"] and q["impl"] == p for q in rows))})
    print(f"ops faster than every torch peer on {arch}: {faster}")
    print("FASTER_ON entries for xlmr_mp/kernels/dispatch.py: "
          + ", ".join(f'"{op}": frozenset({{"{arch}"}})' for op in faster))
    out = args.out or os.path.join(RESULTS, f"kernels_{arch}_{args.dtype}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    payload = dict(device=dev, arch=arch, torch=torch.__version__, dtype=args.dtype, copy_GBps=copy_bw / 1e9,
                   shapes=dict(tokens=N, hidden=H, ffn=I, heads=args.heads, seq=S, masked=M, vocab_shard=V),
                   faster_on=faster, rows=rows, seconds=time.time() - t0)
    with atomic_write(out) as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {out} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
