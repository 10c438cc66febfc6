"""`torch.ops.xlmr_mp.scaled_masked_softmax`: softmax(scale * scores) over the last dim with masked
positions excluded, as a registered custom op (torch.library), so autograd, FakeTensor, the meta
device and torch.compile see it as one op.

    scaled_masked_softmax(scores [B, heads, Sq, Sk], mask | None, scale) -> probs [B, heads, Sq, Sk]
    scaled_masked_softmax_backward(grad [B, heads, Sq, Sk], probs, scale) -> d scores

mask: bool, broadcastable to scores with at most 4 dims, True = excluded (its logit set to -inf: a
row with every key masked gives NaN, as torch.softmax does); probs in scores' dtype, computed in
fp32. Keys: CUDA runs the kernel of xlmr_mp._cuda (csrc/cuda/masked_softmax.cuh) where it is
built; every other device, or a CUDA device without the extension, computes the torch reference
(`scaled_masked_softmax_ref`, `scaled_masked_softmax_backward_ref`). Which path a model call takes
is decided by kernels/ops.scaled_masked_softmax (`dispatch`).
"""
from __future__ import annotations

import torch

from xlmr_mp.kernels import dispatch


def scaled_masked_softmax_ref(scores: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """softmax(scale * scores) with positions where mask is True excluded (set to -inf).
    scores [B, heads, Sq, Sk]; mask broadcastable, True = masked out. Computed in fp32."""
    s = scores.float() * scale
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    return torch.softmax(s, dim=-1).to(scores.dtype)


def scaled_masked_softmax_backward_ref(grad, y, scale: float):
    """d scores of y = softmax(scale * scores): scale * y * (grad - sum(grad * y)), in fp32 (fp64 for fp64)."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    yf, gf = y.to(acc), grad.to(acc)
    return (scale * yf * (gf - (gf * yf).sum(-1, keepdim=True))).to(y.dtype)


@torch.library.custom_op("xlmr_mp::scaled_masked_softmax", mutates_args=())
def scaled_masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(scale * scores), mask True = excluded; see the module doc."""
    return scaled_masked_softmax_ref(scores, mask, scale)          # devices without a kernel of their own


@scaled_masked_softmax.register_kernel("cuda")
def _forward_cuda(scores, mask, scale):
    ext = dispatch.extension()
    mask_ok = mask is None or (mask.dim() <= 4 and mask.dtype == torch.bool and mask.device == scores.device)
    if ext is None or scores.dim() != 4 or not mask_ok:
        return scaled_masked_softmax_ref(scores, mask, scale)
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
    return ext.scaled_masked_softmax_fwd(scores.contiguous(), mask, float(scale))


@scaled_masked_softmax.register_fake
def _forward_fake(scores, mask, scale):
    return torch.empty_like(scores)


@torch.library.custom_op("xlmr_mp::scaled_masked_softmax_backward", mutates_args=())
def scaled_masked_softmax_backward(grad: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """d scores of y = scaled_masked_softmax(scores, mask, scale) for the upstream gradient grad."""
    return scaled_masked_softmax_backward_ref(grad, y, scale)


@scaled_masked_softmax_backward.register_kernel("cuda")
def _backward_cuda(grad, y, scale):
    ext = dispatch.extension()
    if ext is None:
        return scaled_masked_softmax_backward_ref(grad, y, scale)
    return ext.scaled_masked_softmax_bwd(grad.contiguous(), y.contiguous(), float(scale))


@scaled_masked_softmax_backward.register_fake
def _backward_fake(grad, y, scale):
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    ctx.scale = inputs[2]
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return torch.ops.xlmr_mp.scaled_masked_softmax_backward(grad, y, ctx.scale), None, None


scaled_masked_softmax.register_autograd(_backward, setup_context=_setup_context)
