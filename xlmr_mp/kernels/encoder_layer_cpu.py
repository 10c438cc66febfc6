"""One post-LN encoder layer as ONE autograd node on a CPU, beside its reference (the module path
of xlmr_mp/model/encoder.py, which is what runs whenever `applies` is False).

    y1  = x + Dropout(attn(x Wqkv^T + bqkv) Wo^T + bo)        h1  = LN1(y1)
    y2  = h1 + Dropout(gelu(h1 W1^T + b1) W2^T + b2)          out = LN2(y2)

At the shapes a scaling study runs on a CPU (hidden 64-256, a few hundred tokens per micro-batch)
a layer's step is a few dozen small kernels, and the autograd graph around them (about 130 nodes,
views and transposes per layer, each with its saved tensors and engine bookkeeping) costs as much
again. Here the forward is 8 kernel calls with autograd off and the backward is written out (13
calls): MKL's GEMMs as in the module path, the AVX2 kernels of xlmr_mp._C for attention
(attention_cpu.cpp), bias + GELU (bias_gelu_cpu.cpp) and each sublayer's bias + dropout + residual
add + LayerNorm in one pass forward and one backward (layernorm_cpu.cpp, which also gives the bias
gradients), and the same Bernoulli draws for the hidden dropout, so outputs and gradients equal the
module path's to rounding (tests/test_encoder_layer_cpu.py) and the dropout masks are the ones the
module path would draw. The QKV bias enters its GEMM (addmm) and each residual gradient is the
input of the GEMM that adds the branch's gradient to it.

It runs (`applies`) for fp32 CPU tensors where the CPU kernels may run (`dispatch.cpu_kernels`:
AVX2/FMA, not under autocast or torch.compile, XLMR_MP_KERNELS not `reference`), at TP = 1 (the
TP-sharded layers call collectives between these ops), without attention dropout in training (the
attention kernel has none), at S <= attention_cpu.MAX_SEQ (`fused` lifts it), and not under
selective recompute (which recomputes the attention core alone). Full recompute wraps this node
like any other; double backward is not supported. Timings: bench/encoder_layer_cpu.py, results
in bench/results/encoder_layer_cpu.txt.
"""
from __future__ import annotations

import math

import torch

from xlmr_mp.kernels import attention_cpu, dispatch


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
    return all(p is not None and p.dtype == torch.float32 and p.is_cpu for p in _params(layer))


def _dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """The mask F.dropout draws on a CPU (aten's _dropout_impl: bernoulli_(1 - p) then / (1 - p)),
    from the same generator in the same order, so the masks equal the module path's."""
    return torch.empty_like(like).bernoulli_(1 - p).div_(1 - p)


def _epilogue(ext, branch, bias, residual, weight, ln_bias, eps, p, threads):
    """(y, LN(y), mean, rstd, dropout mask or None) of y = residual + Dropout(branch + bias), in one
    pass of the bias-dropout-add-LayerNorm kernel (csrc/layernorm_cpu.cpp)."""
    mask = _dropout_mask(branch, p) if p > 0 else None
    y, out = torch.empty_like(branch), torch.empty_like(branch)
    mean, rstd = branch.new_empty(branch.shape[0]), branch.new_empty(branch.shape[0])
    ext.bias_dropout_add_layernorm_forward(_np(branch), _np(bias), _np(residual), None if mask is None else _np(mask),
                                           _np(weight), _np(ln_bias), eps, _np(out), _np(y), _np(mean), _np(rstd),
                                           threads)
    return y, out, mean, rstd, mask


def _epilogue_backward(ext, grad, y, mask, weight, mean, rstd, threads):
    """(d residual, d branch, d weight, d ln_bias, d bias) of `_epilogue`, one kernel pass."""
    dres, dbranch = torch.empty_like(y), torch.empty_like(y)
    dw, dlb, db = torch.empty_like(weight), torch.empty_like(weight), torch.empty_like(weight)
    ext.bias_dropout_add_layernorm_backward(_np(grad), _np(y), None if mask is None else _np(mask), _np(weight),
                                            _np(mean), _np(rstd), _np(dres), _np(dbranch), _np(dw), _np(dlb),
                                            _np(db), threads)
    return dres, dbranch, dw, dlb, db


def _np(t: torch.Tensor):
    """The kernel's view of t (no copy); t must not require grad: the forward detaches the
    parameters once, everything else is made with autograd off."""
    return t.numpy()


class _EncoderLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, key_bias, w_qkv, b_qkv, w_o, b_o, g1, beta1, w_1, b_1, w_2, b_2, g2, beta2,
                heads, eps, p):
        ext = dispatch._cpu_extension()
        threads = torch.get_num_threads()
        w_qkv, b_qkv, w_o, b_o, g1, beta1, w_1, b_1, w_2, b_2, g2, beta2 = (
            t.detach() for t in (w_qkv, b_qkv, w_o, b_o, g1, beta1, w_1, b_1, w_2, b_2, g2, beta2))
        B, S, H = x.shape
        T, D = B * S, H // heads
        scale = 1.0 / math.sqrt(D)
        x2 = x.detach().reshape(T, H)
        qkv = torch.addmm(b_qkv, x2, w_qkv.t())                                  # [T, 3H]
        ctx_ = x2.new_empty(T, H)
        probs = x2.new_empty(B, heads, S, S)
        ext.attention_forward(_np(qkv).reshape(B, S, heads, 3, D), None if key_bias is None else _np(key_bias.detach()),
                              scale, _np(ctx_), _np(probs), threads)
        y1, h1, mean1, rstd1, m_a = _epilogue(ext, torch.mm(ctx_, w_o.t()), b_o, x2, g1, beta1, eps, p, threads)
        f1 = torch.mm(h1, w_1.t())                                               # [T, F], before b_1
        act = torch.empty_like(f1)
        ext.bias_gelu_forward(_np(f1), _np(b_1), _np(act), threads)
        y2, out, mean2, rstd2, m_f = _epilogue(ext, torch.mm(act, w_2.t()), b_2, h1, g2, beta2, eps, p, threads)
        ctx.save_for_backward(x2, qkv, probs, ctx_, y1, mean1, rstd1, h1, f1, act, y2, mean2, rstd2,
                              m_a, m_f, w_qkv, w_o, g1, beta1, w_1, b_1, w_2, g2, beta2)
        ctx.meta = (B, S, H, heads, scale)
        return out.view(B, S, H)

    @staticmethod
    def backward(ctx, grad_out):
        (x2, qkv, probs, ctx_, y1, mean1, rstd1, h1, f1, act, y2, mean2, rstd2, m_a, m_f,
         w_qkv, w_o, g1, beta1, w_1, b_1, w_2, g2, beta2) = ctx.saved_tensors
        B, S, H, heads, scale = ctx.meta
        T, D = B * S, H // heads
        ext = dispatch._cpu_extension()
        threads = torch.get_num_threads()
        # FFN sublayer: out = LN2(h1 + m_f * (act W2^T + b2))
        dh1_res, df, dg2, dbeta2, db_2 = _epilogue_backward(ext, grad_out.detach().reshape(T, H).contiguous(), y2, m_f, g2,
                                                            mean2, rstd2, threads)
        dw_2 = df.t().mm(act)
        dact = df.mm(w_2)
        df1 = torch.empty_like(f1)
        db_1 = torch.empty_like(b_1)
        ext.bias_gelu_backward(_np(dact), _np(f1), _np(b_1), _np(df1), _np(db_1), threads)
        dw_1 = df1.t().mm(h1)
        dh1 = torch.addmm(dh1_res, df1, w_1)                                     # residual + branch
        # attention sublayer: h1 = LN1(x + m_a * (attn(qkv) Wo^T + bo))
        dx_res, da, dg1, dbeta1, db_o = _epilogue_backward(ext, dh1, y1, m_a, g1, mean1, rstd1, threads)
        dw_o = da.t().mm(ctx_)
        dctx = da.mm(w_o)
        dqkv = torch.empty_like(qkv)
        ext.attention_backward(_np(qkv).reshape(B, S, heads, 3, D), _np(probs), _np(ctx_), _np(dctx), scale,
                               _np(dqkv), threads)
        db_qkv = dqkv.sum(0)
        dw_qkv = dqkv.t().mm(x2)
        dx = torch.addmm(dx_res, dqkv, w_qkv)
        return (dx.view(B, S, H), None, dw_qkv, db_qkv, dw_o, db_o, dg1, dbeta1, dw_1, db_1, dw_2, db_2,
                dg2, dbeta2, None, None, None)


def layer_forward(layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """EncoderLayer `layer` applied to x [B, S, H] as one autograd node (check `applies` first: it
    is False while torch.compile traces, so this opaque call is never traced)."""
    key_bias = None if bias is None else bias.reshape(bias.shape[0], bias.shape[-1]).contiguous()
    p = layer.dropout if layer.training else 0.0
    return _EncoderLayer.apply(x.contiguous(), key_bias, *_params(layer), layer._modules["attention"].local_heads,
                               layer.eps, p)
