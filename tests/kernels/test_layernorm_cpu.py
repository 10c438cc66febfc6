"""The bias-dropout-add-LayerNorm CPU kernel (csrc/layernorm_cpu.cpp, run inside the one-node
encoder layer) beside its torch reference ops.bias_dropout_add_layernorm_ref and autograd: values,
every gradient, with and without bias and dropout mask, rows not a multiple of the 4 in flight,
widths not a multiple of 8 (masked tails), and the same bits at 1 and 2 threads."""
import pytest
import torch

from xlmr_mp.kernels import dispatch, ops

_C = dispatch._cpu_extension()
pytestmark = pytest.mark.skipif(_C is None, reason="xlmr_mp._C without the CPU kernels, or a CPU without AVX2/FMA")

SHAPES = [(512, 64), (7, 64), (33, 36), (5, 3), (130, 1000)]


def _case(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, res, grad = (torch.randn(rows, cols, generator=g) for _ in range(3))
    bias, w, b = torch.randn(cols, generator=g), torch.rand(cols, generator=g) + 0.5, torch.randn(cols, generator=g)
    keep = (torch.rand(rows, cols, generator=g) > 0.1).float() / 0.9
    return x, res, grad, bias, w, b, keep


def _kernel(x, bias, res, keep, w, b, grad, threads=1, want_dbias=True):
    rows, cols = x.shape
    out, y, mean, rstd = torch.empty_like(x), torch.empty_like(x), torch.empty(rows), torch.empty(rows)
    n = lambda t: None if t is None else t.numpy()  # noqa: E731
    _C.bias_dropout_add_layernorm_forward(x.numpy(), n(bias), res.numpy(), n(keep), w.numpy(), b.numpy(), 1e-5,
                                          out.numpy(), y.numpy(), mean.numpy(), rstd.numpy(), threads)
    dres, dx, dw, db = torch.empty_like(x), torch.empty_like(x), torch.empty(cols), torch.empty(cols)
    dbias = torch.empty(cols) if want_dbias else None
    _C.bias_dropout_add_layernorm_backward(grad.numpy(), y.numpy(), n(keep), w.numpy(), mean.numpy(), rstd.numpy(),
                                           dres.numpy(), dx.numpy(), dw.numpy(), db.numpy(), n(dbias), threads)
    return out, dres, dx, dw, db, dbias


@pytest.mark.parametrize("masked", [False, True], ids=["nodrop", "drop"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_equals_reference_in_value_and_gradient(shape, with_bias, masked):
    x, res, grad, bias, w, b, keep = _case(*shape)
    bias = bias if with_bias else None
    keep = keep if masked else None
    out, dres, dx, dw, db, dbias = _kernel(x, bias, res, keep, w, b, grad)
    leaves = [t.clone().requires_grad_(True) for t in (x, res, w, b)] + ([bias.clone().requires_grad_(True)] if with_bias else [])
    xr, rr, wr, br = leaves[:4]
    br_bias = leaves[4] if with_bias else None
    if keep is None:
        ref = ops.bias_dropout_add_layernorm_ref(xr, br_bias, rr, wr, br, 0.0, False)
    else:                                            # dropout as the reference applies it, with this mask
        branch = xr if br_bias is None else xr + br_bias
        ref = torch.nn.functional.layer_norm(rr + branch * keep, (shape[1],), wr, br, 1e-5)
    ref.backward(grad)
    tol = dict(rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out, ref.detach(), **tol)
    torch.testing.assert_close(dres, rr.grad, **tol)
    torch.testing.assert_close(dx, xr.grad if keep is None else rr.grad * keep, **tol)
    torch.testing.assert_close(dw, wr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db, br.grad, rtol=1e-4, atol=1e-4)
    if with_bias:
        torch.testing.assert_close(dbias, br_bias.grad if keep is None else dx.sum(0), rtol=1e-4, atol=1e-4)


def test_same_bits_at_any_thread_count_and_dbias_optional():
    x, res, grad, bias, w, b, keep = _case(300, 72, seed=3)
    one = _kernel(x, bias, res, keep, w, b, grad, threads=1)
    two = _kernel(x, bias, res, keep, w, b, grad, threads=2)
    for a, c in zip(one, two):
        assert torch.equal(a, c)
    without = _kernel(x, bias, res, keep, w, b, grad, threads=2, want_dbias=False)
    for a, c in zip(one[:5], without[:5]):
        assert torch.equal(a, c)


def test_outputs_must_be_float32_arrays():
    x, res, grad, bias, w, b, keep = _case(8, 16)
    out, y, mean, rstd = torch.empty_like(x), torch.empty_like(x), torch.empty(8), torch.empty(8)
    _C.bias_dropout_add_layernorm_forward(x.numpy(), None, res.numpy(), None, w.numpy(), b.numpy(), 1e-5,
                                          out.numpy(), y.numpy(), mean.numpy(), rstd.numpy(), 1)
    with pytest.raises(ValueError, match=r"dx \(like y\) must be a writeable float32"):
        _C.bias_dropout_add_layernorm_backward(grad.numpy(), y.numpy(), None, w.numpy(), mean.numpy(), rstd.numpy(),
                                               torch.empty_like(x).numpy(), torch.empty_like(x).double().numpy(),
                                               torch.empty(16).numpy(), torch.empty(16).numpy(), None, 1)
