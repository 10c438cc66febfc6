"""The fused CPU attention kernel (csrc/attention_cpu.cpp, kernels/attention_cpu.py) beside its
reference, scaled_dot_product_attention: values and gradients, padding, odd shapes, threads, the
dispatch rule, and the whole model through either path."""
import math
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from xlmr_mp.kernels import attention_cpu
from tests.support.model_case import loss_and_grads, padded_batch, tiny_model

pytestmark = pytest.mark.skipif(attention_cpu._ext() is None, reason="xlmr_mp._C without the CPU attention "
                                "kernel, or a CPU without AVX2/FMA")


def _case(B, S, NH, D, pad, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, S, NH, 3, D, generator=g) * 2.0
    grad = torch.randn(B, S, NH * D, generator=g)
    bias = None
    if pad:
        keep = torch.ones(B, S)
        keep[0, S // 2:] = 0               # half the keys padding
        if B > 1:
            keep[1, :] = 0                 # a fully padded sequence: uniform rows, as SDPA
        bias = ((1.0 - keep) * torch.finfo(torch.float32).min)[:, None, None, :]
    return qkv, grad, bias


def _fwd_bwd(fn, qkv, grad, bias, scale):
    x = qkv.clone().requires_grad_(True)
    out = fn(x, bias, scale)
    out.backward(grad)
    return out.detach(), x.grad


# (B, S, heads, D): the tiny preset, the studies' S=128 at head dims 16-42, odd sizes everywhere
SHAPES = [(8, 64, 4, 16), (2, 128, 4, 42), (3, 61, 3, 13), (1, 7, 1, 8), (2, 33, 2, 24), (1, 1, 2, 5)]


@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_equals_sdpa_in_value_and_gradient(shape, pad):
    qkv, grad, bias = _case(*shape, pad)
    scale = 1.0 / math.sqrt(shape[3])
    out, g = _fwd_bwd(attention_cpu.attention, qkv, grad, bias, scale)
    with sdpa_kernel(SDPBackend.MATH):
        ref_out, ref_g = _fwd_bwd(attention_cpu.attention_ref, qkv, grad, bias, scale)
    assert out.shape == ref_out.shape and g.shape == ref_g.shape
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, ref_g, rtol=1e-4, atol=5e-5)
    # SDPA's default CPU (flash) kernel agrees too, except on the fully padded sequence (index 1 with
    # pad): recomputing the probabilities from its log-sum-exp there loses the padding bias in fp32,
    # so its backward takes every probability as 1 instead of 1/S (the math path and this kernel
    # keep the uniform 1/S of the forward). No real batch has a sequence without a real token.
    flash_out, flash_g = _fwd_bwd(attention_cpu.attention_ref, qkv, grad, bias, scale)
    keep = [b for b in range(shape[0]) if not (pad and b == 1)]
    torch.testing.assert_close(out, flash_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g[keep], flash_g[keep], rtol=1e-4, atol=5e-5)


def test_same_bits_at_any_thread_count():
    qkv, grad, bias = _case(4, 64, 4, 16, True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fwd_bwd(attention_cpu.attention, qkv, grad, bias, 0.25)
        torch.set_num_threads(3)
        three = _fwd_bwd(attention_cpu.attention, qkv, grad, bias, 0.25)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenMP build is Linux only (setup.py)")
def test_kernels_run_on_torchs_openmp_pool():
    """The CPU kernels are built with OpenMP and share torch's runtime (one libgomp in the process):
    with spawned std::threads instead they competed with torch's spinning OpenMP workers, and the
    tiny-preset attention at 2 threads was 2.3x slower (bench/attention_cpu.py)."""
    import glob
    import os
    from xlmr_mp import _C
    assert _C.cpu_parallel_backend() == "openmp", "xlmr_mp._C was built without -fopenmp (see setup.py)"
    bundled = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*"))
    if bundled and not any(os.path.basename(b) == "libgomp.so.1" for b in bundled):
        pytest.skip(f"this torch bundles a renamed OpenMP runtime ({bundled[0]}): xlmr_mp._C links the "
                    "system libgomp.so.1 beside it")
    # what the module links (soname libgomp.so.1) resolves to torch's copy: one such runtime in the process
    # (other wheels may carry their own renamed copies, e.g. sentencepiece.libs/libgomp-<hash>.so.1)
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if os.path.basename(line.split()[-1]).startswith("libgomp.so.1")}
    assert len(runtimes) == 1, f"more than one libgomp.so.1 in the process: {sorted(runtimes)}"
    if bundled:
        assert runtimes == {os.path.realpath(bundled[0])} or runtimes == set(bundled), (runtimes, bundled)
    # a team of 3 on a kernel call still gives the single-thread bits (the split is by range, not team)
    test_same_bits_at_any_thread_count()


def test_dispatch_rule(monkeypatch):
    monkeypatch.delenv("XLMR_MP_KERNELS", raising=False)
    qkv, _, bias = _case(2, 64, 2, 16, True)
    assert attention_cpu.applies(qkv, bias, 0.0) and attention_cpu.applies(qkv, None, 0.0)
    assert not attention_cpu.applies(qkv, bias, 0.1)                      # attention dropout: SDPA
    assert not attention_cpu.applies(qkv.bfloat16(), None, 0.0)           # fp32 only
    long = torch.zeros(1, attention_cpu.MAX_SEQ + 1, 2, 3, 16)
    assert not attention_cpu.applies(long, None, 0.0)                     # long sequences: SDPA
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not attention_cpu.applies(qkv, bias, 0.0)
    monkeypatch.setenv("XLMR_MP_KERNELS", "reference")
    assert not attention_cpu.applies(qkv, bias, 0.0)
    monkeypatch.setenv("XLMR_MP_KERNELS", "fused")
    assert attention_cpu.applies(long, None, 0.0)                         # fused: any length


def test_bad_shapes_are_named():
    from xlmr_mp import _C
    qkv = torch.zeros(2, 8, 2, 3, 4)
    out, probs = torch.zeros(2, 8, 8), torch.zeros(2, 2, 8, 8)
    with pytest.raises(ValueError, match=r"qkv must be \[B, S, heads, 3, D\]"):
        _C.attention_forward(torch.zeros(2, 8, 24).numpy(), None, 1.0, out.numpy(), probs.numpy())
    with pytest.raises(ValueError, match="probs has the wrong size"):
        _C.attention_forward(qkv.numpy(), None, 1.0, out.numpy(), torch.zeros(2, 2, 8).numpy())
    with pytest.raises(ValueError, match=r"key_bias \(\[B, S\]\) has the wrong size"):
        _C.attention_forward(qkv.numpy(), torch.zeros(2, 7).numpy(), 1.0, out.numpy(), probs.numpy())


def test_model_equals_the_sdpa_path_and_uses_the_kernel(monkeypatch):
    """The whole model (hidden dropout on, padding in the batch) through the kernel and through SDPA
    (XLMR_MP_KERNELS=reference): same loss and gradients; the kernel path really ran. The layers
    take their module path (as at TP > 1): the one-node layer (encoder_layer_cpu) has its own test."""
    from xlmr_mp.kernels import encoder_layer_cpu
    monkeypatch.setattr(encoder_layer_cpu, "_layer_applies", lambda *a: False)   # what applies and stack_applies ask
    model, batch = tiny_model(), padded_batch()
    calls = []
    real = attention_cpu._Attention.apply
    monkeypatch.setattr(attention_cpu._Attention, "apply", lambda *a: calls.append(1) or real(*a))
    loss_k, grads_k = loss_and_grads(model, batch, monkeypatch, "auto")
    assert len(calls) == 2                        # one call per layer
    loss_r, grads_r = loss_and_grads(model, batch, monkeypatch, "reference")
    assert len(calls) == 2
    torch.testing.assert_close(loss_k, loss_r, rtol=1e-6, atol=1e-6)
    for n in grads_r:
        torch.testing.assert_close(grads_k[n], grads_r[n], rtol=1e-4, atol=1e-6, msg=n)
