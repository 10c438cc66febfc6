"""`torch.ops.xlmr_mp.bias_dropout_add_layernorm`: the post-LN sublayer epilogue
LayerNorm(residual + keep * (x + bias)) as a registered custom op (torch.library), so autograd,
FakeTensor, the meta device and torch.compile see it as one op.

    bias_dropout_add_layernorm(x [..., H], bias [H] | None, residual [..., H], keep [..., H] | None,
                               weight [H], ln_bias [H], eps)
        -> (out [..., H], y [..., H], mean [rows], rstd [rows])
    bias_dropout_add_layernorm_backward(grad [..., H], y, keep | None, weight, mean, rstd)
        -> (dx, dresidual [..., H], dweight, dln_bias, dbias [H])

y = residual + keep * (x + bias) is the LayerNorm's input, mean / rstd its row statistics (rows =
x.numel() / H, in fp32, fp64 for an fp64 x); the backward op takes them (out is the only
differentiable output). The other tensors share x's dtype. Dropout is an input, so the op is a
pure function (opcheck, torch.compile and an activation recompute see the same values for the
same inputs): `keep` is the dropout multiplier, 0 where dropped and 1 / (1 - p) where kept, in x's
dtype (None: no dropout). `dropout_keep(x, p)` draws it from torch's default generator as
F.dropout(x, p, True) does on a CPU (the same Bernoulli draws, the same multiplier), so on a CPU
`bias_dropout_add_layernorm(..., p, training)` drops the elements the torch reference
(model/functional.bias_dropout_add_layernorm_ref) drops, with its bits where the torch reference
computes the op (every dtype but fp32 with the AVX2 kernel, whose multiply-add and LayerNorm round
on their own).

Keys: CPU runs the AVX2 kernel of xlmr_mp._C (csrc/layernorm_cpu.cpp) for fp32 where this CPU has
it, CUDA the kernel of xlmr_mp._cuda (csrc/cuda/bias_dropout_add_ln.cuh) where it is built and H
fits its registers; anything else computes the torch reference (`forward_ref`, `backward_ref`), so
the op is defined on every input. Which path a model call takes (this op or the model's reference)
is decided by kernels/ops.bias_dropout_add_layernorm (`dispatch`).
"""
from __future__ import annotations

import torch

from xlmr_mp.kernels import dispatch

# The CUDA kernel holds a row in registers: 8192 packs of 16 bytes (8192 elements when H is not a
# multiple of 16 bytes); wider rows take the reference.
_CUDA_MAX_PACKS = 8192
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cuda_fits(x: torch.Tensor) -> bool:
    """Whether the CUDA kernel takes x's dtype and can hold a row of x (its hidden size H) in registers."""
    if x.dtype not in _CUDA_DTYPES:
        return False
    h = x.shape[-1]
    wide = 16 // x.element_size()
    return (h // wide if h % wide == 0 else h) <= _CUDA_MAX_PACKS


def dropout_keep(x: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout multiplier for x: Bernoulli(1 - p) / (1 - p) in x's dtype and shape, drawn from
    torch's default generator of x's device exactly as F.dropout(x, p, training=True) draws it on
    a CPU (x * dropout_keep(x, p) are then F.dropout's bits); zeros at p = 1 (no draw), as F.dropout."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout_keep: p must be in [0, 1], got {p}")
    if p == 1.0:
        return torch.zeros_like(x)
    return torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p)


def _rows(x: torch.Tensor):
    n = 1
    for s in x.shape[:-1]:
        n = n * s
    return n


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    """The row statistics' dtype (and the backward's arithmetic): fp32, fp64 for fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def forward_ref(x, bias, residual, keep, weight, ln_bias, eps: float):
    """(out, y, mean, rstd) in torch: y = residual + keep * (x + bias) in x's dtype (F.dropout's
    rounding), then native_layer_norm; mean / rstd [rows] (_stats_dtype)."""
    a = x if bias is None else x + bias
    if keep is not None:
        a = a * keep
    y = residual + a
    out, mean, rstd = torch.native_layer_norm(y, [y.shape[-1]], weight, ln_bias, eps)
    return out, y, mean.reshape(-1).to(_stats_dtype(x)), rstd.reshape(-1).to(_stats_dtype(x))


def backward_ref(grad, y, keep, weight, mean, rstd):
    """(dx, dresidual, dweight, dln_bias, dbias) of out = LayerNorm(y), y = residual + keep * (x + bias),
    from the saved y, keep (None without dropout) and row mean / rstd, in fp32 (fp64 for fp64):
    with xhat = (y - mean) * rstd and g = grad * weight, dresidual = rstd * (g - mean(g) - xhat *
    mean(g * xhat)), dx = dresidual * keep, dbias = dx summed over rows."""
    h, acc = y.shape[-1], _stats_dtype(y)
    g2 = grad.to(acc).reshape(-1, h)
    xhat = (y.to(acc).reshape(-1, h) - mean.to(acc).reshape(-1, 1)) * rstd.to(acc).reshape(-1, 1)
    g = g2 * weight.to(acc)
    dres = rstd.to(acc).reshape(-1, 1) * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    dx = dres.clone() if keep is None else dres * keep.reshape(-1, h).to(acc)     # outputs never alias
    return (dx.reshape(y.shape).to(y.dtype), dres.reshape(y.shape).to(y.dtype), (g2 * xhat).sum(0).to(weight.dtype),
            g2.sum(0).to(weight.dtype), dx.sum(0).to(weight.dtype))


def _cpu_kernel(*tensors):
    """xlmr_mp._C when its AVX2 kernel can take these (fp32 or None) tensors on this CPU, else None."""
    if any(t is not None and t.dtype != torch.float32 for t in tensors):
        return None
    return dispatch._cpu_extension()


def _np(t):
    return None if t is None else t.contiguous().numpy()


@torch.library.custom_op("xlmr_mp::bias_dropout_add_layernorm", mutates_args=())
def bias_dropout_add_layernorm_op(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                                  keep: torch.Tensor | None, weight: torch.Tensor, ln_bias: torch.Tensor,
                                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(LayerNorm(y), y, mean, rstd) of y = residual + keep * (x + bias); see the module doc."""
    return forward_ref(x, bias, residual, keep, weight, ln_bias, eps)    # devices without a kernel of their own


@bias_dropout_add_layernorm_op.register_kernel("cpu")
def _forward_cpu(x, bias, residual, keep, weight, ln_bias, eps):
    ext = _cpu_kernel(x, bias, residual, keep, weight, ln_bias)
    if ext is None:
        return forward_ref(x, bias, residual, keep, weight, ln_bias, eps)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    rows = _rows(x)
    mean, rstd = x.new_empty(rows), x.new_empty(rows)
    ext.bias_dropout_add_layernorm_forward(_np(x), _np(bias), _np(residual), _np(keep), _np(weight), _np(ln_bias),
                                           eps, out.numpy(), y.numpy(), mean.numpy(), rstd.numpy(),
                                           torch.get_num_threads())
    return out, y, mean, rstd


@bias_dropout_add_layernorm_op.register_kernel("cuda")
def _forward_cuda(x, bias, residual, keep, weight, ln_bias, eps):
    ext = dispatch.extension()
    if ext is None or not cuda_fits(x):
        return forward_ref(x, bias, residual, keep, weight, ln_bias, eps)
    c = lambda t: None if t is None else t.contiguous()     # noqa: E731
    out, y, mean, rstd = ext.bdaln_fwd(c(x), c(bias), c(residual), c(keep), c(weight), c(ln_bias), float(eps))
    return out, y, mean, rstd


@bias_dropout_add_layernorm_op.register_fake
def _forward_fake(x, bias, residual, keep, weight, ln_bias, eps):
    rows = _rows(x)
    return (torch.empty_like(x), torch.empty_like(x), x.new_empty(rows, dtype=_stats_dtype(x)),
            x.new_empty(rows, dtype=_stats_dtype(x)))


@torch.library.custom_op("xlmr_mp::bias_dropout_add_layernorm_backward", mutates_args=())
def bias_dropout_add_layernorm_backward(
        grad: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None, weight: torch.Tensor, mean: torch.Tensor,
        rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dresidual, dweight, dln_bias, dbias) of the forward op for the upstream gradient of out."""
    return backward_ref(grad, y, keep, weight, mean, rstd)


@bias_dropout_add_layernorm_backward.register_kernel("cpu")
def _backward_cpu(grad, y, keep, weight, mean, rstd):
    ext = _cpu_kernel(grad, y, keep, weight, mean, rstd)
    if ext is None:
        return backward_ref(grad, y, keep, weight, mean, rstd)
    dx, dres = torch.empty(y.shape), torch.empty(y.shape)
    dw, dlnb, dbias = torch.empty(weight.shape), torch.empty(weight.shape), torch.empty(weight.shape)
    ext.bias_dropout_add_layernorm_backward(_np(grad), _np(y), _np(keep), _np(weight), _np(mean), _np(rstd),
                                            dres.numpy(), dx.numpy(), dw.numpy(), dlnb.numpy(), dbias.numpy(),
                                            torch.get_num_threads())
    return dx, dres, dw, dlnb, dbias


@bias_dropout_add_layernorm_backward.register_kernel("cuda")
def _backward_cuda(grad, y, keep, weight, mean, rstd):
    ext = dispatch.extension()
    if ext is None or not cuda_fits(y):
        return backward_ref(grad, y, keep, weight, mean, rstd)
    dx, dres, dw, dlnb, dbias = ext.bdaln_bwd(grad.contiguous(), y.contiguous(),
                                              None if keep is None else keep.contiguous(), weight.contiguous(),
                                              mean.contiguous(), rstd.contiguous())
    return dx, dres, dw, dlnb, dbias


@bias_dropout_add_layernorm_backward.register_fake
def _backward_fake(grad, y, keep, weight, mean, rstd):
    return (torch.empty_like(y), torch.empty_like(y), torch.empty_like(weight), torch.empty_like(weight),
            torch.empty_like(weight))


def _setup_context(ctx, inputs, output):
    x, bias, residual, keep, weight, ln_bias, eps = inputs
    out, y, mean, rstd = output
    ctx.mark_non_differentiable(y, mean, rstd)       # saved for the backward; out alone carries a gradient
    ctx.save_for_backward(y, keep, weight, mean, rstd)


def _backward(ctx, grad, _grad_y, _grad_mean, _grad_rstd):
    y, keep, weight, mean, rstd = ctx.saved_tensors
    dx, dres, dw, dlnb, dbias = torch.ops.xlmr_mp.bias_dropout_add_layernorm_backward(grad, y, keep, weight, mean,
                                                                                      rstd)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, dbias if need[1] else None, dres if need[2] else None, None,
            dw if need[4] else None, dlnb if need[5] else None, None)


bias_dropout_add_layernorm_op.register_autograd(_backward, setup_context=_setup_context)


def bias_dropout_add_layernorm(x, bias, residual, weight, ln_bias, p: float, training: bool, eps: float = 1e-5):
    """LayerNorm(residual + Dropout(x + bias)) through the op, all tensors in x's dtype: the
    contract of model/functional.bias_dropout_add_layernorm_ref, the dropout multiplier drawn by
    `dropout_keep` when training with p > 0 (F.dropout's draws; none otherwise, as F.dropout)."""
    keep = dropout_keep(x, p) if training and p > 0 else None
    return torch.ops.xlmr_mp.bias_dropout_add_layernorm(x, bias, residual, keep, weight, ln_bias, float(eps))[0]
