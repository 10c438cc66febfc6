"""Fused-op entry points used by the model. Each op has a plain torch reference here; the CUDA
kernels (csrc/cuda, issue 7) plug in behind the same signatures via `dispatch.py`."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


# Public names the model calls; dispatch may rebind them to fused CUDA versions.
bias_gelu = bias_gelu_ref
bias_dropout_add_layernorm = bias_dropout_add_layernorm_ref
scaled_masked_softmax = scaled_masked_softmax_ref
