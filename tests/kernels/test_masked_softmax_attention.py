"""The attention path for GPUs without a flash kernel (kernels/ops.py masked_softmax_attention:
explicit scores + scaled_masked_softmax) equals scaled_dot_product_attention in value and gradient
(torch reference of the softmax on CPU; the fused kernel's own test is tests/kernels/test_kernels_gpu.py),
and the encoder takes it only for half-precision CUDA tensors where it is dispatched."""
import math
import types

import torch
import torch.nn.functional as F

from xlmr_mp.kernels import dispatch, ops
from xlmr_mp.model.encoder import attention_bias


def test_equals_sdpa_values_and_grads():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g, requires_grad=True) for _ in range(3))
    am = torch.ones(2, 16, dtype=torch.long)
    am[1, 10:] = 0
    bias = attention_bias(am, torch.float32)
    scale = 1.0 / math.sqrt(8)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    new = ops.masked_softmax_attention(q, k, v, bias, scale)
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-6)
    up = torch.randn(ref.shape, generator=g)
    gr = torch.autograd.grad(ref, (q, k, v), up)
    gn = torch.autograd.grad(new, (q, k, v), up)
    for a, e in zip(gn, gr):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def _cuda_query(dtype):
    """A stand-in CUDA query: what the rule reads of q (is_cuda, dtype, device)."""
    return types.SimpleNamespace(is_cuda=True, dtype=dtype, device=torch.device("cuda", 0))


def test_dispatch_only_half_precision_cuda(monkeypatch):
    """The rule on CPU tensors (never) and, with a stand-in CUDA query, a device of capability 7.0 or
    8.0 and the extension present, on CUDA: half precision where SDPA has no flash kernel (below 8.0)
    and the fused softmax is dispatched (FASTER_ON, or forced by XLMR_MP_KERNELS=fused)."""
    q = torch.randn(1, 1, 4, 8)
    assert not ops.attention_uses_masked_softmax(q)
    assert not ops.attention_uses_masked_softmax(q.half())
    capability = [(7, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(dispatch, "_load_extension", lambda: (object(), None))
    monkeypatch.setattr(dispatch, "FASTER_ON", {"scaled_masked_softmax": frozenset({"sm_70"})})
    monkeypatch.setenv(dispatch.ENV, "auto")
    assert ops.attention_uses_masked_softmax(_cuda_query(torch.float16))       # V100 fp16
    assert ops.attention_uses_masked_softmax(_cuda_query(torch.bfloat16))
    assert not ops.attention_uses_masked_softmax(_cuda_query(torch.float32))   # fp32: SDPA
    monkeypatch.setenv(dispatch.ENV, "reference")
    assert not ops.attention_uses_masked_softmax(_cuda_query(torch.float16))
    monkeypatch.setenv(dispatch.ENV, "auto")
    monkeypatch.setattr(dispatch, "FASTER_ON", {})                             # not measured faster: SDPA
    assert not ops.attention_uses_masked_softmax(_cuda_query(torch.float16))
    monkeypatch.setenv(dispatch.ENV, "fused")                                  # forced
    assert ops.attention_uses_masked_softmax(_cuda_query(torch.float16))
    capability[0] = (8, 0)                                                     # SDPA has a flash kernel
    assert ops.attention_uses_masked_softmax(_cuda_query(torch.float16))       # ... unless forced
    monkeypatch.setenv(dispatch.ENV, "auto")
    monkeypatch.setattr(dispatch, "FASTER_ON", {"scaled_masked_softmax": frozenset({"sm_70", "sm_80"})})
    assert not ops.attention_uses_masked_softmax(_cuda_query(torch.float16))
    capability[0] = (7, 0)
    monkeypatch.setattr(dispatch, "_load_extension", lambda: (None, "not built"))
    assert not ops.attention_uses_masked_softmax(_cuda_query(torch.float16))
