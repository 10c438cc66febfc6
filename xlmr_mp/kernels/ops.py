"""Fused-op entry points that `kernels.apply` installs in the model's op slots
(model/encoder.py, model/xlmr.py). Each has the contract of its plain torch reference, which lives
in the model (model/functional.py, imported here as `*_ref`) or here (`scaled_masked_softmax_ref`).
The public names run the CUDA kernel (csrc/cuda, autograd in fused.py) when `dispatch.use_fused`
says so (CUDA tensor, extension built, XLMR_MP_KERNELS switch, measured FASTER_ON table), bias_gelu
the AVX2 CPU kernel (bias_gelu_cpu.py) on fp32 CPU tensors, and the reference otherwise."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from xlmr_mp.kernels import bias_gelu_cpu, dispatch
from xlmr_mp.kernels.bias_gelu_op import bias_gelu_backward_ref  # noqa: F401  (the backward's reference)
from xlmr_mp.model.functional import attention as attention_ref
from xlmr_mp.model.functional import bias_dropout_add_layernorm_ref, bias_gelu_ref  # noqa: F401  (the references)
from xlmr_mp.model.functional import cast_like as _like


def scaled_masked_softmax_ref(scores: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """softmax(scale * scores) with positions where mask is True excluded (set to -inf).
    scores [B, heads, Sq, Sk]; mask broadcastable, True = masked out. Computed in fp32."""
    s = scores.float() * scale
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    return torch.softmax(s, dim=-1).to(scores.dtype)


# Backward formulas the CUDA kernels implement, in torch (fp32 math), so that CPU tests can check them
# against autograd and GPU tests can check the kernels against them.

def bias_dropout_add_layernorm_backward_ref(grad, y, keep, weight, mean, rstd, p: float):
    """(dx, dresidual, dweight, dln_bias) of LayerNorm(y), y = residual + keep * (x + bias) / (1 - p),
    from the saved y, keep mask (None without dropout) and per-row mean / rstd; dbias = dx summed
    over rows. xhat = (y - mean) * rstd, g = grad * weight:
    dresidual = rstd * (g - mean(g) - xhat * mean(g * xhat))."""
    h = y.shape[-1]
    g2 = grad.float().reshape(-1, h)
    xhat = (y.float().reshape(-1, h) - mean.reshape(-1, 1)) * rstd.reshape(-1, 1)
    g = g2 * weight.float()
    dres = rstd.reshape(-1, 1) * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    dx = dres if keep is None else dres * keep.reshape(-1, h).float() / (1.0 - p)
    return (dx.reshape(y.shape).to(y.dtype), dres.reshape(y.shape).to(y.dtype),
            (g2 * xhat).sum(0).to(weight.dtype), g2.sum(0).to(weight.dtype))


def scaled_masked_softmax_backward_ref(grad, y, scale: float):
    """d scores of y = softmax(scale * scores): scale * y * (grad - sum(grad * y))."""
    yf, gf = y.float(), grad.float()
    return (scale * yf * (gf - (gf * yf).sum(-1, keepdim=True))).to(y.dtype)


# Limits of the fused kernels (larger shapes use the reference): LayerNorm rows are held in
# registers, 8192 packs of 16 bytes (or 8192 elements when H is not a multiple of 16 bytes).
_LN_MAX_PACKS = 8192


def _ln_fits(x: torch.Tensor) -> bool:
    h = x.shape[-1]
    wide = 16 // x.element_size()
    return (h // wide if h % wide == 0 else h) <= _LN_MAX_PACKS


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
            and _ln_fits(x) and dispatch.use_fused(x, "bias_dropout_add_layernorm")):
        from xlmr_mp.kernels.fused import BiasDropoutAddLayerNorm
        return BiasDropoutAddLayerNorm.apply(x, bias, residual, _like(weight, x), _like(ln_bias, x), p, training,
                                             eps)
    return bias_dropout_add_layernorm_ref(x, bias, residual, weight, ln_bias, p, training, eps)


def scaled_masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """softmax(scale * scores) over the last dim, mask True = excluded; scores [B, heads, Sq, Sk]."""
    mask_ok = mask is None or (mask.dim() <= 4 and mask.dtype == torch.bool and mask.device == scores.device)
    if scores.dim() == 4 and mask_ok and dispatch.use_fused(scores, "scaled_masked_softmax"):
        from xlmr_mp.kernels.fused import ScaledMaskedSoftmax
        return ScaledMaskedSoftmax.apply(scores, mask, scale)
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
