"""Fused self-attention for CPU training at short sequences, beside its torch reference.

    attention(qkv [B, S, heads, 3, D], bias [B, 1, 1, S] | None, scale) -> [B, S, heads * D]

The kernel (csrc/attention_cpu.cpp, in xlmr_mp._C) reads q, k and v of each head straight from the
fused QKV projection's output (Megatron's per-head interleave), writes the context already in the
[B, S, heads * D] layout the output projection takes, and writes dQ, dK, dV straight into the QKV
gradient: no transposes, no split, one autograd node. It keeps the probabilities (S x S floats per
head) for the backward, where SDPA's CPU flash kernel recomputes them; at S <= 128 that is the
faster trade, at S = 256 it is even (bench/attention_cpu.py).

The reference is `torch.nn.functional.scaled_dot_product_attention`, which the model uses whenever
`applies` is False: another device or dtype, autocast, torch.compile tracing, attention dropout in
training, S > MAX_SEQ, a CPU without AVX2/FMA, or XLMR_MP_KERNELS=reference
(`dispatch.cpu_kernels`). XLMR_MP_KERNELS=fused lifts the MAX_SEQ limit.

The kernel is a registered op, torch.ops.xlmr_mp.qkv_attention (and its backward,
xlmr_mp::qkv_attention_backward): CPU-only (a CPU key and a fake kernel for FakeTensor, the meta
device and torch.compile's tracing; no CUDA key: on a GPU the model's attention is ops.attention's),
its autograd an Autograd kernel (cpu_fast_path.set_autograd). Tests of the op:
tests/kernels/test_cpu_node_ops.py; of the kernel: tests/kernels/test_attention_cpu.py.
"""
from __future__ import annotations

import torch

from xlmr_mp.kernels import dispatch
from xlmr_mp.kernels.cpu_fast_path import define_cpu_op, set_autograd

# The longest sequence the kernel takes by default: past it SDPA's CPU kernel is as fast or faster
# (bench/attention_cpu.py; figures in bench/results/attention_cpu.txt).
MAX_SEQ = 128


def _ext():
    """xlmr_mp._C when this CPU can run its kernels (whatever the tensor or switch), else None."""
    return dispatch._cpu_extension()


def applies(qkv: torch.Tensor, bias: torch.Tensor | None, dropout_p: float) -> bool:
    """Whether `attention` (the fused CPU kernel) should run instead of SDPA for this call;
    dropout_p is the attention dropout in effect (0 in eval). Reads qkv's dtype, device, batch
    (dim 0) and sequence length (dim 1) only, so any tensor with those may stand in for it."""
    if dropout_p > 0 or dispatch.cpu_kernels(qkv) is None:
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.dim() != 4 or bias.shape[1] != 1
                             or bias.shape[2] != 1 or bias.shape[0] != qkv.shape[0]):
        return False
    return dispatch.mode() == "fused" or qkv.shape[1] <= MAX_SEQ


def _check(qkv: torch.Tensor, key_bias: torch.Tensor | None) -> None:
    if qkv.dim() != 5 or qkv.shape[3] != 3:
        raise ValueError(f"qkv_attention: qkv must be [B, S, heads, 3, D], got {tuple(qkv.shape)}")
    if qkv.dtype != torch.float32 or (key_bias is not None and key_bias.dtype != torch.float32):
        raise TypeError("qkv_attention: the CPU kernel takes float32 qkv and key_bias")
    if _ext() is None:
        raise RuntimeError("the CPU attention kernel is unavailable (xlmr_mp._C without it, or a CPU "
                           "without AVX2/FMA); check attention_cpu.applies() first")


def _qkv_attention(qkv, key_bias, scale):
    _check(qkv, key_bias)
    B, S, NH, _, D = qkv.shape
    qkv = qkv.detach().contiguous()
    out = qkv.new_empty(B, S, NH * D)
    probs = qkv.new_empty(B, NH, S, S)
    kb = None if key_bias is None else key_bias.detach().contiguous().numpy()
    _ext().attention_forward(qkv.numpy(), kb, scale, out.numpy(), probs.numpy(), torch.get_num_threads())
    return out, probs


def _qkv_attention_fake(qkv, key_bias, scale):
    B, S, NH, _, D = qkv.shape
    return qkv.new_empty(B, S, NH * D), qkv.new_empty(B, NH, S, S)


_FORWARD = define_cpu_op("qkv_attention(Tensor qkv, Tensor? key_bias, float scale) -> (Tensor, Tensor)",
                         _qkv_attention, _qkv_attention_fake)
"""torch.ops.xlmr_mp.qkv_attention(qkv, key_bias, scale) -> (context [B, S, heads * D], probabilities
[B, heads, S, S]): softmax(scale q k^T + key_bias) v for every head of qkv [B, S, heads, 3, D]
(float32); key_bias [B, S] (added to every query's row) or None. The probabilities are what the
backward reads (an output, as native_layer_norm's mean and rstd)."""


def _qkv_attention_backward(grad, qkv, probs, out, scale):
    _check(qkv, None)
    grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype)
    _ext().attention_backward(*(t.detach().contiguous().numpy() for t in (qkv, probs, out, grad)), scale,
                              grad_qkv.numpy(), torch.get_num_threads())
    return grad_qkv


_BACKWARD = define_cpu_op("qkv_attention_backward(Tensor grad, Tensor qkv, Tensor probs, Tensor out, float scale) "
                          "-> Tensor", _qkv_attention_backward,
                          lambda grad, qkv, *_: torch.empty_like(qkv, memory_format=torch.contiguous_format))
"""torch.ops.xlmr_mp.qkv_attention_backward(grad, qkv, probs, out, scale) -> d qkv [B, S, heads, 3, D]:
the backward of qkv_attention for the context gradient grad [B, S, heads * D], from its forward's
qkv, probabilities and context."""


class _Attention(torch.autograd.Function):
    """xlmr_mp::qkv_attention's autograd (its Autograd kernel, cpu_fast_path.set_autograd)."""

    @staticmethod
    def forward(ctx, qkv, key_bias, scale):
        with torch._C._AutoDispatchBelowAutograd():      # the op's kernel below autograd (CPU, fake)
            out, probs = torch.ops.xlmr_mp.qkv_attention.default(qkv, key_bias, scale)
        ctx.mark_non_differentiable(probs)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(qkv, probs, out)
        ctx.scale = scale
        return out, probs

    @staticmethod
    def backward(ctx, grad_out, _grad_probs):
        if grad_out is None:
            return None, None, None
        qkv, probs, out = ctx.saved_tensors
        return _BACKWARD(grad_out, qkv, probs, out, ctx.scale), None, None


set_autograd(_FORWARD, lambda *args: _Attention.apply(*args))


def attention(qkv: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T + bias) v for every head of qkv [B, S, heads, 3, D] (float32, CPU);
    bias is the additive key-padding bias [B, 1, 1, S] or None. Returns [B, S, heads * D], through
    the registered op torch.ops.xlmr_mp.qkv_attention."""
    key_bias = None if bias is None else bias.reshape(bias.shape[0], bias.shape[-1])
    return _FORWARD(qkv, key_bias, scale)[0]


def attention_ref(qkv: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The torch reference of `attention`: scaled_dot_product_attention over the same layout."""
    B, S, NH, _, D = qkv.shape
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=3))
    ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return ctx.transpose(1, 2).reshape(B, S, NH * D)
