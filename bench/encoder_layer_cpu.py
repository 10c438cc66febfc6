#!/usr/bin/env python
"""One post-LN encoder layer, forward + backward, fp32 on a CPU: the layer as one autograd node
(xlmr_mp/kernels/encoder_layer_cpu.py) against the module path it replaces (the same kernels
through ~130 autograd nodes), the torch reference (XLMR_MP_KERNELS=reference: SDPA, F.gelu) and
the peer, Hugging Face's XLMRobertaLayer with the same weights, in alternating rounds of the same
run, and beside them the layer's 12 GEMMs alone at its shapes (the floor any implementation sits
on). Prints medians, the ratios to the one-node layer and the largest difference of the output
and of the input gradient against the module path and against HF.

    python bench/encoder_layer_cpu.py
    OMP_NUM_THREADS=1 python bench/encoder_layer_cpu.py --out bench/results/encoder_layer_cpu.txt

Default shapes (B x S x hidden x heads x ffn): the tiny preset at micro-batch 8, and the scaling
studies' widths 128 and 256 at S=128.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time


import torch  # noqa: E402
import bench_log  # noqa: E402  (bench/, beside this script)

from xlmr_mp import kernels  # noqa: E402
from xlmr_mp.kernels import encoder_layer_cpu  # noqa: E402
from xlmr_mp.model.config import ModelConfig  # noqa: E402
from xlmr_mp.model.encoder import EncoderLayer  # noqa: E402

SHAPES = [(8, 64, 64, 4, 128), (8, 128, 128, 4, 512), (8, 128, 256, 4, 1024)]


def _parse_shape(text: str):
    try:
        b, s, h, n, f = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: give BxSxHIDDENxHEADSxFFN, e.g. 8x64x64x4x128") from None
    return b, s, h, n, f


@contextlib.contextmanager
def _path(name: str):
    """Run the layer as `one-node`, `module` (same kernels, ~130 nodes) or `reference` (torch ops)."""
    env, applies = os.environ.get("XLMR_MP_KERNELS"), encoder_layer_cpu.applies
    if name == "module":
        encoder_layer_cpu.applies = lambda *a: False
    if name == "reference":
        os.environ["XLMR_MP_KERNELS"] = "reference"
    try:
        yield
    finally:
        encoder_layer_cpu.applies = applies
        if env is None:
            os.environ.pop("XLMR_MP_KERNELS", None)
        else:
            os.environ["XLMR_MP_KERNELS"] = env


def hf_layer(ours: EncoderLayer, H: int, heads: int, F: int):
    """transformers' XLMRobertaLayer with `ours`' weights (QKV split from Megatron's per-head
    interleave), or None without transformers."""
    try:
        from transformers import XLMRobertaConfig
        from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaLayer
    except ImportError:
        return None
    cfg = XLMRobertaConfig(hidden_size=H, num_attention_heads=heads, intermediate_size=F, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, layer_norm_eps=ours.eps)
    cfg._attn_implementation = "sdpa"
    hf = XLMRobertaLayer(cfg).train()
    D = H // heads
    w = ours.attention.qkv.weight.detach().view(heads, 3, D, H)
    b = ours.attention.qkv.bias.detach().view(heads, 3, D)
    a = hf.attention
    with torch.no_grad():
        for j, lin in enumerate((a.self.query, a.self.key, a.self.value)):
            lin.weight.copy_(w[:, j].reshape(H, H))
            lin.bias.copy_(b[:, j].reshape(H))
        pairs = [(a.output.dense, ours.attention.out), (hf.intermediate.dense, ours.ffn.fc1), (hf.output.dense, ours.ffn.fc2)]
        for dst, src in pairs:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        for dst, src in ((a.output.LayerNorm, ours.attention_layernorm), (hf.output.LayerNorm, ours.ffn_layernorm)):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    return hf


def _fwd_bwd(fn, x, grad):
    xi = x.detach().requires_grad_(True)
    out = fn(xi)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad)
    return out.detach(), xi.grad


def bench_shape(B, S, H, heads, F, rounds):
    cfg = ModelConfig(vocab_size=64, hidden_size=H, num_layers=1, num_heads=heads, ffn_size=F, max_positions=S + 2,
                      dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    layer = EncoderLayer(cfg).train()
    kernels.apply(layer, "cpu")
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.05) if p.dim() > 1 else p.uniform_(-0.1, 0.1)
        for ln in (layer.attention_layernorm, layer.ffn_layernorm):
            ln.weight.uniform_(0.9, 1.1)
    g = torch.Generator().manual_seed(1)
    x, grad = torch.randn(B, S, H, generator=g), torch.randn(B, S, H, generator=g)
    hf = hf_layer(layer, H, heads, F)
    if not encoder_layer_cpu.applies(layer, x, None):
        return f"B={B} S={S} H={H} heads={heads} ffn={F}: the one-node layer does not apply here (see applies())"
    fns = {k: (lambda xi, k=k: _run_path(layer, k, xi)) for k in ("one-node", "module", "reference")}
    if hf is not None:
        fns["HF"] = lambda xi: hf(xi)
    results = {k: _fwd_bwd(f, x, grad) for k, f in fns.items()}
    gemms = _gemms_only(B * S, H, F)
    flops = 3 * 2 * B * S * (4 * H * H + 2 * H * F) + 3 * 4 * B * S * S * H   # GEMMs fwd + 2x bwd
    n = max(3, int(2e8 / flops))                                                # ~20-60 ms a round
    runs = {k: (lambda f=f: _fwd_bwd(f, x, grad)) for k, f in fns.items()}
    runs["GEMMs only"] = gemms
    times = {k: [] for k in runs}
    for run in runs.values():
        run()
    for _ in range(rounds):
        for k, run in runs.items():
            t0 = time.perf_counter()
            for _ in range(n):
                run()
            times[k].append((time.perf_counter() - t0) / n)
    med = {k: statistics.median(v) for k, v in times.items()}
    one = med["one-node"]
    parts = [f"one-node {one * 1e3:.3f} ms ({flops / one / 1e9:.1f} GFLOP/s)"]
    for k in runs:
        if k != "one-node":
            ratios = [t / o for t, o in zip(times[k], times["one-node"])]
            parts.append(f"{k} {med[k] * 1e3:.3f} ms (x{statistics.median(ratios):.2f} paired, "
                         f"{min(ratios):.2f}-{max(ratios):.2f})")
    o, dx = results["one-node"]
    diffs = [f"vs {k}: out {(o - results[k][0]).abs().max().item():.1e} dx {(dx - results[k][1]).abs().max().item():.1e}"
             for k in ("module", "HF") if k in results]
    return f"B={B} S={S} H={H} heads={heads} ffn={F}: " + ", ".join(parts) + "; max |diff| " + ", ".join(diffs)


def _gemms_only(T, H, F):
    """The layer's 12 matrix products at its shapes with nothing around them (forward: QKV, output,
    fc1, fc2; backward: the input and weight gradient of each): the floor MKL puts under any
    implementation of the layer, HF's included."""
    g = torch.Generator().manual_seed(2)
    x, h, f, q = (torch.randn(T, n, generator=g) for n in (H, H, F, 3 * H))
    w_qkv, w_o, w_1, w_2 = (torch.randn(*s, generator=g) for s in ((3 * H, H), (H, H), (F, H), (H, F)))

    def run():
        torch.mm(x, w_qkv.t()), torch.mm(x, w_o.t()), torch.mm(h, w_1.t()), torch.mm(f, w_2.t())
        torch.mm(q, w_qkv), torch.mm(h, w_o), torch.mm(f, w_1), torch.mm(h, w_2)
        q.t().mm(x), h.t().mm(x), f.t().mm(h), h.t().mm(f)
    return run


def _run_path(layer, name, xi):
    with _path(name):
        return layer(xi, None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=_parse_shape, action="append", help="BxSxHIDDENxHEADSxFFN (repeatable; default: "
                    + ", ".join("x".join(map(str, s)) for s in SHAPES) + ")")
    ap.add_argument("--rounds", type=int, default=7, help="alternating timing rounds per shape (median)")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default="", help="append the result to this file")
    a = ap.parse_args(argv)
    from xlmr_mp.kernels import attention_cpu
    if attention_cpu._ext() is None:
        print("encoder_layer_cpu: the CPU kernels are unavailable here (xlmr_mp._C without them, or no AVX2/FMA)",
              file=sys.stderr)
        return 2
    rows = (bench_shape(*shape, a.rounds) for shape in a.shape or SHAPES)
    bench_log.cpu_kernel_run("encoder_layer_cpu.py", argv, f"fp32 forward + backward of one layer, median of "
                             f"{a.rounds} alternating rounds; xN = that path's time / the one-node layer's, paired "
                             "by round", rows, a.note, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
