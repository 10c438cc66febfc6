"""`torch.ops.xlmr_mp.bias_gelu(x, bias)`: exact (erf) GELU of x + bias as a registered custom op
(torch.library), so autograd, FakeTensor, the meta device and torch.compile see it as one op.

    bias_gelu(x [..., H], bias [H]) -> y [..., H]                (x's dtype; bias of x's dtype)
    bias_gelu_backward(grad [..., H], x, bias) -> (dx [..., H], dbias [H])

Keys: CPU runs the AVX2 kernel of xlmr_mp._C (csrc/bias_gelu_cpu.cpp) for fp32 where this CPU
has it, CUDA the kernel of xlmr_mp._cuda (csrc/cuda) where it is built; anything else (another
dtype, the extension missing) computes the torch reference (model/functional.bias_gelu_ref and
bias_gelu_backward_ref here), so the op is defined on every input. Which path a model call takes
(fused op or the model's own reference) is decided by kernels/ops.bias_gelu (`dispatch`).
`register_fake` gives the output shapes; `register_autograd` calls the backward op, itself
registered, with its own fake.
"""
from __future__ import annotations

import torch

from xlmr_mp.kernels import dispatch
from xlmr_mp.model.functional import bias_gelu_ref


def bias_gelu_backward_ref(grad, x, bias):
    """(dx, dbias) of gelu(x + bias) in torch: grad * (Phi(z) + z phi(z)), z = x + bias, in fp32."""
    z = (x + bias).float()
    cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
    pdf = 0.3989422804014327 * torch.exp(-0.5 * z * z)
    dx = grad.float() * (cdf + z * pdf)
    return dx.to(x.dtype), dx.reshape(-1, x.shape[-1]).sum(0).to(bias.dtype)


def _cpu_kernel(x: torch.Tensor):
    """xlmr_mp._C when its AVX2 kernel can take fp32 x on this CPU, else None."""
    return dispatch._cpu_extension() if x.dtype == torch.float32 else None


@torch.library.custom_op("xlmr_mp::bias_gelu", mutates_args=())
def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias), exact erf GELU: x [..., H], bias [H] of x's dtype -> [..., H]."""
    return bias_gelu_ref(x, bias)                 # devices without a kernel of their own


@bias_gelu.register_kernel("cpu")
def _bias_gelu_cpu(x, bias):
    ext = _cpu_kernel(x)
    if ext is None:
        return bias_gelu_ref(x, bias)
    x, bias = x.contiguous(), bias.contiguous()
    y = torch.empty_like(x)
    ext.bias_gelu_forward(x.numpy(), bias.numpy(), y.numpy(), torch.get_num_threads())
    return y


@bias_gelu.register_kernel("cuda")
def _bias_gelu_cuda(x, bias):
    ext = dispatch.extension()
    if ext is None:
        return bias_gelu_ref(x, bias)
    return ext.bias_gelu_fwd(x.contiguous(), bias.contiguous())


@bias_gelu.register_fake
def _bias_gelu_fake(x, bias):
    return torch.empty_like(x)


@torch.library.custom_op("xlmr_mp::bias_gelu_backward", mutates_args=())
def bias_gelu_backward(grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [..., H], dbias [H]) of y = gelu(x + bias) for the upstream gradient grad [..., H]."""
    return bias_gelu_backward_ref(grad, x, bias)


@bias_gelu_backward.register_kernel("cpu")
def _bias_gelu_backward_cpu(grad, x, bias):
    ext = _cpu_kernel(x)
    if ext is None or grad.dtype != torch.float32 or bias.dtype != torch.float32:
        return bias_gelu_backward_ref(grad, x, bias)
    grad, x, bias = grad.contiguous(), x.contiguous(), bias.contiguous()
    dx, dbias = torch.empty_like(x), torch.empty_like(bias)
    ext.bias_gelu_backward(grad.numpy(), x.numpy(), bias.numpy(), dx.numpy(), dbias.numpy(), torch.get_num_threads())
    return dx, dbias


@bias_gelu_backward.register_kernel("cuda")
def _bias_gelu_backward_cuda(grad, x, bias):
    ext = dispatch.extension()
    if ext is None:
        return bias_gelu_backward_ref(grad, x, bias)
    dx, dbias = ext.bias_gelu_bwd(grad.contiguous(), x.contiguous(), bias.contiguous())
    return dx, dbias


@bias_gelu_backward.register_fake
def _bias_gelu_backward_fake(grad, x, bias):
    return torch.empty_like(x), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, grad):
    x, bias = ctx.saved_tensors
    dx, dbias = torch.ops.xlmr_mp.bias_gelu_backward(grad, x, bias)
    return (dx if ctx.needs_input_grad[0] else None), (dbias if ctx.needs_input_grad[1] else None)


bias_gelu.register_autograd(_backward, setup_context=_setup_context)
