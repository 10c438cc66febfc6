"""The chunked vocab-parallel masked-LM loss (parallel/vocab.py: vocab_parallel_masked_lm_loss)
equals the materialised path (full logits, padding masked, vocab-parallel cross-entropy) in value
and gradient at TP=1 (several chunk sizes, fp32 and bf16 autocast) and TP=2 (gloo, two
processes), and the model's masked_loss_sum uses it."""
import pytest
import torch

from tests.support.harness import run_distributed

M, H, V, VP = 37, 16, 50, 56         # masked tokens, hidden, real vocabulary, padded vocabulary


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, H, generator=g)
    w = torch.randn(VP, H, generator=g)
    b = torch.randn(VP, generator=g)
    w[V:] = 0.0
    b[V:] = 0.0
    t = torch.randint(0, V, (M,), generator=g)
    t[:3] = V - 1                      # the last real id: next to the padding rows
    return h, w, b, t


def _materialised(h, w, b, t, group=None, start=0):
    from xlmr_mp.parallel.vocab import mask_padded_logits, parallel_lm_logits, vocab_parallel_cross_entropy
    logits = mask_padded_logits(parallel_lm_logits(h, w, b, group), V, start)
    return vocab_parallel_cross_entropy(logits, t, group, start).sum()


def _grads(fn, h, w, b, t, scale=0.37):
    h, w, b = (x.clone().requires_grad_(True) for x in (h, w, b))
    loss = fn(h, w, b, t)
    gh, gw, gb = torch.autograd.grad(loss * scale, [h, w, b])
    return loss.detach(), gh, gw, gb


@pytest.mark.parametrize("chunk", [1, 8, 37, 1024])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tp1_equals_materialised(chunk, dtype):
    from xlmr_mp.parallel.vocab import vocab_parallel_masked_lm_loss
    h, w, b, t = _inputs()
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else \
        (lambda: torch.autocast("cpu", enabled=False))
    with ctx():
        ref = _grads(_materialised, h, w, b, t)
    with ctx():
        new = _grads(lambda *a: vocab_parallel_masked_lm_loss(*a, vocab_size=V, chunk_rows=chunk), h, w, b, t)
    # fp32: summation order only; bf16: both round logits and gradients to bf16 (rel. error ~ 2^-8)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "fp32" else dict(rtol=2e-2, atol=2e-2)
    for r, n, what in zip(ref, new, ("loss", "d hidden", "d weight", "d bias")):
        torch.testing.assert_close(n.float(), r.float(), **tol, msg=lambda m: f"{what}: {m}")
    assert new[2][V:].abs().max() == 0 and new[3][V:].abs().max() == 0   # padding rows get nothing


def test_no_grad_and_bad_shapes():
    from xlmr_mp.parallel.vocab import vocab_parallel_masked_lm_loss
    h, w, b, t = _inputs()
    with torch.no_grad():
        val = vocab_parallel_masked_lm_loss(h, w, b, t, vocab_size=V, chunk_rows=5)
        assert torch.allclose(val, _materialised(h, w, b, t), rtol=1e-5)
    with pytest.raises(ValueError, match="target"):
        vocab_parallel_masked_lm_loss(h, w, b, t[:-1], vocab_size=V)
    with pytest.raises(ValueError, match="chunk_rows"):
        vocab_parallel_masked_lm_loss(h, w, b, t, vocab_size=V, chunk_rows=0)


def _tp2_body(rank, world_size, chunk):
    from xlmr_mp.parallel.vocab import vocab_parallel_masked_lm_loss
    import torch.distributed as dist
    group = dist.new_group([0, 1])
    h, w, b, t = _inputs()
    per = VP // 2
    lo = rank * per
    ws, bs = w[lo:lo + per].clone(), b[lo:lo + per].clone()
    out = {}
    for name, fn in (("ref", lambda *a: _materialised(*a, group=group, start=lo)),
                     ("new", lambda *a: vocab_parallel_masked_lm_loss(*a, tp_group=group, vocab_start=lo, vocab_size=V,
                                                                      chunk_rows=chunk))):
        out[name] = _grads(fn, h, ws, bs, t)
    return out


def test_tp2_equals_materialised_and_single():
    h, w, b, t = _inputs()
    single = _grads(_materialised, h, w, b, t)
    res = run_distributed(_tp2_body, 2, args=(7,), timeout=120)
    per = VP // 2
    for rank, r in enumerate(res):
        for a, e in zip(r["new"], r["ref"]):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
        loss, gh, gw, gb = r["new"]
        torch.testing.assert_close(loss, single[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gh, single[1], rtol=1e-5, atol=1e-5)     # TP-summed by copy_to_tp
        torch.testing.assert_close(gw, single[2][rank * per:(rank + 1) * per], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gb, single[3][rank * per:(rank + 1) * per], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [5, 1024])
def test_tp1_cpu_row_kernel_runs_and_equals_the_torch_rows(monkeypatch, chunk):
    """fp32 on an AVX2 CPU at TP=1 the softmax rows run as one kernel (csrc/xent_cpu.cpp): it ran,
    and loss and gradients equal the torch sequence (XLMR_MP_KERNELS=reference), ids outside the
    real vocabulary included (no target term, as local_targets gives)."""
    from xlmr_mp.kernels import dispatch
    from xlmr_mp.parallel.vocab import vocab_parallel_masked_lm_loss
    ext = dispatch._cpu_extension()
    if ext is None or not hasattr(ext, "xent_rows"):
        pytest.skip("xlmr_mp._C without the CPU kernels, or a CPU without AVX2/FMA")
    h, w, b, t = _inputs(1)
    t[5] = V + 2                       # a vocabulary-padding id: never predicted
    calls = []
    real = ext.xent_rows
    monkeypatch.setattr(ext, "xent_rows", lambda *a: calls.append(1) or real(*a))
    fn = lambda *a: vocab_parallel_masked_lm_loss(*a, vocab_size=V, chunk_rows=chunk)  # noqa: E731
    new = _grads(fn, h, w, b, t)
    assert len(calls) == -(-M // chunk)
    monkeypatch.setenv("XLMR_MP_KERNELS", "reference")
    ref = _grads(fn, h, w, b, t)
    assert len(calls) == -(-M // chunk)
    for r, n, what in zip(ref, new, ("loss", "d hidden", "d weight", "d bias")):
        torch.testing.assert_close(n, r, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("start", [0, 20, 60])
def test_mask_padded_logits_in_place_without_grad_same_values(start):
    """Without autograd recording the padding columns are filled in place (the same tensor comes
    back) with exactly the values of the out-of-place mask; with recording a new tensor comes back
    and the padding columns carry no gradient. start=60: a shard wholly past the real vocabulary."""
    from xlmr_mp.parallel.vocab import mask_padded_logits
    logits = torch.randn(5, VP)
    n_real = max(V - start, 0)
    expect = logits.clone()
    expect[:, n_real:] = float("-inf")
    with torch.no_grad():
        x = logits.clone()
        out = mask_padded_logits(x, V, start)
    assert out.data_ptr() == x.data_ptr()
    assert torch.equal(out, expect)
    x = logits.clone().requires_grad_(True)
    out = mask_padded_logits(x, V, start)
    assert out is not x and torch.equal(out.detach(), expect) and torch.equal(x.detach(), logits)
    finite = torch.where(torch.isinf(out), torch.zeros_like(out), out)
    finite.sum().backward()
    assert torch.equal(x.grad[:, n_real:], torch.zeros(5, VP - n_real))
    assert torch.equal(x.grad[:, :n_real], torch.ones(5, n_real))
