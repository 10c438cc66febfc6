"""One post-LN encoder layer as ONE autograd node on a CPU, beside its reference (the module path
of xlmr_mp/model/encoder.py, which is what runs whenever `applies` is False).

    y1  = x + Dropout(attn(x Wqkv^T + bqkv) Wo^T + bo)        h1  = LN1(y1)
    y2  = h1 + Dropout(gelu(h1 W1^T + b1) W2^T + b2)          out = LN2(y2)

At the shapes a scaling study runs on a CPU (hidden 64-256, a few hundred tokens per micro-batch)
a layer's step is a few dozen small kernels, and the autograd graph around them (about 130 nodes,
views and transposes per layer, each with its saved tensors and engine bookkeeping) costs as much
again. Here the forward is ONE C++ call and the backward another (csrc/encoder_layer_cpu.cpp):
the layer's 12 GEMMs through the BLAS sgemm torch itself calls (MKL's `sgemm_` in libtorch_cpu,
kernels/cpu_fast_path.py), so each product has torch.mm's bits, between the AVX2 kernels of xlmr_mp._C for attention (attention_cpu.cpp), bias +
GELU (bias_gelu_cpu.cpp) and each sublayer's bias + dropout + residual add + LayerNorm in one pass
(layernorm_cpu.cpp, which also gives the bias gradients). Between the kernels there is no Python,
no tensor allocation (the activations the backward needs live in one workspace tensor, taken
from cpu_fast_path.WORKSPACES and given back when the backward lets it go, so its pages stay
mapped between steps) and no autograd bookkeeping. With several threads the batch rows are cut
into one part a thread, each running the whole layer single-threaded (one fork per call, not one
per kernel and GEMM; `_C.encoder_layer_parts` says how many). The hidden-dropout masks are the Bernoulli draws the module path makes, in
its order, so outputs and gradients equal the module path's to rounding
(tests/test_encoder_layer_cpu.py).

It runs (`applies`) for fp32 CPU tensors where the CPU kernels may run (`dispatch.cpu_kernels`:
AVX2/FMA, not under autocast or torch.compile, XLMR_MP_KERNELS not `reference`) and torch's sgemm
was found, at TP = 1 (the TP-sharded layers call collectives between these ops), without
attention dropout in training (the attention kernel has none), at S <= attention_cpu.MAX_SEQ
(`fused` lifts it), with contiguous parameters, and not under selective recompute (which
recomputes the attention core alone). Full recompute wraps this node like any other; double
backward is not supported. Timings: bench/encoder_layer_cpu.py, results in
bench/results/encoder_layer_cpu.txt.
"""
from __future__ import annotations

import torch

from xlmr_mp.kernels import attention_cpu, dispatch
from xlmr_mp.kernels.cpu_fast_path import WORKSPACES, addr as _addr, blas_sgemm, dropout_mask, fp32_cpu_contiguous


def _params(layer) -> tuple:
    """The layer's 12 parameters in _EncoderLayer's argument order (biases may be None); read from
    the modules' dicts, as nn.Module.__getattr__ costs 1-2 us an attribute (a call reads 16)."""
    m = layer._modules
    attn, ffn = m["attention"]._modules, m["ffn"]._modules
    qkv, out, fc1, fc2 = (attn["qkv"]._parameters, attn["out"]._parameters, ffn["fc1"]._parameters,
                          ffn["fc2"]._parameters)
    ln1, ln2 = m["attention_layernorm"]._parameters, m["ffn_layernorm"]._parameters
    return (qkv["weight"], qkv["bias"], out["weight"], out["bias"], ln1["weight"], ln1["bias"],
            fc1["weight"], fc1["bias"], fc2["weight"], fc2["bias"], ln2["weight"], ln2["bias"])


def applies(layer, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `layer_forward` should run the EncoderLayer `layer` on x [B, S, H] (key-padding bias
    [B, 1, 1, S] | None)."""
    attn = layer._modules["attention"]
    if layer.tp_size != 1 or attn.selective_recompute or x.dim() != 3:
        return False
    if layer.training and attn.attention_dropout > 0:
        return False
    # the attention kernel's own conditions (fp32 CPU, the switch, key-bias layout, MAX_SEQ), which
    # read dtype, device, batch and sequence length: x has the same as the layer's qkv
    if not attention_cpu.applies(x, bias, 0.0):
        return False
    return blas_sgemm() and fp32_cpu_contiguous(_params(layer))


class _EncoderLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, key_bias, w_qkv, b_qkv, w_o, b_o, g1, beta1, w_1, b_1, w_2, b_2, g2, beta2,
                heads, eps, p):
        ext = dispatch._cpu_extension()
        params = tuple(t.detach() for t in (w_qkv, b_qkv, w_o, b_o, g1, beta1, w_1, b_1, w_2, b_2, g2, beta2))
        B, S, H = x.shape
        shape = (B, S, H, heads, w_1.shape[0])
        x = x.detach()
        # the module path's draws, in its order: attention sublayer's mask, then the FFN's
        m_a = dropout_mask(x, p) if p > 0 else None
        m_f = dropout_mask(x, p) if p > 0 else None
        ws = WORKSPACES.take(ext.layer_workspace_floats(shape))
        out = x.new_empty(B, S, H)
        addrs = tuple(t.data_ptr() for t in params)
        ext.encoder_layer_forward(shape, x.data_ptr(), _addr(key_bias), addrs, _addr(m_a), _addr(m_f), eps,
                                  ws.data_ptr(), out.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(x, ws, m_a, m_f, *params)
        ctx.shape = shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, ws, m_a, m_f, *params = ctx.saved_tensors
        ext = dispatch._cpu_extension()
        grad = grad_out.detach().contiguous()
        dx = torch.empty_like(x)
        grads = [torch.empty_like(t) for t in params]
        ext.encoder_layer_backward(ctx.shape, grad.data_ptr(), x.data_ptr(), tuple(t.data_ptr() for t in params),
                                   _addr(m_a), _addr(m_f), ws.data_ptr(), dx.data_ptr(),
                                   tuple(g.data_ptr() for g in grads), torch.get_num_threads())
        return (dx, None, *grads, None, None, None)


def layer_forward(layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """EncoderLayer `layer` applied to x [B, S, H] as one autograd node (check `applies` first: it
    is False while torch.compile traces, so this opaque call is never traced)."""
    key_bias = None if bias is None else bias.reshape(bias.shape[0], bias.shape[-1]).contiguous()
    p = layer.dropout if layer.training else 0.0
    return _EncoderLayer.apply(x.contiguous(), key_bias, *_params(layer), layer._modules["attention"].local_heads,
                               layer.eps, p)
