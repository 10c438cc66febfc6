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
register tiles (no packing, the QKV bias in the tile's epilogue; tests/kernels/test_small_gemm_cpu.py
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
module path's to rounding (tests/kernels/test_encoder_layer_cpu.py).

The node is a registered op, torch.ops.xlmr_mp.encoder_layers (and its backward,
xlmr_mp::encoder_layers_backward_): CPU-only (a CPU key and a fake kernel for FakeTensor, the meta
device and torch.compile's tracing; no CUDA key), its autograd an Autograd kernel
(cpu_fast_path.set_autograd); the raw addresses the C++ takes are passed inside the op's kernels.
`stack_forward` gathers the layers' parameters and calls it. Inside
cpu_fast_path.gradients_into_grad the parameters go in detached with their .grad as `grad_into`:
no autograd edge, and the backward adds their gradients to .grad itself (the engine runs no
AccumulateGrad for them; returning them instead gives the same bits and was measured slower,
bench/results/cpu_node_ops.txt). Tests of the op: tests/kernels/test_cpu_node_ops.py.

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

from xlmr_mp.kernels import attention_cpu
from xlmr_mp.kernels.cpu_fast_path import (WORKSPACES, accumulation_targets, addr as _addr, blas_sgemm,
                                          check_targets, define_cpu_op, dropout_mask, edge_free_targets, extension,
                                          fp32_cpu_contiguous, set_autograd)


def _params(layer) -> tuple:
    """The layer's 12 parameters in the op's order (biases may be None: then no node); read from
    the modules' dicts, which skips nn.Module.__getattr__'s Python-level lookup (a call reads 16)."""
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


def workspace_floats(shape, layers: int):
    """Floats of the workspace `encoder_layers` returns for `layers` layers of shape (B, S, H, heads, F):
    csrc/encoder_layer_cpu.cpp's encoder_workspace_floats, in Python so the fake kernel can give it
    for symbolic sizes too (tests/kernels/test_cpu_node_ops.py holds them equal)."""
    B, S, H, heads, F = shape
    T = B * S
    return layers * (T * 3 * H + B * heads * S * S + 4 * T * H + 2 * T * F + 4 * T) + (layers - 1) * T * H


def _call_shape(x, params, heads) -> tuple:
    B, S, H = x.shape
    return B, S, H, heads, params[6].shape[0]


def _check(x, key_bias, params, masks) -> int:
    """The number of layers of an encoder_layers call; ValueError where its tensors do not fit
    (the C++ reads them through raw addresses)."""
    layers = len(params) // 12
    if x.dim() != 3 or layers < 1 or len(params) != 12 * layers or len(masks) not in (0, 2 * layers):
        raise ValueError(f"encoder_layers: x must be [B, S, H] with 12 parameters a layer and 0 or 2 masks a layer; "
                         f"got x {tuple(x.shape)}, {len(params)} parameters, {len(masks)} masks")
    B, S, H = x.shape
    F = params[6].shape[0]
    sizes = (3 * H * H, 3 * H, H * H, H, H, H, F * H, F, H * F, H, H, H) * layers
    if (any(t.numel() != n for t, n in zip(params, sizes)) or any(m.numel() != B * S * H for m in masks)
            or (key_bias is not None and key_bias.numel() != B * S)):
        raise ValueError(f"encoder_layers: for x {tuple(x.shape)} and FFN size {F} a parameter, mask or key_bias "
                         f"has the wrong size")
    if not fp32_cpu_contiguous([x, *params, *masks] + ([] if key_bias is None else [key_bias])):
        raise TypeError("encoder_layers: the CPU kernels take float32 contiguous CPU tensors")
    return layers


def _encoder_layers(x, key_bias, params, masks, heads, eps, grad_into):
    layers = _check(x, key_bias, params, masks)
    ext = extension("encoder_layer")
    shape = _call_shape(x, params, heads)
    x = x.detach()
    ws = WORKSPACES.take(ext.encoder_workspace_floats(shape, layers))
    out = x.new_empty(x.shape)
    keep_a, keep_f = tuple(m.data_ptr() for m in masks[0::2]), tuple(m.data_ptr() for m in masks[1::2])
    ext.encoder_forward(shape, layers, x.data_ptr(), _addr(key_bias), tuple(t.data_ptr() for t in params),
                        keep_a, keep_f, eps, ws.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out, ws


def _encoder_layers_fake(x, key_bias, params, masks, heads, eps, grad_into):
    return x.new_empty(x.shape), x.new_empty(workspace_floats(_call_shape(x, params, heads), len(params) // 12))


_FORWARD = define_cpu_op("encoder_layers(Tensor x, Tensor? key_bias, Tensor[] params, Tensor[] masks, int heads, "
                         "float eps, Tensor[] grad_into) -> (Tensor, Tensor)", _encoder_layers, _encoder_layers_fake)
"""torch.ops.xlmr_mp.encoder_layers(x, key_bias, params, masks, heads, eps, grad_into) -> (out, workspace):
the post-LN encoder layers whose parameters are `params` (12 a layer, in _params order) applied in
turn to x [B, S, H] (fp32 contiguous), key_bias [B, S] or None, `heads` heads, LayerNorm eps;
masks: per layer the attention sublayer's dropout mask, then the FFN's ([B, S, H], already
scaled), or none at all. out [B, S, H]; the workspace (the activations the backward reads,
workspace_floats(...) floats) comes from cpu_fast_path.WORKSPACES. grad_into: empty, or each
parameter's .grad when `params` are passed detached (no autograd edge): the backward then adds
the parameters' gradients to those itself and returns none for them (an eager training feature,
cpu_fast_path.gradients_into_grad; a traced graph passes it empty)."""


def _encoder_layers_backward(grad, x, workspace, params, masks, heads, grads, accumulate):
    layers = _check(x, None, params, masks)
    grad = grad.contiguous()
    if (len(grads) != len(params) or any(g.numel() != t.numel() for g, t in zip(grads, params))
            or not fp32_cpu_contiguous([grad, workspace, *grads]) or grad.numel() != x.numel()
            or workspace.numel() < workspace_floats(_call_shape(x, params, heads), layers)):
        raise ValueError("encoder_layers_backward_: grad must be x's size, the workspace encoder_layers', and grads "
                         "one float32 contiguous tensor a parameter, of its size")
    ext = extension("encoder_layer")
    dx = torch.empty(x.shape, dtype=x.dtype)
    ext.encoder_backward(_call_shape(x, params, heads), layers, grad.data_ptr(), x.data_ptr(),
                         tuple(t.data_ptr() for t in params), tuple(m.data_ptr() for m in masks[0::2]),
                         tuple(m.data_ptr() for m in masks[1::2]), workspace.data_ptr(), dx.data_ptr(),
                         tuple(g.data_ptr() for g in grads), torch.get_num_threads(), accumulate)
    return dx


_BACKWARD = define_cpu_op("encoder_layers_backward_(Tensor grad, Tensor x, Tensor workspace, Tensor[] params, "
                          "Tensor[] masks, int heads, Tensor(a!)[] grads, bool accumulate) -> Tensor",
                          _encoder_layers_backward, lambda grad, x, *_: x.new_empty(x.shape))
"""torch.ops.xlmr_mp.encoder_layers_backward_(grad, x, workspace, params, masks, heads, grads, accumulate) -> dx:
the backward of encoder_layers for the output gradient grad [B, S, H] from its forward's x,
params, masks and workspace; each parameter's gradient written into grads (fp32 contiguous, the
parameters' shapes), or added to them with accumulate."""


class _Encoder(torch.autograd.Function):
    """xlmr_mp::encoder_layers's autograd (its Autograd kernel, cpu_fast_path.set_autograd):
    apply(x, key_bias, (masks, grad_into, heads, eps), *params), the parameters as arguments (autograd
    gives an edge to a tensor argument only), the masks and grad_into (no gradient) in the tuple."""

    @staticmethod
    def forward(ctx, x, key_bias, rest, *params):
        masks, into, heads, eps = rest
        with torch._C._AutoDispatchBelowAutograd():      # the op's kernel below autograd (CPU, fake)
            out, ws = torch.ops.xlmr_mp.encoder_layers.default(x, key_bias, params, masks, heads, eps, into)
        ctx.mark_non_differentiable(ws)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, ws, *masks, *params)
        ctx.layers, ctx.heads, ctx.into = len(params) // 12, heads, into
        return out, ws

    @staticmethod
    def backward(ctx, grad_out, _grad_ws):
        saved = ctx.saved_tensors    # (under full recompute: the recomputed ones, at new addresses)
        first_param = len(saved) - 12 * ctx.layers
        x, ws, masks, params = saved[0], saved[1], saved[2:first_param], saved[first_param:]
        if grad_out is None:
            return (None,) * (3 + len(params))
        # gradient-accumulation fusion: added straight to the parameters' .grad where that is exactly
        # what AccumulateGrad would do (cpu_fast_path.accumulation_targets)
        if ctx.into:                         # no edges to the parameters: add to their .grad here
            fused = ctx.into
        else:
            edges = len(ctx.next_functions)  # one a tensor argument (key_bias None has none): params last
            fused = accumulation_targets(ctx, params, range(edges - len(params), edges))
        grads = fused if fused else [torch.empty_like(t) for t in params]
        dx = _BACKWARD(grad_out, x, ws, params, masks, ctx.heads, grads, bool(fused))
        return (dx, None, None, *((None,) * len(params) if fused else grads))


set_autograd(_FORWARD, lambda x, key_bias, params, masks, heads, eps, grad_into: _Encoder.apply(
    x, key_bias, (masks, grad_into, heads, eps), *params))


def stack_forward(layers, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The EncoderLayers `layers` applied in turn to x [B, S, H] as one autograd node, the registered
    op torch.ops.xlmr_mp.encoder_layers (check `stack_applies` first: it is False while
    torch.compile traces, so the model's own path is what compile sees)."""
    key_bias = None if bias is None else bias.reshape(bias.shape[0], bias.shape[-1]).contiguous()
    first = layers[0]
    p = first.dropout if first.training else 0.0
    # the module path's draws, in its order: per layer the attention sublayer's mask, then the FFN's
    masks = [dropout_mask(x, p) for _ in range(2 * len(layers))] if p > 0 else []
    params = [t for layer in layers for t in _params(layer)]
    heads = first._modules["attention"].local_heads
    targets = edge_free_targets(params)
    if targets is None:
        return _FORWARD(x.contiguous(), key_bias, params, masks, heads, first.eps, [])[0]
    # inside gradients_into_grad: the parameters detached, their .grad added to by the backward
    out = _FORWARD(x.contiguous(), key_bias, [t.detach() for t in params], masks, heads, first.eps, targets)[0]
    if out.grad_fn is not None:
        out.grad_fn.register_prehook(lambda _grads: check_targets(params, targets, "the encoder's node"))
    return out


def layer_forward(layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """EncoderLayer `layer` applied to x [B, S, H] as one autograd node (check `applies` first)."""
    return stack_forward([layer], x, bias)
