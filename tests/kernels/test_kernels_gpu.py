"""GPU tests of the fused CUDA kernels (xlmr_mp._cuda) against float64 references, values and
gradients, on random shapes including odd sizes: each kernel's error is at most twice that of the
torch low-precision path (plus a tiny floor), as flash-attention tests its kernels.
Skipped without CUDA; with CUDA the extension must be built (pip install --no-build-isolation -e .)."""
import math

import pytest
import torch
import torch.nn.functional as F

from xlmr_mp.kernels import dispatch, mlm_xent, ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def ext():
    e = dispatch.extension()
    assert e is not None, ("CUDA is available but xlmr_mp._cuda is not built: "
                           "pip install --no-build-isolation -e . with a CUDA torch and nvcc")
    return e


@pytest.fixture(autouse=True)
def _force_fused(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "fused")


def _err(x, ref):
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_within(name, fused, torch_lowp, ref):
    """Fused error vs ref at most 2x the torch low-precision path's, plus a floor of 1e-6 * scale."""
    e_f, e_t = _err(fused, ref), _err(torch_lowp, ref)
    floor = 1e-6 * max(1.0, ref.double().abs().max().item() if ref.numel() else 1.0)
    assert math.isfinite(e_f) and e_f <= 2 * e_t + floor, \
        f"{name}: fused error {e_f:.3e} > 2 x torch low-precision error {e_t:.3e}"


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _grads(out, inputs, dy):
    return torch.autograd.grad(out, inputs, dy, allow_unused=True)


# ---------------------------------------------------------------- bias + GELU

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (33, 1000), (2, 5, 1023), (64, 3072), (128, 4096)])
def test_bias_gelu(ext, dtype, shape):
    from xlmr_mp.kernels import bias_gelu_op  # noqa: F401  (registers torch.ops.xlmr_mp.bias_gelu)
    g = torch.Generator(device="cuda").manual_seed(hash(shape) % 2**31)
    x = torch.randn(shape, device="cuda", generator=g) * 2
    b = torch.randn(shape[-1], device="cuda", generator=g)
    dy = torch.randn(shape, device="cuda", generator=g)
    x64, b64 = _leaf(x.double()), _leaf(b.double())
    ref = F.gelu(x64 + b64)
    rdx, rdb = _grads(ref, (x64, b64), dy.double())
    xl, bl = _leaf(x.to(dtype)), _leaf(b.to(dtype))
    tl = F.gelu(xl + bl)
    tdx, tdb = _grads(tl, (xl, bl), dy.to(dtype))
    xf, bf = _leaf(x.to(dtype)), _leaf(b.to(dtype))
    fo = torch.ops.xlmr_mp.bias_gelu(xf, bf)
    assert fo.dtype == dtype
    fdx, fdb = _grads(fo, (xf, bf), dy.to(dtype))
    assert_within("bias_gelu out", fo, tl, ref)
    assert_within("bias_gelu dx", fdx, tdx, rdx)
    assert_within("bias_gelu dbias", fdb, tdb, rdb)


def test_ops_bias_gelu_dispatches_to_kernel(ext):
    x = torch.randn(4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    b = torch.randn(64, device="cuda", dtype=torch.float16, requires_grad=True)
    out = ops.bias_gelu(x, b)
    assert "xlmr_mp_bias_gelu" in out.grad_fn.name()      # the registered op's CUDA key
    torch.testing.assert_close(out, ops.bias_gelu_ref(x, b), rtol=2e-3, atol=2e-3)


# ---------------------------------------------------- bias + dropout + add + LayerNorm

def _bdaln_inputs(shape, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = shape[-1]
    return dict(x=torch.randn(shape, device="cuda", generator=g),
                b=torch.randn(h, device="cuda", generator=g) * 0.1,
                r=torch.randn(shape, device="cuda", generator=g) * 3 + 1,
                w=1 + 0.1 * torch.randn(h, device="cuda", generator=g),
                lb=0.1 * torch.randn(h, device="cuda", generator=g),
                dy=torch.randn(shape, device="cuda", generator=g))


def _bdaln_composition(x, b, r, w, lb, keep, eps=1e-5):
    """LayerNorm(r + keep * (x + b)), keep the dropout multiplier (or None), in the inputs' dtype."""
    a = x + b if b is not None else x
    if keep is not None:
        a = a * keep
    return F.layer_norm(r + a, (x.shape[-1],), w, lb, eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (3, 17), (7, 768), (5, 3, 1023), (64, 1024), (9, 4096), (2, 12288)])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_dropout_add_layernorm(ext, dtype, shape, p, with_bias):
    """The kernel (xlmr_mp._cuda.bdaln_fwd / bdaln_bwd, the registered op's CUDA key) on the keep
    multiplier that kernels/bias_dropout_add_layernorm_op.dropout_keep draws."""
    from xlmr_mp.kernels.bias_dropout_add_layernorm_op import dropout_keep
    d = _bdaln_inputs(shape, seed=len(shape) * 1000 + shape[-1])
    bias = d["b"].to(dtype) if with_bias else None
    keep = None
    if p > 0:
        torch.manual_seed(shape[-1])
        keep = dropout_keep(d["x"].to(dtype), p)
        rate = (keep != 0).float().mean().item()
        assert abs(rate - (1 - p)) < 0.05 + 3 / math.sqrt(keep.numel()), rate
    out, y, mean, rstd = ext.bdaln_fwd(d["x"].to(dtype), bias, d["r"].to(dtype), keep, d["w"].to(dtype),
                                       d["lb"].to(dtype), 1e-5)
    leaves64 = [_leaf(d[k].double()) for k in ("x", "b", "r", "w", "lb")]
    keep64 = None if keep is None else keep.double()      # the same multiplier, exactly
    ref = _bdaln_composition(*leaves64[:1], leaves64[1] if with_bias else None, *leaves64[2:], keep64)
    rgrads = _grads(ref, leaves64, d["dy"].double())
    leaves_lp = [_leaf(d[k].to(dtype)) for k in ("x", "b", "r", "w", "lb")]
    tl = _bdaln_composition(*leaves_lp[:1], leaves_lp[1] if with_bias else None, *leaves_lp[2:], keep)
    tgrads = _grads(tl, leaves_lp, d["dy"].to(dtype))
    assert_within("bdaln out", out, tl, ref)
    dx, dres, dw, dlb, db = ext.bdaln_bwd(d["dy"].to(dtype).contiguous(), y, keep, d["w"].to(dtype), mean, rstd)
    names = ("dx", "dbias", "dresidual", "dweight", "dln_bias")
    for name, f, t, r in zip(names, (dx, db, dres, dw, dlb), tgrads, rgrads):
        if name == "dbias" and not with_bias:
            continue
        assert_within(f"bdaln {name}", f, t, r)


def test_bdaln_op_autograd_and_dropout_rng(ext):
    """The registered op through its wrapper: dropout reproducible from torch.manual_seed, a new draw
    otherwise; eval equals the reference; gradients flow; the model's epilogue runs the op."""
    from xlmr_mp.kernels.bias_dropout_add_layernorm_op import bias_dropout_add_layernorm
    d = _bdaln_inputs((16, 768), seed=5)
    args = [d[k].half() for k in ("x", "b", "r", "w", "lb")]
    torch.manual_seed(0)
    a = bias_dropout_add_layernorm(*args, 0.1, True)
    b = bias_dropout_add_layernorm(*args, 0.1, True)
    torch.manual_seed(0)
    c = bias_dropout_add_layernorm(*args, 0.1, True)
    assert torch.equal(a, c) and not torch.equal(a, b)
    e = bias_dropout_add_layernorm(*args, 0.1, False)
    torch.testing.assert_close(e, ops.bias_dropout_add_layernorm_ref(*args, 0.1, False), rtol=1e-2, atol=1e-2)
    leaves = [_leaf(t) for t in args]
    out = ops.bias_dropout_add_layernorm(*leaves, 0.1, True)
    assert "xlmr_mp_bias_dropout_add_layernorm" in out.grad_fn.name()
    grads = _grads(out, leaves, d["dy"].half())
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)


# ------------------------------------------------------------- masked softmax

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (2, 4, 33, 33), (2, 12, 128, 128),
                                   (1, 16, 64, 512), (1, 2, 9, 1000), (1, 2, 4, 2048), (1, 1, 3, 3001)])
@pytest.mark.parametrize("mask_kind", [None, "padding", "full"])
def test_scaled_masked_softmax(ext, dtype, shape, mask_kind):
    B, H, Sq, Sk = shape
    g = torch.Generator(device="cuda").manual_seed(Sk * 7 + Sq)
    s = torch.randn(shape, device="cuda", generator=g) * 4
    dy = torch.randn(shape, device="cuda", generator=g)
    mask = None
    if mask_kind == "padding":
        lengths = torch.randint(1, Sk + 1, (B,), device="cuda", generator=g)
        mask = (torch.arange(Sk, device="cuda")[None, :] >= lengths[:, None]).view(B, 1, 1, Sk)
    elif mask_kind == "full":
        mask = torch.rand(shape, device="cuda", generator=g) < 0.3
        mask[..., 0] = False
    scale = 1 / math.sqrt(64)
    s64 = _leaf(s.double())
    ref = ops.scaled_masked_softmax_ref(s64, mask, scale)
    (rds,) = _grads(ref, (s64,), dy.double())
    sl = _leaf(s.to(dtype))
    tl = ops.scaled_masked_softmax_ref(sl, mask, scale)
    (tds,) = _grads(tl, (sl,), dy.to(dtype))
    sf = _leaf(s.to(dtype))
    fo = torch.ops.xlmr_mp.scaled_masked_softmax(sf, mask, scale)      # the registered op's CUDA key
    (fds,) = _grads(fo, (sf,), dy.to(dtype))
    assert_within("softmax out", fo, tl, ref)
    assert_within("softmax dscores", fds, tds, rds)
    if mask is not None:
        assert torch.all(fo.masked_select(mask.expand(shape)) == 0)


# ------------------------------------------------------- MLM shard cross-entropy

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,V", [(1, 1), (3, 7), (17, 1001), (200, 31251), (64, 250002), (1000, 8000)])
def test_mlm_xent_stats_and_inplace_grad(ext, dtype, M, V):
    from xlmr_mp.kernels import mlm_xent_op as fused       # the registered ops' entry points
    g = torch.Generator(device="cuda").manual_seed(M * 31 + V)
    logits32 = torch.randn(M, V, device="cuda", generator=g) * 3
    t_local = torch.randint(-1, V, (M,), device="cuda", generator=g)  # -1: target in another shard
    gscale = torch.rand(M, device="cuda", generator=g)
    logits = logits32.to(dtype)
    l64 = logits.double()  # the kernel's input is the rounded logits
    ref_lse = torch.logsumexp(l64, dim=-1)
    owned = t_local >= 0
    ref_tl = torch.where(owned, l64.gather(1, t_local.clamp(min=0)[:, None]).squeeze(1), torch.zeros((), device="cuda", dtype=torch.float64))
    lse, tl = fused.mlm_xent_stats(logits, t_local)
    assert lse.dtype == torch.float32 and tl.dtype == torch.float32
    assert_within("xent lse", lse, torch.logsumexp(logits, dim=-1), ref_lse)
    torch.testing.assert_close(tl.double(), ref_tl, rtol=0, atol=0)
    ref_grad = mlm_xent.shard_xent_grad_ref(l64, t_local, ref_lse, gscale.double())
    torch_grad = mlm_xent.shard_xent_grad_ref(logits, t_local, torch.logsumexp(logits, -1).float(), gscale)
    ptr = logits.data_ptr()
    out = fused.mlm_xent_grad_(logits, t_local, lse, gscale)
    assert out.data_ptr() == ptr  # written in place
    assert_within("xent grad", logits, torch_grad, ref_grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_lm_loss_fused_rows_match_the_torch_rows(ext, dtype, monkeypatch):
    """The one masked-LM loss (parallel/vocab.py) with the fused CUDA rows and with its torch rows,
    in value and every gradient, against float64 (several chunks of rows)."""
    from xlmr_mp.parallel.vocab import vocab_parallel_masked_lm_loss
    g = torch.Generator(device="cuda").manual_seed(3)
    M, D, V = 97, 64, 5003
    h = torch.randn(M, D, device="cuda", generator=g).to(dtype)
    w = (torch.randn(V, D, device="cuda", generator=g) * 0.1).to(dtype)
    b = (torch.randn(V, device="cuda", generator=g) * 0.1).to(dtype)
    t = torch.randint(0, V, (M,), device="cuda", generator=g)
    up = torch.tensor(0.37, device="cuda")
    outs = {}
    for mode in ("fused", "reference"):
        monkeypatch.setenv(dispatch.ENV, mode)
        leaves = [_leaf(x) for x in (h, w, b)]
        loss = vocab_parallel_masked_lm_loss(*leaves, t, chunk_rows=32)
        outs[mode] = (loss, *_grads(loss, leaves, up))
    leaves64 = [_leaf(x.double()) for x in (h, w, b)]
    ref = F.cross_entropy(F.linear(*leaves64), t, reduction="sum")
    rgrads = _grads(ref, leaves64, up.double())
    leaves_lp = [_leaf(x) for x in (h, w, b)]  # the torch low-precision path: full lowp logits
    tl = F.cross_entropy(F.linear(*leaves_lp), t, reduction="sum")
    tgrads = _grads(tl, leaves_lp, up.to(dtype))
    for i, name in enumerate(("loss", "dhidden", "dweight", "dbias")):
        r, tp = (ref, tl) if i == 0 else (rgrads[i - 1], tgrads[i - 1])
        for mode in ("fused", "reference"):
            assert_within(f"masked-LM loss {mode} {name}", outs[mode][i], tp, r)
