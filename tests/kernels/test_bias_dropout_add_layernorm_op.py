"""The registered op torch.ops.xlmr_mp.bias_dropout_add_layernorm (kernels/bias_dropout_add_layernorm_op.py):
torch.library.opcheck (schema, FakeTensor, autograd registration, AOT dispatch) on CPU (the AVX2
kernel's fp32 and the reference's fp64) with and without bias and dropout, and on CUDA with a GPU;
values and every gradient equal the model's reference (model/functional.bias_dropout_add_layernorm_ref)
under the same seed, the dropout bits being F.dropout's; dropout's statistics; the meta device and
torch.compile (fullgraph) take it as one op; the model's epilogue goes through the op where dispatch
says so."""
import pytest
import torch
import torch.nn.functional as F

from xlmr_mp.kernels import bias_dropout_add_layernorm_op as bdaln, dispatch, ops
from xlmr_mp.model.functional import bias_dropout_add_layernorm_ref

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
OP = torch.ops.xlmr_mp.bias_dropout_add_layernorm


def _args(shape, dtype, device, grad, seed=0):
    """x, bias, residual, weight, ln_bias (leaves when grad)."""
    g = torch.Generator().manual_seed(seed)
    h = shape[-1]
    ts = [torch.randn(*shape, generator=g), torch.randn(h, generator=g), torch.randn(*shape, generator=g),
          1 + 0.3 * torch.randn(h, generator=g), 0.2 * torch.randn(h, generator=g)]
    return [t.to(device=device, dtype=dtype).requires_grad_(grad) for t in ts]


def _keep(x, p, seed=3):
    torch.manual_seed(seed)
    return bdaln.dropout_keep(x.detach(), p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(4, 16, 32), (3, 37), (1, 5)], ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_opcheck(device, dtype, shape, with_bias, p):
    x, b, r, w, lb = _args(shape, dtype, device, True)
    keep = _keep(x, p) if p > 0 else None          # a fixed multiplier: the op itself draws nothing
    torch.library.opcheck(OP.default, (x, b if with_bias else None, r, keep, w, lb, 1e-5))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_without_gradients_and_backward_op(device):
    x, b, r, w, lb = _args((6, 24), torch.float32, device, False)
    keep = _keep(x, 0.2)
    torch.library.opcheck(OP.default, (x, b, r, keep, w, lb, 1e-5))
    _, y, mean, rstd = OP(x, b, r, keep, w, lb, 1e-5)
    grad = torch.randn_like(x)
    for k in (keep, None):
        torch.library.opcheck(torch.ops.xlmr_mp.bias_dropout_add_layernorm_backward.default,
                              (grad, y, k, w, mean, rstd))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("p,training", [(0.1, True), (0.0, True), (0.1, False)], ids=["train", "p0", "eval"])
def test_equals_the_reference_in_value_and_gradients(dtype, with_bias, p, training):
    """The wrapper (dropout drawn by dropout_keep) against the model's reference under the same seed:
    the LayerNorm input y has the reference's bits (F.dropout's draws and rounding), the output
    and every gradient match to rounding (fp32: the AVX2 kernel's LayerNorm; fp64 / bf16: torch's)."""
    x, b, r, w, lb = _args((4, 8, 32), dtype, "cpu", True, seed=1)
    bias = b if with_bias else None
    leaves = [x] + ([b] if with_bias else []) + [r, w, lb]
    grad = torch.randn(x.shape, dtype=dtype)
    torch.manual_seed(5)
    out = bdaln.bias_dropout_add_layernorm(x, bias, r, w, lb, p, training)
    after_op = torch.rand(1)
    torch.manual_seed(5)
    ref = bias_dropout_add_layernorm_ref(x, bias, r, w, lb, p, training)
    assert torch.equal(torch.rand(1), after_op)            # the same draws from the generator
    torch.manual_seed(5)
    a = x if bias is None else x + bias
    y_ref = r + F.dropout(a, p, training)
    torch.manual_seed(5)
    keep = bdaln.dropout_keep(x.detach(), p) if training and p > 0 else None
    _, y, mean, rstd = OP(x, bias, r, keep, w, lb, 1e-5)
    tol = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
           torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]
    if dtype == torch.float32:     # the AVX2 kernel (its multiply-add may be one FMA): the same dropped elements
        torch.testing.assert_close(y, y_ref.detach(), rtol=1e-6, atol=1e-6)
        if keep is not None:
            assert torch.equal(y[keep == 0], r.detach()[keep == 0]) and (keep == 0).any()
    else:                          # the torch reference: F.dropout's bits, torch's LayerNorm on the same y
        assert torch.equal(y, y_ref.detach())
        assert torch.equal(out, ref)
    torch.testing.assert_close(out, ref, **tol)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, leaves, grad)
    if dtype != torch.bfloat16:
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, **tol)
        return
    # bf16: the op's backward accumulates in fp32, torch's autograd partly in bf16; each gradient is
    # held to the fp64 gradient (same multiplier) no further than torch's bf16 one, with a margin
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, r64 = leaves64[0], leaves64[2 if with_bias else 1]
    b64 = leaves64[1] if with_bias else None
    w64, lb64 = leaves64[-2:]
    a64 = x64 if b64 is None else x64 + b64
    y64 = r64 + (a64 if keep is None else a64 * keep.double())
    exact = torch.autograd.grad(F.layer_norm(y64, (32,), w64, lb64, 1e-5), leaves64, grad.double())
    for g, e, t in zip(got, want, exact):
        assert (g.double() - t).abs().max() <= 1.5 * (e.double() - t).abs().max() + 1e-2


def test_only_out_carries_a_gradient():
    """y, mean and rstd are saved for the backward, not differentiable outputs (a gradient into them
    would be dropped by the backward)."""
    x, b, r, w, lb = _args((4, 16), torch.float32, "cpu", True)
    out, y, mean, rstd = OP(x, b, r, None, w, lb, 1e-5)
    assert out.requires_grad and not (y.requires_grad or mean.requires_grad or rstd.requires_grad)


def test_dropout_statistics_and_reproducibility():
    x = torch.randn(200, 256)
    for p in (0.1, 0.5):
        torch.manual_seed(0)
        k1 = bdaln.dropout_keep(x, p)
        k2 = bdaln.dropout_keep(x, p)
        torch.manual_seed(0)
        k3 = bdaln.dropout_keep(x, p)
        assert torch.equal(k1, k3) and not torch.equal(k1, k2)
        values = set(k1.unique().tolist())
        assert values == {0.0, torch.tensor(1 / (1 - p)).item()}, values
        rate = (k1 == 0).float().mean().item()
        assert abs(rate - p) < 4 * (p * (1 - p) / k1.numel()) ** 0.5 + 1e-3, rate
        assert abs(k1.mean().item() - 1.0) < 0.02                 # inverted scaling: E[keep] = 1
    assert torch.equal(bdaln.dropout_keep(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError):
        bdaln.dropout_keep(x, 1.5)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    bdaln.bias_dropout_add_layernorm(x, None, x, torch.ones(256), torch.zeros(256), 0.0, True)
    bdaln.bias_dropout_add_layernorm(x, None, x, torch.ones(256), torch.zeros(256), 0.5, False)
    assert torch.equal(torch.get_rng_state(), state)      # no dropout, no draw (as F.dropout)


def test_cpu_key_runs_the_avx2_kernel(cpu_extension_calls):
    """fp32 on a CPU with the kernel: the op's CPU keys call xlmr_mp._C (csrc/layernorm_cpu.cpp);
    fp64: the reference."""
    fp32_calls = ["bias_dropout_add_layernorm_forward", "bias_dropout_add_layernorm_backward"]
    for dtype, expect in ((torch.float32, fp32_calls), (torch.float64, [])):
        cpu_extension_calls.clear()
        x, b, r, w, lb = _args((5, 16), dtype, "cpu", True)
        bdaln.bias_dropout_add_layernorm(x, b, r, w, lb, 0.1, True).sum().backward()
        assert cpu_extension_calls == expect


def test_meta_and_compile_see_one_op():
    x = torch.empty(2, 3, 8, device="meta")
    out, y, mean, rstd = OP(x, None, x, None, torch.empty(8, device="meta"), torch.empty(8, device="meta"), 1e-5)
    assert out.shape == y.shape == (2, 3, 8) and mean.shape == rstd.shape == (6,) and mean.dtype == torch.float32
    x, b, r, w, lb = _args((4, 6, 16), torch.float32, "cpu", True)

    def f(x, b, r, w, lb):
        return bdaln.bias_dropout_add_layernorm(x, b, r, w, lb, 0.2, True) * 2
    for backend in ("eager", "aot_eager"):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend=backend)
        torch.manual_seed(1)
        got = compiled(x, b, r, w, lb)
        dgot = torch.autograd.grad(got.sum(), (x, b, r, w, lb))
        torch.manual_seed(1)
        want = f(x, b, r, w, lb)
        dwant = torch.autograd.grad(want.sum(), (x, b, r, w, lb))
        assert torch.equal(got, want), backend
        assert all(torch.equal(g, e) for g, e in zip(dgot, dwant)), backend


def test_the_models_epilogue_runs_the_op_where_dispatched(monkeypatch):
    """kernels/ops.bias_dropout_add_layernorm (what kernels.apply installs in EncoderLayer) runs the
    registered op where dispatch.use_fused says so (a CUDA tensor, the extension, the switch) and the
    model's reference otherwise (every CPU tensor: its bits unchanged)."""
    x, b, r, w, lb = _args((3, 8), torch.float32, "cpu", True)
    assert "LayerNorm" in ops.bias_dropout_add_layernorm(x, b, r, w, lb, 0.1, True).grad_fn.name()
    monkeypatch.setattr(dispatch, "use_fused", lambda t, op: op == "bias_dropout_add_layernorm")
    out = ops.bias_dropout_add_layernorm(x, b, r, w, lb, 0.1, True)
    assert "xlmr_mp_bias_dropout_add_layernorm" in out.grad_fn.name()


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(3, 17), (7, 768), (2, 12288)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_cuda_kernel_equals_the_reference(dtype, shape, p):
    """The CUDA key (csrc/cuda/bias_dropout_add_ln.cuh) against the torch reference on the same keep
    multiplier, forward and every gradient."""
    if dispatch.extension() is None:
        pytest.skip("xlmr_mp._cuda is not built")
    x, b, r, w, lb = _args(shape, dtype, "cuda", True, seed=2)
    keep = _keep(x, p) if p > 0 else None
    grad = torch.randn_like(x)
    out = OP(x, b, r, keep, w, lb, 1e-5)[0]
    ref = bdaln.forward_ref(x, b, r, keep, w, lb, 1e-5)[0]
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    for g, e in zip(torch.autograd.grad(out, (x, b, r, w, lb), grad), torch.autograd.grad(ref, (x, b, r, w, lb), grad)):
        torch.testing.assert_close(g, e, **tol)
