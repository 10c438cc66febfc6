"""The elementwise pieces of an XLM-R layer in plain torch: the model's own ops and the reference
every fused kernel must match (xlmr_mp/kernels/ops.py imports them and runs a fused kernel in their
place where `kernels.apply` installed it and the kernel's dispatch check says so).

Under autocast x (a TP layer's output) is bf16 / fp16 while biases, LayerNorm parameters and the
residual (a LayerNorm output) are fp32; the ops cast those to x's dtype (`cast_like`), so an
activation stays in the compute dtype (megatron-core's bias-dropout-add casts its residual likewise).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cast_like(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """t in x's dtype (a differentiable cast; t itself, or None, where nothing is to cast)."""
    return t if t is None or t.dtype == x.dtype else t.to(x.dtype)


def bias_gelu_ref(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of x + bias, with no cast."""
    return F.gelu(x + bias)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of x + bias in x's dtype; x [..., H], bias [H] (cast to x's dtype)."""
    return bias_gelu_ref(x, cast_like(bias, x))


def bias_dropout_add_layernorm_ref(x, bias, residual, weight, ln_bias, p: float, training: bool,
                                   eps: float = 1e-5):
    """Post-LN sublayer epilogue LayerNorm(residual + Dropout(x + bias)), with no cast; bias may be None."""
    if bias is not None:
        x = x + bias
    y = residual + F.dropout(x, p=p, training=training)
    return F.layer_norm(y, (y.shape[-1],), weight, ln_bias, eps)


def bias_dropout_add_layernorm(x, bias, residual, weight, ln_bias, p: float, training: bool,
                               eps: float = 1e-5):
    """LayerNorm(residual + Dropout(x + bias)) over the last dim, the sum in x's dtype (bias and
    residual cast to it); the LayerNorm itself runs in autocast's dtype for layer_norm (fp32)."""
    return bias_dropout_add_layernorm_ref(x, cast_like(bias, x), cast_like(residual, x), weight, ln_bias, p,
                                          training, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
              dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(scale * q k^T + bias) v with dropout on the probabilities: q, k, v [B, heads, S, D],
    bias the additive key-padding bias [B, 1, 1, S] or None -> [B, heads, S, D]
    (scaled_dot_product_attention: flash / memory-efficient kernels where the GPU has them)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
