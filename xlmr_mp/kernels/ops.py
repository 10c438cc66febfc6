"""Fused-op entry points used by the model. Each op has a plain torch reference here (`*_ref`);
the public names run the CUDA kernel (csrc/cuda, autograd in fused.py) when `dispatch.use_fused`
says so (CUDA tensor, extension built, XLMR_MP_KERNELS switch, measured FASTER_ON table) and the
reference otherwise. The MLM vocabulary-shard cross-entropy lives in mlm_xent.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from xlmr_mp.kernels import dispatch
from xlmr_mp.kernels.mlm_xent import mlm_cross_entropy  # noqa: F401  (re-exported)


def bias_gelu_ref(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of x + bias."""
    return F.gelu(x + bias)


def bias_dropout_add_layernorm_ref(x, bias, residual, weight, ln_bias, p: float, training: bool,
                                   eps: float = 1e-5):
    """Post-LN sublayer epilogue: LayerNorm(residual + Dropout(x + bias))."""
    if bias is not None:
        x = x + bias
    y = residual + F.dropout(x, p=p, training=training)
    return F.layer_norm(y, (y.shape[-1],), weight, ln_bias, eps)


def scaled_masked_softmax_ref(scores: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """softmax(scale * scores) with positions where mask is True excluded (set to -inf).
    scores [B, heads, Sq, Sk]; mask broadcastable, True = masked out. Computed in fp32."""
    s = scores.float() * scale
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    return torch.softmax(s, dim=-1).to(scores.dtype)


# Limits of the fused kernels (larger shapes use the reference): LayerNorm rows are held in
# registers, 8192 packs of 16 bytes (or 8192 elements when H is not a multiple of 16 bytes).
_LN_MAX_PACKS = 8192


def _ln_fits(x: torch.Tensor) -> bool:
    h = x.shape[-1]
    wide = 16 // x.element_size()
    return (h // wide if h % wide == 0 else h) <= _LN_MAX_PACKS


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of x + bias; x [..., H], bias [H]."""
    if bias is not None and bias.dim() == 1 and dispatch.use_fused(x, "bias_gelu"):
        from xlmr_mp.kernels.fused import BiasGelu
        return BiasGelu.apply(x, bias)
    return bias_gelu_ref(x, bias)


def bias_dropout_add_layernorm(x, bias, residual, weight, ln_bias, p: float, training: bool,
                               eps: float = 1e-5):
    """Post-LN sublayer epilogue: LayerNorm(residual + Dropout(x + bias)) over the last dim."""
    if (weight is not None and ln_bias is not None and residual.shape == x.shape and _ln_fits(x)
            and dispatch.use_fused(x, "bias_dropout_add_layernorm")):
        from xlmr_mp.kernels.fused import BiasDropoutAddLayerNorm
        return BiasDropoutAddLayerNorm.apply(x, bias, residual, weight, ln_bias, p, training, eps)
    return bias_dropout_add_layernorm_ref(x, bias, residual, weight, ln_bias, p, training, eps)


def scaled_masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """softmax(scale * scores) over the last dim, mask True = excluded; scores [B, heads, Sq, Sk]."""
    if scores.dim() == 4 and (mask is None or mask.dim() <= 4) and dispatch.use_fused(scores, "scaled_masked_softmax"):
        from xlmr_mp.kernels.fused import ScaledMaskedSoftmax
        return ScaledMaskedSoftmax.apply(scores, mask, scale)
    return scaled_masked_softmax_ref(scores, mask, scale)
