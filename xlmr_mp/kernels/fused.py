"""autograd.Functions over the CUDA kernels of `xlmr_mp._cuda` (csrc/cuda). Each matches its
torch reference in ops.py / mlm_xent.py; dispatch.py decides which one runs. (bias + GELU is the
registered op torch.ops.xlmr_mp.bias_gelu, kernels/bias_gelu_op.py.)"""
from __future__ import annotations

import torch

from xlmr_mp.kernels.dispatch import extension


def _ext():
    ext = extension()
    if ext is None:
        raise RuntimeError("xlmr_mp._cuda is not built; see xlmr_mp/kernels/dispatch.py")
    return ext


class BiasDropoutAddLayerNorm(torch.autograd.Function):
    """LayerNorm(residual + Dropout(x + bias)); bias may be None; weight and ln_bias are required."""

    @staticmethod
    def forward(ctx, x, bias, residual, weight, ln_bias, p, training, eps):
        out, y, keep, mean, rstd = _ext().bdaln_fwd(
            x.contiguous(), None if bias is None else bias.contiguous(), residual.contiguous(),
            weight.contiguous(), ln_bias.contiguous(), float(p), bool(training), float(eps))
        if keep is None:  # an undefined tensor (no dropout) comes back as None
            keep = torch.empty(0, dtype=torch.uint8, device=x.device)
        ctx.save_for_backward(y, keep, weight.contiguous(), mean, rstd)
        ctx.p, ctx.has_bias = float(p), bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        y, keep, weight, mean, rstd = ctx.saved_tensors
        dx, dres, dw, dlnb, dbias = _ext().bdaln_bwd(grad.contiguous(), y, keep, weight, mean, rstd,
                                                       ctx.p, ctx.has_bias)
        return dx, (dbias if ctx.has_bias else None), dres, dw, dlnb, None, None, None


class ScaledMaskedSoftmax(torch.autograd.Function):
    """softmax(scale * scores) with mask True = excluded; scores [B, heads, Sq, Sk]."""

    @staticmethod
    def forward(ctx, scores, mask, scale):
        if mask is not None:
            while mask.dim() < 4:
                mask = mask.unsqueeze(0)
        y = _ext().scaled_masked_softmax_fwd(scores.contiguous(), mask, float(scale))
        ctx.save_for_backward(y)
        ctx.scale = float(scale)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return _ext().scaled_masked_softmax_bwd(grad.contiguous(), y, ctx.scale), None, None


def mlm_xent_stats(logits: torch.Tensor, target_local: torch.Tensor):
    """(lse_local [M] fp32, target_logit [M] fp32) of shard logits [M, V] in one pass."""
    return _ext().mlm_xent_stats(logits, target_local)


def mlm_xent_grad_(logits: torch.Tensor, target_local: torch.Tensor, lse: torch.Tensor,
                   grad_scale: torch.Tensor) -> torch.Tensor:
    """logits <- grad_scale[:, None] * (exp(logits - lse[:, None]) - onehot(target_local)), in place."""
    return _ext().mlm_xent_grad_(logits, target_local, lse.float().contiguous(), grad_scale.float().contiguous())
