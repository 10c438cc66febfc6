"""Benchmark of the fused CUDA kernels (xlmr_mp._cuda), called through their registered ops
(torch.ops.xlmr_mp.*, whose CUDA keys they are), against torch eager and torch.compile of the same
op's reference, forward and backward, on XLM-R shapes.

For each op and pass it prints the time (median of CUDA-event timings), the achieved bandwidth
(bytes the fused kernel design must move / time) and its fraction of the device's measured copy
bandwidth (a device-to-device copy_ of 1 GiB), and the speed-up against eager and compiled torch.
Memory-bound kernels should reach >= 80% of the copy bandwidth. Results go to
bench/results/kernels_<gpu>.json; the ops faster than both torch paths (forward + backward) are
printed as FASTER_ON entries for xlmr_mp/kernels/dispatch.py.

    python bench/kernels_gpu.py [--dtype bf16|fp16] [--tokens 16384] [--iters 50] [--no-compile] [--budget-s S]

The JSON is rewritten after every measurement (`complete: false` until the end), fused and eager
for every op first and the torch.compile peers last, so a time limit loses only what it cut.

Needs a CUDA GPU and the built extension; exits with a message otherwise. `--device cpu` runs the
same cases on the ops' CPU keys with wall-clock timing (bench/gpu_suite.sh --dry-run and
tests/tools/test_bench_kernels_gpu.py, at tiny shapes), so every call the GPU run makes is run
without a GPU; its figures are not CUDA figures and propose no FASTER_ON entry.
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


from xlmr_mp.atomic import atomic_write  # noqa: E402
from xlmr_mp.kernels import bias_dropout_add_layernorm_op, dispatch, fused, mlm_xent, ops  # noqa: E402,F401

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


def time_wall(fn, iters: int, warmup: int = 1) -> float:
    """Median seconds of fn() over `iters` wall-clock-timed calls (a CPU device)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timer(device: torch.device):
    """The timing function for `device`: CUDA events on a GPU, the wall clock elsewhere."""
    return time_cuda if device.type == "cuda" else time_wall


def copy_bandwidth(iters: int, device: torch.device, nbytes: int = 1 << 30) -> float:
    """Same-device copy bandwidth in bytes/s (read + write counted) of a copy_ of `nbytes`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timer(device)(lambda: dst.copy_(src), iters)
    del src, dst
    return 2 * nbytes / t


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


class Results:
    """The benchmark's rows, written to `path` (atomically) after every measurement, so a run cut
    short (a time limit, a crash in a later op) keeps every figure measured before it: the JSON's
    `complete` is false until `finish()`, and `skipped` names what the time budget left out."""

    def __init__(self, path: str, meta: dict, copy_bw: float):
        self.path, self.meta, self.copy_bw = path, dict(meta), copy_bw
        self.t0 = time.time()
        self.times: dict = {}          # op -> impl -> (fwd s, bwd s)
        self.bytes: dict = {}          # op -> (bytes fwd, bytes bwd) the fused design must move
        self.order: list = []
        self.skipped: list = []
        self.complete = False

    def record(self, op: str, impl: str, fwd_s: float, bwd_s: float, bytes_fwd: float, bytes_bwd: float) -> dict:
        if op not in self.times:
            self.times[op] = {}
            self.order.append(op)
        self.times[op][impl] = (fwd_s, max(bwd_s, 1e-9))
        self.bytes[op] = (bytes_fwd, bytes_bwd)
        self.write()
        return self.row(op, impl)

    def skip(self, what: str) -> None:
        self.skipped.append(what)
        self.write()

    def row(self, op: str, impl: str) -> dict:
        tf, tb = self.times[op][impl]
        row = dict(op=op, impl=impl, fwd_ms=tf * 1e3, bwd_ms=tb * 1e3, fwd_bwd_ms=(tf + tb) * 1e3)
        if impl == "fused":
            bf, bb = self.bytes[op]
            row.update(fwd_GBps=bf / tf / 1e9, bwd_GBps=bb / tb / 1e9,
                       fwd_of_copy=bf / tf / self.copy_bw, bwd_of_copy=bb / tb / self.copy_bw)
            for peer, (pf, pb) in self.times[op].items():
                if peer != "fused":
                    row[f"speedup_vs_{peer}_fwd"] = pf / tf
                    row[f"speedup_vs_{peer}_fwd_bwd"] = (pf + pb) / (tf + tb)
        return row

    def rows(self) -> list:
        return [self.row(op, impl) for op in self.order for impl in self.times[op]]

    def faster(self) -> list:
        """Ops whose fused kernel beat every torch peer measured for it (forward + backward)."""
        return sorted(op for op in self.order if "fused" in self.times[op] and len(self.times[op]) > 1
                      and all(v > 1.0 for k, v in self.row(op, "fused").items() if k.endswith("_fwd_bwd")))

    def write(self) -> None:
        payload = dict(self.meta, copy_GBps=self.copy_bw / 1e9, complete=self.complete, skipped=self.skipped,
                       faster_on=self.faster(), rows=self.rows(), seconds=time.time() - self.t0)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with atomic_write(self.path) as f:
            json.dump(payload, f, indent=1)

    def finish(self) -> None:
        self.complete = True
        self.write()


def print_row(row: dict) -> None:
    extra = ""
    if row["impl"] == "fused":
        extra = (f"  fwd {row['fwd_GBps']:7.1f} GB/s ({100 * row['fwd_of_copy']:5.1f}% of copy)"
                 f"  bwd {row['bwd_GBps']:7.1f} GB/s ({100 * row['bwd_of_copy']:5.1f}% of copy)")
        for peer in ("eager", "compile"):
            if f"speedup_vs_{peer}_fwd_bwd" in row:
                extra += f"  x{row[f'speedup_vs_{peer}_fwd_bwd']:.2f} vs {peer}"
    print(f"  {row['op']:32s} {row['impl']:8s} fwd {row['fwd_ms']:8.3f} ms  bwd {row['bwd_ms']:8.3f} ms{extra}",
          flush=True)


def measure(results: Results, case: dict, impl: str, iters: int, time_fn=time_cuda) -> None:
    """Time one implementation of one op (forward; forward + backward, or the backward closure)
    with `time_fn` (`timer(device)`); a failure is printed and listed under `skipped`."""
    fn = case["impls"][impl]
    if impl == "compile":
        fn = _compile(fn) if not case.get("pair") else tuple(_compile(f) for f in fn)
    if fn is None or (isinstance(fn, tuple) and None in fn):
        return
    try:
        if case.get("pair"):                    # (forward, backward) closures timed apart
            f, g = fn
            tf = time_fn(f, iters)
            tb = time_fn(g, iters) - (case["copy_s"]() if impl == "fused" else 0.0)
        else:
            fwd, bwd = _fwd_bwd(fn, case["inputs"], case["grad"])
            tf = time_fn(fwd, iters)
            tb = time_fn(bwd, iters) - tf
    except Exception as e:  # noqa: BLE001 - e.g. a torch.compile failure: report, keep going
        print(f"  {case['op']} [{impl}] failed: {type(e).__name__}: {e}", flush=True)
        results.skip(f"{case['op']}/{impl}: {type(e).__name__}")
        return
    print_row(results.record(case["op"], impl, tf, tb, case["bytes"][0], case["bytes"][1]))


def build_cases(device: torch.device, dtype: torch.dtype, *, tokens: int, seq: int, hidden: int, heads: int,
                vocab_shard: int, iters: int) -> list:
    """The measured cases on `device`: per op a dict with `op`, `impls` (fused: the registered op
    torch.ops.xlmr_mp.*; eager and compile: its torch reference), `inputs` and upstream `grad` (or
    `pair`: forward and backward closures timed apart), and `bytes` (forward, backward) the fused
    kernel design must move, for the shapes of one micro-batch of `tokens` tokens."""
    N, H, I = tokens, hidden, 4 * hidden
    B, S = max(1, N // seq), seq
    M, V = max(1, int(0.15 * N)), vocab_shard
    s = torch.finfo(dtype).bits // 8
    time_fn = timer(device)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(True)

    def rand(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    cases = []
    # 1. bias + GELU on the FFN intermediate [N, 4H]
    x, b = leaf(N, I), leaf(I)
    cases.append(dict(op="bias_gelu", impls={"fused": torch.ops.xlmr_mp.bias_gelu, "eager": ops.bias_gelu_ref,
                                             "compile": ops.bias_gelu_ref},
                      inputs=(x, b), grad=rand(N, I), bytes=(2 * N * I * s, 3 * N * I * s)))

    # 2. bias + dropout + add + LayerNorm on [N, H], training (p = 0.1): the fused path draws the
    # keep multiplier (dropout_keep, written once in x's dtype) and runs the op. fwd: read x,
    # residual, keep; write out, y. bwd: rows kernel reads dout, y, keep, writes dresidual, dx;
    # column kernel reads dout, y, dx.
    ref = lambda *a: ops.bias_dropout_add_layernorm_ref(*a, 0.1, True, 1e-5)        # noqa: E731
    bdaln = lambda *a: bias_dropout_add_layernorm_op.bias_dropout_add_layernorm(*a, 0.1, True, 1e-5)  # noqa: E731
    cases.append(dict(op="bias_dropout_add_layernorm", impls={"fused": bdaln, "eager": ref, "compile": ref},
                      inputs=(leaf(N, H), leaf(H), leaf(N, H), leaf(H), leaf(H)), grad=rand(N, H),
                      bytes=(6 * s * N * H, 8 * s * N * H)))

    # 3. scaled masked softmax on [B, heads, S, S] with a padding mask
    sc = leaf(B, heads, S, S)
    lengths = torch.randint(S // 2, S + 1, (B,), device=device)
    mask = (torch.arange(S, device=device)[None, :] >= lengths[:, None]).view(B, 1, 1, S)
    scale = 1 / math.sqrt(H // heads)
    ref_sm = lambda t: ops.scaled_masked_softmax_ref(t, mask, scale)                   # noqa: E731
    n = B * heads * S * S
    cases.append(dict(op="scaled_masked_softmax",
                      impls={"fused": lambda t: torch.ops.xlmr_mp.scaled_masked_softmax(t, mask, scale),
                             "eager": ref_sm, "compile": ref_sm},
                      inputs=(sc,), grad=torch.randn(sc.shape, device=device).to(dtype),
                      bytes=(2 * n * s, 3 * n * s)))

    # 4. MLM shard cross-entropy: logits-only part (stats pass + in-place gradient) on [M, V/TP]
    logits = (torch.randn(M, V, device=device) * 2).to(dtype)
    tgt = torch.randint(0, V, (M,), device=device)
    gs = torch.ones(M, device=device)
    lse = torch.ops.xlmr_mp.mlm_xent_stats(logits, tgt)[0]
    work = logits.clone()

    def xent_fused_fwd():
        return torch.ops.xlmr_mp.mlm_xent_stats(logits, tgt)

    def xent_eager_fwd():
        lf = logits.float()
        return torch.logsumexp(lf, -1), lf.gather(1, tgt[:, None])

    def xent_fused_bwd():
        work.copy_(logits)  # the kernel overwrites its input; the copy is timed and subtracted
        torch.ops.xlmr_mp.mlm_xent_grad_(work, tgt, lse, gs)

    def xent_eager_bwd():
        return mlm_xent.shard_xent_grad_ref(logits, tgt, lse, gs)

    copy_s = []

    def xent_copy_s():
        if not copy_s:
            copy_s.append(time_fn(lambda: work.copy_(logits), iters))
        return copy_s[0]

    cases.append(dict(op="mlm_xent", pair=True, copy_s=xent_copy_s,
                      impls={"fused": (xent_fused_fwd, xent_fused_bwd),
                             "eager": (xent_eager_fwd, xent_eager_bwd), "compile": (xent_eager_fwd, xent_eager_bwd)},
                      bytes=(M * V * s, 2 * M * V * s)))
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fused kernel benchmark (GPU)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the ops' CPU keys, wall-clock timed (a check of the bench at tiny shapes)")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch (B * S)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1024, help="1024: XLM-R large; 768: base")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab-shard", type=int, default=250002, help="V / TP columns of the LM head")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--copy-mib", type=int, default=1024, help="size of the copy that measures the bandwidth")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no measurement after this many seconds (0: no limit); what is left out is "
                    "listed under 'skipped' in the JSON (torch.compile peers come last)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/kernels_<gpu>_<dtype>.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("bench/kernels_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.",
                  file=sys.stderr)
            return 2
        if dispatch.extension() is None:
            print("xlmr_mp._cuda is not built: pip install --no-build-isolation -e . with a CUDA torch and nvcc",
                  file=sys.stderr)
            return 2
        dev, arch = torch.cuda.get_device_name(), dispatch.arch(device)
    else:
        dev, arch = "cpu", "cpu"
    t_start = time.time()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(f"device: {dev} ({arch}), torch {torch.__version__}, dtype {args.dtype}", flush=True)
    copy_bw = copy_bandwidth(args.iters, device, args.copy_mib << 20)
    print(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s (same-device copy_, read + write)", flush=True)
    N, S, H = args.tokens, args.seq, args.hidden
    out = args.out or os.path.join(RESULTS, f"kernels_{arch}_{args.dtype}.json")
    results = Results(out, dict(device=dev, arch=arch, torch=torch.__version__, dtype=args.dtype,
                                shapes=dict(tokens=N, hidden=H, ffn=4 * H, heads=args.heads, seq=S,
                                            masked=max(1, int(0.15 * N)), vocab_shard=args.vocab_shard)), copy_bw)
    results.write()
    cases = build_cases(device, dtype, tokens=N, seq=S, hidden=H, heads=args.heads, vocab_shard=args.vocab_shard,
                        iters=args.iters)

    # fused and eager for every op first, the torch.compile peers (slow to compile) last
    plan = [(c, impl) for impl in ("fused", "eager") for c in cases]
    if not args.no_compile:
        plan += [(c, "compile") for c in cases]
    for c, impl in plan:
        if args.budget_s and time.time() - t_start > args.budget_s:
            print(f"  {c['op']} [{impl}] skipped: --budget-s {args.budget_s:g} spent", flush=True)
            results.skip(f"{c['op']}/{impl}: budget")
            continue
        measure(results, c, impl, args.iters, timer(device))

    results.finish()
    faster = results.faster()
    print(f"ops faster than every torch peer on {arch}: {faster}")
    if device.type == "cuda":
        print("FASTER_ON entries for xlmr_mp/kernels/dispatch.py: "
              + ", ".join(f'"{op}": frozenset({{"{arch}"}})' for op in faster))
    print(f"wrote {out} ({time.time() - t_start:.0f}s)")
    broken = [k for k in results.skipped if not k.endswith(": budget") and "/compile:" not in k]
    if broken:          # a fused op or its reference failed (a torch.compile failure is only reported)
        print(f"failed: {', '.join(broken)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
