"""The registered op torch.ops.xlmr_mp.scaled_masked_softmax (kernels/masked_softmax_op.py):
torch.library.opcheck on CPU (the reference's key) for several shapes and mask broadcasts, and on
CUDA with a GPU (the kernel of csrc/cuda/masked_softmax.cuh); values and gradients equal the torch
composition; the meta device and torch.compile (fullgraph) take it as one op; the model's attention
softmax goes through the op where dispatch says so."""
import math

import pytest
import torch

from xlmr_mp.kernels import dispatch, masked_softmax_op, ops

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
OP = torch.ops.xlmr_mp.scaled_masked_softmax


def _case(shape, mask_shape, dtype, device, grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*shape, generator=g) * 3).to(device=device, dtype=dtype).requires_grad_(grad)
    if mask_shape is None:
        return s, None
    mask = torch.rand(*mask_shape, generator=g) < 0.3
    mask[..., 0] = False                                       # no fully masked row (NaN, as torch's softmax)
    return s, mask.to(device)


MASKS = [None, (2, 1, 1, 9), (1, 1, 5, 9), (2, 3, 5, 9), (5, 9), (9,)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mask_shape", MASKS, ids=str)
def test_opcheck(device, dtype, mask_shape):
    s, mask = _case((2, 3, 5, 9), mask_shape, dtype, device, True)
    torch.library.opcheck(OP.default, (s, mask, 0.125))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 4, 33), (2, 4, 16, 16)], ids=str)
def test_opcheck_other_shapes_and_backward_op(device, shape):
    s, _ = _case(shape, None, torch.float32, device, False)
    mask = torch.zeros(shape[0], 1, 1, shape[-1], dtype=torch.bool, device=device)
    torch.library.opcheck(OP.default, (s, mask, 1.0))
    y = OP(s, mask, 0.5)
    torch.library.opcheck(torch.ops.xlmr_mp.scaled_masked_softmax_backward.default, (torch.randn_like(y), y, 0.5))


@pytest.mark.parametrize("mask_shape", MASKS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_equals_the_composition_in_value_and_gradient(mask_shape, dtype):
    s, mask = _case((2, 3, 5, 9), mask_shape, dtype, "cpu", True, seed=1)
    scale = 1 / math.sqrt(8)
    grad = torch.randn(s.shape, dtype=dtype)
    y = OP(s, mask, scale)
    (ds,) = torch.autograd.grad(y, s, grad)
    z = s.float() * scale
    if mask is not None:
        z = z.masked_fill(mask, float("-inf"))
    ref = torch.softmax(z, -1).to(dtype)
    (rds,) = torch.autograd.grad(ref, s, grad)
    assert torch.equal(y, ref)                         # the CPU key is the reference's composition
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ds, rds, **tol)
    if mask is not None:
        assert torch.all(y.masked_select(mask.expand(s.shape)) == 0)


def test_meta_and_compile_see_one_op():
    out = OP(torch.empty(2, 3, 4, 4, device="meta"), torch.empty(2, 1, 1, 4, dtype=torch.bool, device="meta"), 1.0)
    assert out.shape == (2, 3, 4, 4)
    s, mask = _case((2, 3, 5, 9), (2, 1, 1, 9), torch.float32, "cpu", True)

    def f(s, mask):
        return masked_softmax_op.scaled_masked_softmax(s, mask, 0.5) * 3
    for backend in ("eager", "aot_eager"):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend=backend)
        got = compiled(s, mask)
        (dgot,) = torch.autograd.grad(got.sum(), s)
        want = f(s, mask)
        (dwant,) = torch.autograd.grad(want.sum(), s)
        assert torch.equal(got, want) and torch.equal(dgot, dwant), backend


def test_the_models_softmax_runs_the_op_where_dispatched(monkeypatch):
    """kernels/ops.scaled_masked_softmax (the attention core's softmax, ops.masked_softmax_attention)
    runs the registered op where dispatch.use_fused says so and the reference otherwise."""
    s, mask = _case((1, 2, 3, 3), (1, 1, 1, 3), torch.float32, "cpu", True)
    assert "Softmax" in ops.scaled_masked_softmax(s, mask, 1.0).grad_fn.name()
    monkeypatch.setattr(dispatch, "use_fused", lambda t, op: op == "scaled_masked_softmax")
    assert "xlmr_mp_scaled_masked_softmax" in ops.scaled_masked_softmax(s, mask, 1.0).grad_fn.name()


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 12, 128, 128), (1, 2, 9, 3001)], ids=str)
def test_cuda_kernel_equals_the_reference(dtype, shape):
    if dispatch.extension() is None:
        pytest.skip("xlmr_mp._cuda is not built")
    s, _ = _case(shape, None, dtype, "cuda", True, seed=2)
    mask = (torch.rand(shape[0], 1, 1, shape[-1], device="cuda") < 0.3)
    mask[..., 0] = False
    grad = torch.randn_like(s)
    y = OP(s, mask, 0.125)
    ref = masked_softmax_op.scaled_masked_softmax_ref(s, mask, 0.125)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(y, ref, **tol)
    torch.testing.assert_close(torch.autograd.grad(y, s, grad)[0], torch.autograd.grad(ref, s, grad)[0], **tol)
