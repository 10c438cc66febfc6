"""The registered op torch.ops.xlmr_mp.bias_gelu (kernels/bias_gelu_op.py): torch.library.opcheck
(schema, FakeTensor, autograd registration, AOT dispatch) on CPU (the AVX2 kernel's fp32 and the
reference's fp64) and, with a GPU, on CUDA; values and both gradients equal the model's reference
(model/functional.bias_gelu_ref); the model's bias-GELU goes through the op where kernels.apply put
the fused ops; the meta device and torch.compile (fullgraph) take it as one op."""
import pytest
import torch

from xlmr_mp.kernels import bias_gelu_op, dispatch  # noqa: F401  (registers the op)
from xlmr_mp.model.functional import bias_gelu_ref

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def _args(shape, dtype, device, grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3.0).to(device=device, dtype=dtype)
    b = torch.randn(shape[-1], generator=g).to(device=device, dtype=dtype)
    return x.requires_grad_(grad), b.requires_grad_(grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(4, 16, 32), (3, 37), (1, 5)], ids=str)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_opcheck(device, dtype, shape, grad):
    torch.library.opcheck(torch.ops.xlmr_mp.bias_gelu.default, _args(shape, dtype, device, grad))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_opcheck(device):
    x, b = _args((6, 24), torch.float32, device, False)
    grad = torch.randn_like(x)
    torch.library.opcheck(torch.ops.xlmr_mp.bias_gelu_backward.default, (grad, x, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 64, 128), (3, 37), (2, 9, 8)], ids=str)
def test_equals_the_reference_in_value_and_gradients(device, shape):
    x, b = _args(shape, torch.float32, device, True, seed=1)
    grad = torch.randn_like(x)
    y = torch.ops.xlmr_mp.bias_gelu(x, b)
    dx, db = torch.autograd.grad(y, (x, b), grad)
    ry = bias_gelu_ref(x, b)
    rdx, rdb = torch.autograd.grad(ry, (x, b), grad)
    # held to the float64 GELU at 1e-6 and to torch's float32 ops at 2e-6 (tests/kernels/test_bias_gelu_cpu.py)
    exact = torch.nn.functional.gelu((x + b).double())
    assert (y.double() - exact).abs().max().item() <= 1e-6
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(dx, rdx, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(db, rdb, rtol=1e-5, atol=1e-5)


def test_cpu_key_runs_the_avx2_kernel(cpu_extension_calls):
    """fp32 on a CPU with the kernel: the op's CPU key calls xlmr_mp._C (the same call, so the same
    bits, as the kernel's autograd.Function had); fp64: the reference."""
    x, b = _args((5, 16), torch.float32, "cpu", True)
    torch.ops.xlmr_mp.bias_gelu(x, b).sum().backward()
    assert cpu_extension_calls == ["bias_gelu_forward", "bias_gelu_backward"]
    cpu_extension_calls.clear()
    x, b = _args((5, 16), torch.float64, "cpu", True)
    torch.ops.xlmr_mp.bias_gelu(x, b).sum().backward()
    assert cpu_extension_calls == []


def test_meta_and_compile_see_one_op():
    x = torch.empty(2, 3, 8, device="meta")
    assert torch.ops.xlmr_mp.bias_gelu(x, torch.empty(8, device="meta")).shape == (2, 3, 8)
    x, b = _args((4, 8), torch.float32, "cpu", False)
    compiled = torch.compile(lambda a, c: torch.ops.xlmr_mp.bias_gelu(a, c) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, b), torch.ops.xlmr_mp.bias_gelu(x, b) * 2, rtol=0, atol=0)


def test_the_models_bias_gelu_runs_the_op(monkeypatch):
    """kernels/ops.bias_gelu (what kernels.apply installs in FeedForward / MLMHead) runs the
    registered op on fp32 CPU tensors where the CPU kernels may run; XLMR_MP_KERNELS=reference
    keeps the model's reference."""
    from xlmr_mp.kernels import ops
    if dispatch._cpu_extension() is None:
        pytest.skip("xlmr_mp._C without the CPU kernels")
    x, b = _args((3, 8), torch.float32, "cpu", True)
    assert "xlmr_mp_bias_gelu" in ops.bias_gelu(x, b).grad_fn.name()
    monkeypatch.setenv(dispatch.ENV, "reference")
    assert ops.bias_gelu(x, b).grad_fn.name() == "GeluBackward0"
