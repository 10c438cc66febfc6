"""CPU tests of xlmr_mp.kernels: each torch reference equals the plain composition it replaces,
the backward formulas the CUDA kernels implement equal autograd, the MLM shard statistics and
gradient of the fused CUDA rows (their references) combine to the full cross-entropy, and the
XLMR_MP_KERNELS dispatch. (The masked-LM loss itself: tests/parallel/test_chunked_loss.py.)"""
import math
import types

import pytest
import torch
import torch.nn.functional as F

from xlmr_mp.kernels import dispatch, mlm_xent, ops
from xlmr_mp.parallel.vocab import vocab_parallel_masked_lm_loss


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- bias + GELU

@pytest.mark.parametrize("shape", [(3, 7), (2, 5, 16), (1, 1)])
def test_bias_gelu_ref_equals_erf_composition(shape):
    g = _gen(1)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    b = torch.randn(shape[-1], generator=g, dtype=torch.float64)
    z = x + b
    expect = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    torch.testing.assert_close(ops.bias_gelu_ref(x, b), expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ops.bias_gelu(x, b), expect, rtol=1e-12, atol=1e-12)


def test_bias_gelu_backward_formula_equals_autograd():
    g = _gen(2)
    x = torch.randn(6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(6, 11, generator=g, dtype=torch.float64)
    dx, db = torch.autograd.grad(ops.bias_gelu_ref(x, b), (x, b), dy)
    fx, fb = ops.bias_gelu_backward_ref(dy, x.detach(), b.detach())
    torch.testing.assert_close(fx.double(), dx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fb.double(), db, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------- bias + dropout + add + LayerNorm

def _manual_ln(y, w, b, eps):
    mean = y.mean(-1, keepdim=True)
    var = ((y - mean) ** 2).mean(-1, keepdim=True)
    return (y - mean) / torch.sqrt(var + eps) * w + b


@pytest.mark.parametrize("with_bias", [True, False])
def test_bdaln_ref_eval_equals_manual_layernorm(with_bias):
    g = _gen(3)
    x, r = torch.randn(2, 3, 13, generator=g, dtype=torch.float64), torch.randn(2, 3, 13, generator=g, dtype=torch.float64)
    bias = torch.randn(13, generator=g, dtype=torch.float64) if with_bias else None
    w, lb = torch.randn(13, generator=g, dtype=torch.float64), torch.randn(13, generator=g, dtype=torch.float64)
    y = r + (x + bias if with_bias else x)
    out = ops.bias_dropout_add_layernorm(x, bias, r, w, lb, 0.3, False, 1e-5)
    torch.testing.assert_close(out, _manual_ln(y, w, lb, 1e-5), rtol=1e-10, atol=1e-10)


def test_bdaln_ref_training_uses_dropout_with_inverted_scaling():
    g = _gen(4)
    x, r = torch.randn(4, 32, generator=g, dtype=torch.float64), torch.randn(4, 32, generator=g, dtype=torch.float64)
    bias, w, lb = (torch.randn(32, generator=g, dtype=torch.float64) for _ in range(3))
    p = 0.25
    torch.manual_seed(123)
    out = ops.bias_dropout_add_layernorm(x, bias, r, w, lb, p, True, 1e-5)
    torch.manual_seed(123)
    keep = F.dropout(torch.ones_like(x), p=p, training=True) != 0
    assert 0 < keep.sum() < keep.numel()
    expect = _manual_ln(r + (x + bias) * keep / (1 - p), w, lb, 1e-5)
    torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_bdaln_backward_formula_equals_autograd(p):
    g = _gen(5)
    h = 19
    x = torch.randn(3, 5, h, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 5, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias, w, lb = (torch.randn(h, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    # keep: the dropout multiplier (0 or 1 / (1 - p)), as kernels/bias_dropout_add_layernorm_op.py takes it
    keep = (torch.rand(3, 5, h, generator=g) >= p).double() / (1 - p) if p > 0 else None
    y = r + ((x + bias) * keep if keep is not None else x + bias)
    out = F.layer_norm(y, (h,), w, lb, 1e-5)
    dy = torch.randn(out.shape, generator=g, dtype=torch.float64)
    dx, dr, db, dw, dlb = torch.autograd.grad(out, (x, r, bias, w, lb), dy)
    yd = y.detach().reshape(-1, h)
    mean = yd.mean(-1)
    rstd = 1 / torch.sqrt(yd.var(-1, unbiased=False) + 1e-5)
    fx, fr, fw, flb, fb = ops.bias_dropout_add_layernorm_backward_ref(dy, y.detach(), keep, w.detach(), mean, rstd)
    for got, want in ((fx, dx), (fr, dr), (fw, dw), (flb, dlb), (fb, db)):
        torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------- masked softmax

@pytest.mark.parametrize("mask_shape", [None, (2, 1, 1, 9), (1, 1, 5, 9), (2, 3, 5, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scaled_masked_softmax_ref_equals_exp_over_sum(mask_shape, dtype):
    g = _gen(6)
    s = torch.randn(2, 3, 5, 9, generator=g).to(dtype)
    mask = None
    if mask_shape is not None:
        mask = torch.rand(*mask_shape, generator=g) < 0.3
        mask[..., 0] = False  # no fully masked rows
    scale = 0.37
    z = s.double() * scale
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    if mask is not None:
        e = e.masked_fill(mask, 0.0)
    expect = e / e.sum(-1, keepdim=True)
    out = ops.scaled_masked_softmax(s, mask, scale)
    assert out.dtype == dtype
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out.double(), expect, rtol=tol, atol=tol)
    if mask is not None:
        assert torch.all(out.masked_select(mask.expand_as(out)) == 0)


def test_scaled_masked_softmax_fully_masked_row_is_nan_like_torch():
    s = torch.randn(1, 1, 2, 4)
    mask = torch.tensor([[True] * 4, [False] * 4]).view(1, 1, 2, 4)
    out = ops.scaled_masked_softmax_ref(s, mask, 1.0)
    assert torch.isnan(out[0, 0, 0]).all() and not torch.isnan(out[0, 0, 1]).any()


def test_scaled_masked_softmax_backward_formula_equals_autograd():
    g = _gen(7)
    s = torch.randn(2, 2, 3, 10, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 1, 10, generator=g) < 0.4
    mask[..., 1] = False
    y = ops.scaled_masked_softmax_ref(s, mask, 0.5)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (ds,) = torch.autograd.grad(y, (s,), dy)
    torch.testing.assert_close(ops.scaled_masked_softmax_backward_ref(dy, y.detach(), 0.5), ds,
                               rtol=1e-5, atol=1e-6)  # the forward reference runs in fp32, like the kernel


# ------------------------------------------------------- MLM shard cross-entropy

def _xent_problem(M=13, D=8, V=101, dtype=torch.float64, seed=8):
    g = _gen(seed)
    h = torch.randn(M, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype)
    t = torch.randint(0, V, (M,), generator=g)
    return h, w, b, t


def test_shard_stats_combine_to_full_cross_entropy():
    h, w, b, t = _xent_problem()
    full = F.cross_entropy(F.linear(h, w, b), t, reduction="none")
    cuts = (0, 30, 31, 101)
    stats = [mlm_xent.shard_xent_stats_ref(h, w[a:z], b[a:z], t, a) for a, z in zip(cuts, cuts[1:])]
    lse = torch.logsumexp(torch.stack([s[0] for s in stats]), dim=0)
    tl = torch.stack([s[1] for s in stats]).sum(0)
    torch.testing.assert_close((lse - tl).double(), full, rtol=1e-6, atol=1e-6)


def test_shard_xent_grad_formula_equals_autograd():
    h, w, b, t = _xent_problem()
    start, end = 20, 70
    logits = F.linear(h, w[start:end], b[start:end]).requires_grad_(True)
    lse_full = torch.logsumexp(F.linear(h, w, b), dim=-1)
    t_local = mlm_xent.local_targets(t, start, end - start)
    owned = t_local >= 0
    tl = torch.where(owned, logits.gather(1, t_local.clamp(min=0)[:, None]).squeeze(1), torch.zeros(()).double())
    # loss = lse (over the full vocabulary, a function of these logits too) - target logit
    other = torch.cat([F.linear(h, w[:start], b[:start]), F.linear(h, w[end:], b[end:])], dim=1)
    loss = torch.logsumexp(torch.cat([logits, other], dim=1), dim=-1) - tl
    g = torch.randn(h.shape[0], generator=_gen(10), dtype=torch.float64)
    (dl,) = torch.autograd.grad(loss, (logits,), g)
    got = mlm_xent.shard_xent_grad_ref(logits.detach(), t_local, lse_full.float(), g)
    torch.testing.assert_close(got, dl, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ dispatch

def test_dispatch_picks_reference_on_cpu(monkeypatch):
    x = torch.randn(2, 4)
    for m in ("auto", "reference", ""):
        monkeypatch.setenv(dispatch.ENV, m)
        for op in dispatch.OPS:
            assert dispatch.use_fused(x, op) is False


def test_switch_fused_on_cpu_raises_naming_the_switch(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "fused")
    x, b = torch.randn(2, 4), torch.randn(4)
    with pytest.raises(dispatch.KernelUnavailable, match="XLMR_MP_KERNELS"):
        dispatch.use_fused(x, "bias_gelu")
    with pytest.raises(dispatch.KernelUnavailable, match="XLMR_MP_KERNELS"):
        ops.bias_gelu(x, b)
    h, w, b, t = _xent_problem(dtype=torch.float32)
    with pytest.raises(dispatch.KernelUnavailable, match="XLMR_MP_KERNELS"):
        vocab_parallel_masked_lm_loss(h, w, b, t)


def test_switch_fused_without_extension_raises(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "fused")
    monkeypatch.setattr(dispatch, "_load_extension", lambda: (None, "No module named xlmr_mp._cuda"))
    fake_cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    with pytest.raises(dispatch.KernelUnavailable, match="not built"):
        dispatch.use_fused(fake_cuda, "scaled_masked_softmax")


def test_bad_switch_value_and_unknown_op_are_clear_errors(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "fast")
    with pytest.raises(ValueError, match="XLMR_MP_KERNELS='fast'.*auto\\|fused\\|reference"):
        dispatch.use_fused(torch.zeros(1), "bias_gelu")
    monkeypatch.setenv(dispatch.ENV, "auto")
    with pytest.raises(ValueError, match="unknown fused op"):
        dispatch.use_fused(torch.zeros(1), "flash")


def test_policy_on_a_cuda_tensor(monkeypatch):
    """The auto policy follows FASTER_ON; fused and reference force either path."""
    fake_cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    monkeypatch.setattr(dispatch, "_load_extension", lambda: (object(), None))
    monkeypatch.setattr(dispatch, "arch", lambda device: "sm_80")
    monkeypatch.setenv(dispatch.ENV, "auto")
    monkeypatch.setattr(dispatch, "FASTER_ON", {})
    assert not dispatch.use_fused(fake_cuda, "bias_gelu")
    monkeypatch.setattr(dispatch, "FASTER_ON", {"bias_gelu": frozenset({"sm_80"})})
    assert dispatch.use_fused(fake_cuda, "bias_gelu")
    assert not dispatch.use_fused(fake_cuda, "mlm_xent")
    monkeypatch.setattr(dispatch, "arch", lambda device: "sm_70")
    assert not dispatch.use_fused(fake_cuda, "bias_gelu")
    monkeypatch.setenv(dispatch.ENV, "fused")
    assert dispatch.use_fused(fake_cuda, "mlm_xent")
    monkeypatch.setenv(dispatch.ENV, "reference")
    assert not dispatch.use_fused(fake_cuda, "mlm_xent")
    monkeypatch.setattr(dispatch, "_load_extension", lambda: (None, "missing"))
    monkeypatch.setenv(dispatch.ENV, "auto")
    assert not dispatch.use_fused(fake_cuda, "bias_gelu")


def test_faster_on_table_has_no_unmeasured_entries():
    # Only a GPU measurement (bench/kernels_gpu.py, results under bench/results/) may fill FASTER_ON.
    assert all(op in dispatch.OPS for op in dispatch.FASTER_ON)


def test_public_ops_route_to_the_registered_ops_when_dispatch_says_so(monkeypatch):
    """Each public op runs its registered op (torch.ops.xlmr_mp.*, whose CUDA key is the fused kernel)
    where dispatch.use_fused says so, and the model's reference otherwise."""
    x = torch.randn(2, 3, 8, requires_grad=True)
    # fp64 (no CPU kernel): only the fused route reaches the registered op torch.ops.xlmr_mp.bias_gelu
    x64, b64 = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True), torch.randn(8, dtype=torch.float64)
    s = torch.randn(1, 2, 3, 3, requires_grad=True)

    def names():
        return (ops.bias_gelu(x64, b64).grad_fn.name(),
                ops.bias_dropout_add_layernorm(x, None, x, torch.ones(8), torch.zeros(8), 0.1, True).grad_fn.name(),
                ops.scaled_masked_softmax(s, None, 1.0).grad_fn.name())
    monkeypatch.setattr(dispatch, "use_fused", lambda t, op: True)
    fused = names()
    for op, name in zip(("bias_gelu", "bias_dropout_add_layernorm", "scaled_masked_softmax"), fused):
        assert f"xlmr_mp_{op}" in name, name
    monkeypatch.setattr(dispatch, "use_fused", lambda t, op: False)
    assert names() == ("GeluBackward0", "NativeLayerNormBackward0", "SoftmaxBackward0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_kernel_bench_exits_with_a_clear_message_without_gpu():
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, os.path.join(root, "bench", "kernels_gpu.py")], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and "needs a CUDA GPU" in p.stderr
