"""Fused-op entry points that `kernels.apply` installs in the model's op slots
(model/encoder.py, model/xlmr.py). Each has the contract of its plain torch reference, which lives
in the model (model/functional.py, imported here as `*_ref`) or beside its registered op
(`scaled_masked_softmax_ref`, the backward references). The public names run the registered op
(torch.ops.xlmr_mp.*: its CUDA key is the kernel of csrc/cuda) when `dispatch.use_fused` says so
(CUDA tensor, extension built, XLMR_MP_KERNELS switch, measured FASTER_ON table), bias_gelu the op's
AVX2 CPU key (bias_gelu_cpu.py) on fp32 CPU tensors, and the reference otherwise."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from xlmr_mp.kernels import bias_dropout_add_layernorm_op, bias_gelu_cpu, dispatch, masked_softmax_op
from xlmr_mp.kernels.bias_dropout_add_layernorm_op import (  # noqa: F401  (the backward's reference)
    backward_ref as bias_dropout_add_layernorm_backward_ref)
from xlmr_mp.kernels.bias_gelu_op import bias_gelu_backward_ref  # noqa: F401  (the backward's reference)
from xlmr_mp.kernels.masked_softmax_op import scaled_masked_softmax_backward_ref  # noqa: F401  (the references)
from xlmr_mp.kernels.masked_softmax_op import scaled_masked_softmax_ref
from xlmr_mp.model.functional import attention as attention_ref
from xlmr_mp.model.functional import bias_dropout_add_layernorm_ref, bias_gelu_ref  # noqa: F401  (the references)
from xlmr_mp.model.functional import cast_like as _like


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of x + bias in x's dtype (an fp32 bias next to a bf16 / fp16 x, as under
    autocast, is cast to x's dtype); x [..., H], bias [H]."""
    bias = _like(bias, x)
    if (bias is not None and bias.dim() == 1 and bias.dtype == x.dtype
            and dispatch.use_fused(x, "bias_gelu")):
        return torch.ops.xlmr_mp.bias_gelu(x, bias)     # the registered op's CUDA key
    if bias_gelu_cpu.applies(x, bias):     # fp32 on an AVX2 CPU: the op's CPU key, csrc/bias_gelu_cpu.cpp
        return bias_gelu_cpu.bias_gelu(x, bias)
    return bias_gelu_ref(x, bias)


def bias_dropout_add_layernorm(x, bias, residual, weight, ln_bias, p: float, training: bool,
                               eps: float = 1e-5):
    """Post-LN sublayer epilogue: LayerNorm(residual + Dropout(x + bias)) over the last dim.
    The sum is in x's dtype: under autocast x (a TP layer's output) is bf16 / fp16 while the
    residual (the previous LayerNorm's output) is fp32, and the bias and the residual are cast to
    x's dtype (megatron-core's bias-dropout-add casts its residual likewise). The LayerNorm is then
    autocast's on the reference path (fp32), the fused kernel's (fp32 statistics, its parameters
    and output in x's dtype) where dispatched."""
    bias, residual = _like(bias, x), _like(residual, x)
    if (weight is not None and ln_bias is not None and residual.shape == x.shape
            and bias_dropout_add_layernorm_op.cuda_fits(x) and dispatch.use_fused(x, "bias_dropout_add_layernorm")):
        return bias_dropout_add_layernorm_op.bias_dropout_add_layernorm(x, bias, residual, _like(weight, x),
                                                                        _like(ln_bias, x), p, training, eps)
    return bias_dropout_add_layernorm_ref(x, bias, residual, weight, ln_bias, p, training, eps)


def scaled_masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """softmax(scale * scores) over the last dim, mask True = excluded; scores [B, heads, Sq, Sk]."""
    mask_ok = mask is None or (mask.dim() <= 4 and mask.dtype == torch.bool and mask.device == scores.device)
    if scores.dim() == 4 and mask_ok and dispatch.use_fused(scores, "scaled_masked_softmax"):
        return masked_softmax_op.scaled_masked_softmax(scores, mask, scale)
    return scaled_masked_softmax_ref(scores, mask, scale)


def attention_uses_masked_softmax(q: torch.Tensor) -> bool:
    """Whether attention should run as explicit scores + `scaled_masked_softmax` instead of
    scaled_dot_product_attention: half-precision CUDA tensors where SDPA has no flash kernel
    (compute capability below 8.0: V100's sm_70) and the fused softmax is dispatched (FASTER_ON or
    XLMR_MP_KERNELS=fused)."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if dispatch.mode() == "reference":
        return False
    if torch.cuda.get_device_capability(q.device)[0] >= 8 and dispatch.mode() != "fused":
        return False
    return dispatch.use_fused(q, "scaled_masked_softmax")


def masked_softmax_attention(q, k, v, bias, scale: float, dropout_p: float = 0.0):
    """softmax(scale * q k^T, padding keys excluded) v with dropout: q, k, v [B, heads, S, D], bias
    the additive key-padding bias [B, 1, 1, S] (negative at padding keys) or None. The softmax is
    `scaled_masked_softmax` (the fused kernel where dispatched, its torch reference otherwise)."""
    scores = torch.matmul(q, k.transpose(-2, -1))                    # [B, heads, S, S]
    mask = None if bias is None else bias < 0
    probs = scaled_masked_softmax(scores, mask, scale)
    if mask is not None:    # a fully padded row (no real key) gives 0, as SDPA's finite-bias result does not
        probs = probs.nan_to_num(0.0)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p, True)
    return torch.matmul(probs, v)


def attention(q, k, v, bias, scale: float, dropout_p: float = 0.0):
    """model/functional.attention's contract (q, k, v [B, heads, S, D], additive key-padding bias
    [B, 1, 1, S] | None): `masked_softmax_attention` where `attention_uses_masked_softmax(q)`,
    scaled_dot_product_attention otherwise."""
    if attention_uses_masked_softmax(q):      # fp16 on sm_70: no flash kernel in SDPA
        return masked_softmax_attention(q, k, v, bias, scale, dropout_p)
    return attention_ref(q, k, v, bias, scale, dropout_p)
