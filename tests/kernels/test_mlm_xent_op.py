"""The masked-LM rows as registered ops (kernels/mlm_xent_op.py): torch.ops.xlmr_mp.mlm_xent_stats,
the in-place torch.ops.xlmr_mp.mlm_xent_grad_ and mlm_xent_rows_ pass torch.library.opcheck on CPU
(the references' keys; the AVX2 kernel's for mlm_xent_rows_ in fp32) and on CUDA with a GPU
(csrc/cuda/mlm_xent.cuh); their values equal the plain composition (logsumexp, the target logit,
softmax - onehot) and the stats' gradient equals autograd's; the meta device and torch.compile
(fullgraph) take them as ops; the one masked-LM loss (parallel/vocab.py) runs them where dispatch
says so."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from xlmr_mp.kernels import dispatch, mlm_xent_op

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
STATS, GRAD = torch.ops.xlmr_mp.mlm_xent_stats, torch.ops.xlmr_mp.mlm_xent_grad_


def _case(m, v, dtype, device, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(m, v, generator=g) * 3).to(device=device, dtype=dtype).requires_grad_(grad)
    t = torch.randint(-1, v, (m,), generator=g).to(device)        # -1: the target is in another shard
    return logits, t


SHAPES = [(1, 1), (6, 11), (17, 1001)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("m,v", SHAPES, ids=str)
def test_opcheck(device, dtype, m, v):
    logits, t = _case(m, v, dtype, device, grad=True)
    torch.library.opcheck(STATS.default, (logits, t))
    lse, _ = STATS(logits.detach(), t)
    scale = torch.rand(m, device=device)
    torch.library.opcheck(GRAD.default, (logits.detach().clone(), t, lse, scale))


@pytest.mark.parametrize("m,v", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_equal_the_composition(m, v, dtype):
    logits, t = _case(m, v, dtype, "cpu", grad=True, seed=1)
    lse, tl = STATS(logits, t)
    lf = logits.float()
    inside = t >= 0
    want_tl = torch.where(inside, lf.gather(1, t.clamp(min=0)[:, None]).squeeze(1), torch.zeros(m))
    assert lse.dtype == tl.dtype == torch.float32
    torch.testing.assert_close(lse, torch.logsumexp(lf, -1), rtol=1e-6, atol=1e-6)
    assert torch.equal(tl, want_tl)
    g_lse, g_tl = torch.randn(m), torch.randn(m)                 # the stats' gradient: autograd's
    (got,) = torch.autograd.grad((lse * g_lse + tl * g_tl).sum(), logits)
    (want,) = torch.autograd.grad((torch.logsumexp(lf, -1) * g_lse + want_tl * g_tl).sum(), logits)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)
    scale = torch.rand(m)
    p = logits.detach().clone()
    assert mlm_xent_op.mlm_xent_grad_(p, t, lse.detach(), scale) is p          # in place
    expect = torch.softmax(lf.detach(), -1)
    expect[inside.nonzero().squeeze(1), t[inside]] -= 1.0
    torch.testing.assert_close(p, (expect * scale[:, None]).to(dtype), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("m,v", SHAPES, ids=str)
def test_rows_opcheck_and_composition(dtype, m, v):
    """mlm_xent_rows_: the loss logsumexp(row) - row[target] (no target term where the target is
    outside [0, V), after the max shift) and the rows softmax - onehot, in place."""
    logits, t = _case(m, v, dtype, "cpu", seed=3)
    t[0] = v                                                      # outside the vocabulary
    torch.library.opcheck(torch.ops.xlmr_mp.mlm_xent_rows_.default, (logits.clone(), t))
    p = logits.clone()
    loss = torch.ops.xlmr_mp.mlm_xent_rows_(p, t)
    lf = logits.double()
    inside = (t >= 0) & (t < v)
    tl = torch.where(inside, lf.gather(1, t.clamp(0, v - 1)[:, None]).squeeze(1), lf.amax(-1))
    want = torch.softmax(lf, -1)
    want[inside.nonzero().squeeze(1), t[inside]] -= 1.0
    assert loss.dtype == torch.float32 and p.dtype == dtype                 # computed in fp32
    torch.testing.assert_close(loss.double(), torch.logsumexp(lf, -1) - tl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.double(), want, rtol=1e-5, atol=1e-6)


def test_rows_cpu_key_runs_the_avx2_kernel(cpu_extension_calls):
    logits, t = _case(9, 40, torch.float32, "cpu")
    torch.ops.xlmr_mp.mlm_xent_rows_(logits, t)
    assert cpu_extension_calls == ["xent_rows"]
    cpu_extension_calls.clear()
    logits, t = _case(9, 40, torch.float64, "cpu")
    torch.ops.xlmr_mp.mlm_xent_rows_(logits, t)
    assert cpu_extension_calls == []


def test_meta_and_compile_see_the_ops():
    lse, tl = STATS(torch.empty(5, 7, device="meta"), torch.empty(5, dtype=torch.long, device="meta"))
    assert lse.shape == tl.shape == (5,) and lse.dtype == torch.float32
    logits, t = _case(6, 11, torch.float32, "cpu")

    def rows(lg, t):
        lse, tl = STATS(lg, t)
        mlm_xent_op.mlm_xent_grad_(lg, t, lse, torch.ones_like(lse))
        return (lse - tl).sum(), lg
    def whole(lg, t):
        return torch.ops.xlmr_mp.mlm_xent_rows_(lg, t).sum(), lg
    assert torch.ops.xlmr_mp.mlm_xent_rows_(torch.empty(5, 7, device="meta"),
                                            torch.empty(5, dtype=torch.long, device="meta")).shape == (5,)
    for fn in (rows, whole):
        for backend in ("eager", "aot_eager"):
            torch._dynamo.reset()
            got = torch.compile(fn, fullgraph=True, backend=backend)(logits.clone(), t)
            want = fn(logits.clone(), t)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (fn.__name__, backend)


def test_the_masked_lm_loss_runs_the_ops_where_dispatched(monkeypatch):
    """parallel/vocab.py's one loss with the fused rows dispatched (on CPU tensors here: the ops'
    reference keys) equals its torch rows in value and gradients, and calls both ops."""
    from xlmr_mp.parallel.vocab import vocab_parallel_masked_lm_loss
    g = torch.Generator().manual_seed(4)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True)
    target = torch.randint(0, 45, (37,), generator=g)
    monkeypatch.setenv(dispatch.ENV, "reference")
    ref = vocab_parallel_masked_lm_loss(h, w, b, target, vocab_size=45, chunk_rows=16)
    rgrads = torch.autograd.grad(ref, (h, w, b))
    calls = set()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.add(str(func))
            return func(*args, **(kwargs or {}))
    monkeypatch.setattr(dispatch, "use_fused", lambda t, op: op == "mlm_xent")
    with Ops():
        got = vocab_parallel_masked_lm_loss(h, w, b, target, vocab_size=45, chunk_rows=16)
    grads = torch.autograd.grad(got, (h, w, b))
    assert {"xlmr_mp.mlm_xent_stats.default", "xlmr_mp.mlm_xent_grad_.default"} <= calls, calls
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    for a, e in zip(grads, rgrads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("m,v", [(3, 7), (200, 31251), (64, 250002)], ids=str)
def test_cuda_kernels_equal_the_references(dtype, m, v):
    if dispatch.extension() is None:
        pytest.skip("xlmr_mp._cuda is not built")
    logits, t = _case(m, v, dtype, "cuda", seed=2)
    lse, tl = STATS(logits, t)
    want_lse, want_tl = mlm_xent_op.xent_stats_ref(logits, t)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)
    assert torch.equal(tl, want_tl)
    scale = torch.rand(m, device="cuda")
    p = logits.clone()
    mlm_xent_op.mlm_xent_grad_(p, t, lse, scale)
    want = mlm_xent_op.shard_xent_grad_ref(logits, t, want_lse, scale)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(p, want, **tol)
