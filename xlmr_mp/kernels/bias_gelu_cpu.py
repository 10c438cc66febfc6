"""Fused bias + exact GELU for CPU (csrc/bias_gelu_cpu.cpp, in xlmr_mp._C) beside its torch
reference `ops.bias_gelu_ref` (F.gelu(x + bias)).

One pass forward (the sum x + bias is not stored: the backward recomputes it) and one backward
pass giving dx and the bias gradient together, where the reference runs an add, the GELU, its
backward and a column sum. erf is Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7).
`ops.bias_gelu` runs it where `dispatch.cpu_kernels` allows (fp32 CPU tensors, AVX2/FMA, not under
autocast or torch.compile, XLMR_MP_KERNELS not `reference`).
"""
from __future__ import annotations

import torch

from xlmr_mp.kernels import dispatch


def applies(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (bias is not None and bias.dim() == 1 and bias.dtype == x.dtype and x.dim() >= 1
            and x.shape[-1] == bias.shape[0] and dispatch.cpu_kernels(x) is not None)


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        x = x.contiguous()
        bias = bias.contiguous()
        y = torch.empty_like(x)
        dispatch._cpu_extension().bias_gelu_forward(x.detach().numpy(), bias.detach().numpy(), y.numpy(),
                                                    torch.get_num_threads())
        ctx.save_for_backward(x, bias)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, bias = ctx.saved_tensors
        dx = torch.empty_like(x)
        dbias = torch.empty_like(bias)
        dispatch._cpu_extension().bias_gelu_backward(grad.detach().contiguous().numpy(), x.detach().numpy(),
                                                     bias.detach().numpy(), dx.numpy(), dbias.numpy(),
                                                     torch.get_num_threads())
        return dx, dbias


@torch.compiler.disable
def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias) through the CPU kernel; x [..., H] float32 on a CPU, bias [H]."""
    if dispatch._cpu_extension() is None:
        raise RuntimeError("the CPU bias-GELU kernel is unavailable (xlmr_mp._C without it, or a CPU without "
                           "AVX2/FMA); check bias_gelu_cpu.applies() first")
    return _BiasGelu.apply(x, bias)
