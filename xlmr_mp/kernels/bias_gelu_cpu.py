"""Fused bias + exact GELU for CPU (csrc/bias_gelu_cpu.cpp, in xlmr_mp._C) beside its torch
reference `ops.bias_gelu_ref` (F.gelu(x + bias)).

Registered as the CPU key of torch.ops.xlmr_mp.bias_gelu (kernels/bias_gelu_op.py). One pass
forward (the sum x + bias is not stored: the backward recomputes it) and one backward
pass giving dx and the bias gradient together, where the reference runs an add, the GELU, its
backward and a column sum. erf is Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7).
`ops.bias_gelu` runs it where `dispatch.cpu_kernels` allows (fp32 CPU tensors, AVX2/FMA, not under
autocast or torch.compile, XLMR_MP_KERNELS not `reference`).
"""
from __future__ import annotations

import torch

from xlmr_mp.kernels import bias_gelu_op, dispatch  # noqa: F401  (bias_gelu_op registers the op)


def applies(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (bias is not None and bias.dim() == 1 and bias.dtype == x.dtype and x.dim() >= 1
            and x.shape[-1] == bias.shape[0] and dispatch.cpu_kernels(x) is not None)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias) through the CPU kernel (the CPU key of the registered op
    torch.ops.xlmr_mp.bias_gelu, kernels/bias_gelu_op.py); x [..., H] float32 on a CPU, bias [H]."""
    if dispatch._cpu_extension() is None:
        raise RuntimeError("the CPU bias-GELU kernel is unavailable (xlmr_mp._C without it, or a CPU without "
                           "AVX2/FMA); check bias_gelu_cpu.applies() first")
    return torch.ops.xlmr_mp.bias_gelu(x, bias)
