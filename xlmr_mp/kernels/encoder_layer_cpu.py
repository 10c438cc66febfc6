"""Post-LN encoder layers as ONE autograd node on a CPU, beside their reference (the module path
of xlmr_mp/model/encoder.py, which is what runs whenever `applies` is False).

    y1  = x + Dropout(attn(x Wqkv^T + bqkv) Wo^T + bo)        h1  = LN1(y1)
    y2  = h1 + Dropout(gelu(h1 W1^T + b1) W2^T + b2)          out = LN2(y2)

At the shapes a scaling study runs on a CPU (hidden 64-256, a few hundred tokens per micro-batch)
a layer's step is a few dozen small kernels, and the autograd graph around them (about 130 nodes,
views and transposes per layer, each with its saved tensors and engine bookkeeping) costs as much
again. Here the forward of a model's (or a pipeline stage's) layers is ONE C++ call and the
backward another (csrc/encoder_layer_cpu.cpp; `stack_forward`, which kernels.apply installs as
XLMRModel.encode_layers; one layer alone, `layer_forward`, installed as EncoderLayer.forward, what
full recompute runs): each layer's
12 GEMMs through the BLAS sgemm torch itself calls (MKL's `sgemm_` in libtorch_cpu,
kernels/cpu_fast_path.py; each product torch.mm's bits) or, for small layers cut into single-threaded
parts (hidden <= 64, FFN <= 256: `_C.encoder_small_products`), through csrc/small_gemm_avx2.h's
register tiles (no packing, the QKV bias in the tile's epilogue; tests/test_small_gemm_cpu.py
against torch.mm), between the AVX2 kernels of
xlmr_mp._C for attention (attention_cpu.cpp), bias + GELU (bias_gelu_cpu.cpp) and each sublayer's
bias + dropout + residual add + LayerNorm in one pass (layernorm_cpu.cpp, which also gives the
bias gradients). Between the kernels and the layers there is no Python, no tensor allocation (the
activations the backward needs live in one workspace tensor, taken from cpu_fast_path.WORKSPACES
and given back when the backward lets it go, so its pages stay mapped between steps) and no
autograd bookkeeping: per micro-batch the Python, module and engine work of one node instead of
one per layer. With several threads the
batch rows are cut into one part a thread, each running every layer single-threaded (one fork per
call, not one per kernel and GEMM; `_C.encoder_parts` says how many). The hidden-dropout masks are
the Bernoulli draws the module path makes, in its order, so outputs and gradients equal the
module path's to rounding (tests/test_encoder_layer_cpu.py).

It runs (`applies`) for fp32 CPU tensors where the CPU kernels may run (`dispatch.cpu_kernels`:
AVX2/FMA, not under autocast or torch.compile, XLMR_MP_KERNELS not `reference`) and torch's sgemm
was found, at TP = 1 (the TP-sharded layers call collectives between these ops), without
attention dropout in training (the attention kernel has none), at S <= attention_cpu.MAX_SEQ
(`fused` lifts it), with contiguous parameters, and not under selective recompute (which
recomputes the attention core alone); several layers as one node (`stack_applies`) also need
no module hooks on a layer and one config. Full recompute wraps each one-layer node like any
other; double backward is not supported. Timings: bench/encoder_layer_cpu.py (results in
bench/results/).
"""
from __future__ import annotations

import torch

from xlmr_mp.kernels import attention_cpu, dispatch
from xlmr_mp.kernels.cpu_fast_path import (WORKSPACES, accumulation_targets, addr as _addr, blas_sgemm,
                                          check_targets, dropout_mask, edge_free_targets, fp32_cpu_contiguous)


def _params(layer) -> tuple:
    """The layer's 12 parameters in _Encoder's argument order (biases may be None); read from
    the modules' dicts, as nn.Module.__getattr__ costs 1-2 us an attribute (a call reads 16)."""
    m = layer._modules
    attn, ffn = m["attention"]._modules, m["ffn"]._modules
    qkv, out, fc1, fc2 = (attn["qkv"]._parameters, attn["out"]._parameters, ffn["fc1"]._parameters,
                          ffn["fc2"]._parameters)
    ln1, ln2 = m["attention_layernorm"]._parameters, m["ffn_layernorm"]._parameters
    return (qkv["weight"], qkv["bias"], out["weight"], out["bias"], ln1["weight"], ln1["bias"],
            fc1["weight"], fc1["bias"], fc2["weight"], fc2["bias"], ln2["weight"], ln2["bias"])


def _layer_applies(layer, params) -> bool:
    """The layer's own conditions (its parameters `params`, in _params order)."""
    attn = layer._modules["attention"]
    if layer.tp_size != 1 or attn.selective_recompute:
        return False
    if layer.training and attn.attention_dropout > 0:
        return False
    return fp32_cpu_contiguous(params)


def _input_applies(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The call's conditions on its input: [B, S, H], the attention kernel's own (fp32 CPU, the
    switch, key-bias layout, MAX_SEQ: it reads dtype, device, batch and sequence length, which x
    shares with the layer's qkv), and torch's sgemm found."""
    return x.dim() == 3 and attention_cpu.applies(x, bias, 0.0) and blas_sgemm()


def applies(layer, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `layer_forward` should run the EncoderLayer `layer` on x [B, S, H] (key-padding bias
    [B, 1, 1, S] | None)."""
    return _input_applies(x, bias) and _layer_applies(layer, _params(layer))


def _has_hooks(layer) -> bool:
    """Module hooks on the layer itself: `layer(x, bias)` runs them, one call for several layers would not."""
    return bool(layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
                or layer._backward_pre_hooks)


def _call_config(layer, params) -> tuple:
    """What one encoder call takes for all its layers: heads, FFN size, LayerNorm eps, dropout."""
    return (layer._modules["attention"].local_heads, params[6].shape[0], layer.eps, layer.dropout)


def stack_applies(layers, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `stack_forward` should run the EncoderLayers `layers` (consecutive, the same shape)
    on x as ONE node: each layer `applies`, none has module hooks, and they share heads, FFN size,
    LayerNorm eps and dropout (one config)."""
    if not layers or not _input_applies(x, bias):
        return False
    key = None
    for layer in layers:
        params = _params(layer)
        config = _call_config(layer, params)
        key = config if key is None else key
        if _has_hooks(layer) or config != key or not _layer_applies(layer, params):
            return False
    return True


class _Encoder(torch.autograd.Function):
    """`layers` consecutive layers (params: 12 a layer, in _params order) as one node. `into`: None,
    or (the Parameters, their .grad) when the params are passed detached (no edges) and the
    backward adds their gradients to those .grad itself (cpu_fast_path.gradients_into_grad)."""

    @staticmethod
    def forward(ctx, x, key_bias, heads, eps, p, into, *params):
        ext = dispatch._cpu_extension()
        layers = len(params) // 12
        B, S, H = x.shape
        shape = (B, S, H, heads, params[6].shape[0])
        x = x.detach()
        # the module path's draws, in its order: per layer the attention sublayer's mask, then the FFN's
        masks = [dropout_mask(x, p) for _ in range(2 * layers)] if p > 0 else []
        ws = WORKSPACES.take(ext.encoder_workspace_floats(shape, layers))
        out = x.new_empty(B, S, H)
        keep_a, keep_f = tuple(m.data_ptr() for m in masks[0::2]), tuple(m.data_ptr() for m in masks[1::2])
        ext.encoder_forward(shape, layers, x.data_ptr(), _addr(key_bias), tuple(t.data_ptr() for t in params),
                            keep_a, keep_f, eps, ws.data_ptr(), out.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(x, ws, *masks, *params)
        ctx.shape, ctx.layers, ctx.into = shape, layers, into
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors    # (under full recompute: the recomputed ones, at new addresses)
        first_param = len(saved) - 12 * ctx.layers
        x, ws, masks, params = saved[0], saved[1], saved[2:first_param], saved[first_param:]
        ext = dispatch._cpu_extension()
        grad = grad_out.detach().contiguous()
        dx = torch.empty_like(x)
        # gradient-accumulation fusion: added straight to the parameters' .grad where that is exactly
        # what AccumulateGrad would do (cpu_fast_path.accumulation_targets)
        if ctx.into is not None:             # no edges to the parameters: add to their .grad here
            check_targets(*ctx.into, "the encoder's node")
            fused = ctx.into[1]
        else:
            edges = len(ctx.next_functions)  # one a tensor input (key_bias None has none): params last
            fused = accumulation_targets(ctx, params, range(edges - len(params), edges))
        grads = fused if fused else [torch.empty_like(t) for t in params]
        ext.encoder_backward(ctx.shape, ctx.layers, grad.data_ptr(), x.data_ptr(), tuple(t.data_ptr() for t in params),
                             tuple(m.data_ptr() for m in masks[0::2]), tuple(m.data_ptr() for m in masks[1::2]),
                             ws.data_ptr(), dx.data_ptr(), tuple(g.data_ptr() for g in grads),
                             torch.get_num_threads(), bool(fused))
        return (dx, None, None, None, None, None) + ((None,) * len(params) if fused else tuple(grads))


def stack_forward(layers, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The EncoderLayers `layers` applied in turn to x [B, S, H] as one autograd node (check
    `stack_applies` first: it is False while torch.compile traces, so this opaque call is never
    traced)."""
    key_bias = None if bias is None else bias.reshape(bias.shape[0], bias.shape[-1]).contiguous()
    first = layers[0]
    p = first.dropout if first.training else 0.0
    params = [t for layer in layers for t in _params(layer)]
    heads = first._modules["attention"].local_heads
    targets = edge_free_targets(params)
    if targets is not None:     # inside gradients_into_grad: the parameters detached, their .grad added to
        return _Encoder.apply(x.contiguous(), key_bias, heads, first.eps, p, (params, targets),
                              *(t.detach() for t in params))
    return _Encoder.apply(x.contiguous(), key_bias, heads, first.eps, p, None, *params)


def layer_forward(layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """EncoderLayer `layer` applied to x [B, S, H] as one autograd node (check `applies` first)."""
    return stack_forward([layer], x, bias)
