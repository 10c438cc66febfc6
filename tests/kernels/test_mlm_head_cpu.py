"""The masked-LM head and loss as one autograd node on a CPU (kernels/mlm_head_cpu.py,
csrc/mlm_head_cpu.cpp) beside the module path it replaces (MLMHead.transform + the chunked
vocab-parallel loss of parallel/vocab.py): the loss and every gradient (hidden, dense, LayerNorm,
tied decoder and its bias), several chunks, vocabulary padding rows, eval without gradients, the
whole model against XLMR_MP_KERNELS=reference, and the dispatch rule."""
import pytest
import torch

from xlmr_mp import kernels
from xlmr_mp.ids import IGNORE_INDEX
from xlmr_mp.kernels import dispatch, mlm_head_cpu
from xlmr_mp.kernels.cpu_fast_path import blas_sgemm
from xlmr_mp.model.config import ModelConfig
from xlmr_mp.model.xlmr import MLMHead
from xlmr_mp.parallel.vocab import vocab_parallel_masked_lm_loss
from tests.support.model_case import loss_and_grads, padded_batch, tiny_model

pytestmark = pytest.mark.skipif(dispatch._cpu_extension() is None or not blas_sgemm(),
                                reason="xlmr_mp._C without the CPU kernels, a CPU without AVX2/FMA, or no sgemm_ "
                                "in libtorch_cpu")


def _case(hidden=48, vocab=203, padded=208, rows=60, masked=23, seed=0):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=1, num_heads=4, ffn_size=96,
                      max_positions=40)
    g = torch.Generator().manual_seed(seed)
    head = MLMHead(cfg, padded)
    with torch.no_grad():   # non-trivial LayerNorm affine and biases, so every gradient is tested
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 and p.numel() == hidden else 0.0))
    kernels.apply(head, "cpu")                              # transform's bias + GELU: the CPU kernel, as in training
    weight = (torch.randn(padded, hidden, generator=g) * 0.2).requires_grad_(True)
    hidden_states = torch.randn(rows, hidden, generator=g).requires_grad_(True)
    sel = torch.randperm(rows, generator=g)[:masked].sort().values
    target = torch.randint(0, vocab, (masked,), generator=g)
    target[0] = vocab - 1                                   # the last real row
    return head, weight, hidden_states, sel, target


def _node(head, hidden_states, sel, target, weight, n_real, chunk_rows):
    """The node's loss sum over rows `sel` of hidden_states against decoder rows `target`."""
    labels = torch.full((hidden_states.shape[0],), IGNORE_INDEX, dtype=torch.int64)
    labels[sel] = target
    return mlm_head_cpu.masked_loss_sum_labels(head, hidden_states, labels, 0, weight, n_real, chunk_rows)[0]


def _grads(head, weight, hidden_states, fn):
    for t in (*head.parameters(), weight, hidden_states):
        t.grad = None
    loss = fn()
    (loss * 0.37).backward()                                # a non-trivial upstream gradient
    return loss.detach(), {"hidden": hidden_states.grad, "decoder": weight.grad,
                           **{n: p.grad for n, p in head.named_parameters()}}


@pytest.mark.parametrize("chunk_rows", [1000, 7], ids=["one_chunk", "chunks_of_7"])
def test_node_equals_the_module_path_in_loss_and_every_gradient(chunk_rows):
    head, weight, hs, sel, target = _case()
    assert mlm_head_cpu.applies(head, hs, weight)
    n_real = head.vocab_size
    node = _grads(head, weight, hs, lambda: _node(head, hs, sel, target, weight, n_real,
                                                                           chunk_rows))
    ref = _grads(head, weight, hs, lambda: vocab_parallel_masked_lm_loss(
        head.transform(hs.index_select(0, sel)), weight, head.bias, target, None, 0, n_real, chunk_rows=chunk_rows))
    torch.testing.assert_close(node[0], ref[0], rtol=1e-5, atol=1e-5)
    assert node[1].keys() == ref[1].keys() and len(node[1]) == 7
    for name in node[1]:
        torch.testing.assert_close(node[1][name], ref[1][name], rtol=1e-4, atol=1e-6, msg=name)
    # padding rows of the decoder are never predicted: no gradient there; unselected rows get none
    assert node[1]["decoder"][n_real:].abs().max() == 0 and node[1]["bias"][n_real:].abs().max() == 0
    unselected = torch.ones(hs.shape[0], dtype=torch.bool)
    unselected[sel] = False
    assert node[1]["hidden"][unselected].abs().max() == 0 and node[1]["hidden"][sel].abs().max() > 0


def test_no_gradient_call_gives_the_same_loss():
    head, weight, hs, sel, target = _case(seed=3)
    with torch.no_grad():
        a = _node(head, hs, sel, target, weight, head.vocab_size, 1000)
        b = vocab_parallel_masked_lm_loss(head.transform(hs.index_select(0, sel)), weight, head.bias, target, None,
                                          0, head.vocab_size)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_whole_model_through_the_node_equals_the_reference(monkeypatch):
    model, batch = tiny_model(dropout=0.1), padded_batch()
    calls = []
    orig = mlm_head_cpu._MaskedHeadLoss.forward

    def counted(ctx, *a):
        calls.append(1)
        return orig(ctx, *a)

    monkeypatch.setattr(mlm_head_cpu._MaskedHeadLoss, "forward", staticmethod(counted))
    fused = loss_and_grads(model, batch, monkeypatch, "auto")
    assert len(calls) == 1
    ref = loss_and_grads(model, batch, monkeypatch, "reference")
    assert len(calls) == 1                                   # the reference never enters the node
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-6)
    for name in ref[1]:
        torch.testing.assert_close(fused[1][name], ref[1][name], rtol=1e-4, atol=2e-6, msg=name)


def test_dispatch_rule(monkeypatch):
    head, weight, hs, _, _ = _case()
    assert mlm_head_cpu.applies(head, hs, weight)
    assert not mlm_head_cpu.applies(head, hs.double(), weight)
    assert not mlm_head_cpu.applies(head, hs, weight.t())                      # not contiguous
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not mlm_head_cpu.applies(head, hs, weight)
    monkeypatch.setenv("XLMR_MP_KERNELS", "reference")
    assert not mlm_head_cpu.applies(head, hs, weight)


def test_a_chunk_above_the_kept_scratch_gets_its_own_buffer():
    """[masked, V] logits over csrc/blas_cpu.h's kScratchKeepFloats (4M floats) come from a buffer of
    the call's own, not the per-thread one kept between steps; the results are the same."""
    head, weight, hs, sel, target = _case(hidden=16, vocab=45003, padded=45008, rows=120, masked=100, seed=4)
    assert sel.numel() * head.vocab_size > 1 << 22
    ext = dispatch._cpu_extension()
    node = _grads(head, weight, hs, lambda: _node(head, hs, sel, target, weight,
                                                                           head.vocab_size, 1000))
    ref = _grads(head, weight, hs, lambda: vocab_parallel_masked_lm_loss(
        head.transform(hs.index_select(0, sel)), weight, head.bias, target, None, 0, head.vocab_size))
    torch.testing.assert_close(node[0], ref[0], rtol=1e-5, atol=1e-4)
    for name in node[1]:
        torch.testing.assert_close(node[1][name], ref[1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert ext.scratch_kept_floats(1) <= 1 << 22                 # the head's slot did not keep the big chunk


def test_labels_entry_finds_the_masked_rows_itself():
    """The node's entry (what kernels.apply installs as MLMHead.masked_loss_sum): labels [T] with
    IGNORE_INDEX where not masked and an offset subtracted; the C++ call gathers the rows: the same loss, count and every
    gradient as the module path on the gathered rows (unmasked rows' hidden gradient exactly 0);
    no masked row at all: loss 0, count 0, zero gradients."""
    head, weight, hs, sel, target = _case()
    labels = torch.full((hs.shape[0],), IGNORE_INDEX, dtype=torch.int64)
    labels[sel] = target + 5
    counts = []

    def node():
        loss, n = mlm_head_cpu.masked_loss_sum_labels(head, hs, labels, 5, weight, head.vocab_size, 1000)
        counts.append(n)
        return loss
    got = _grads(head, weight, hs, node)
    ref = _grads(head, weight, hs, lambda: vocab_parallel_masked_lm_loss(
        head.transform(hs.index_select(0, sel)), weight, head.bias, target, None, 0, head.vocab_size))
    assert counts[0].item() == sel.numel() and not counts[0].requires_grad
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for name in got[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=1e-4, atol=1e-6, msg=name)
    unmasked = torch.ones(hs.shape[0], dtype=torch.bool)
    unmasked[sel] = False
    assert got[1]["hidden"][unmasked].abs().max() == 0
    none = torch.full_like(labels, IGNORE_INDEX)
    empty = _grads(head, weight, hs, lambda: mlm_head_cpu.masked_loss_sum_labels(
        head, hs, none, 0, weight, head.vocab_size, 1000)[0])
    assert empty[0].item() == 0.0
    assert all(g.abs().max() == 0 for g in empty[1].values())


@pytest.mark.parametrize("chunk_rows", [1000, 7], ids=["one_chunk", "chunks_of_7"])
def test_masked_rows_in_parts_equal_the_module_path(chunk_rows):
    """At 2 threads and enough masked rows the C++ call cuts them into one part a thread (each the
    whole head single-threaded, the decoder's products through small_gemm, the parameter gradients
    of part 1 summed into part 0's): the same loss and every gradient as the module path."""
    ext = dispatch._cpu_extension()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        head, weight, hs, sel, target = _case(rows=150, masked=70, seed=3)
        assert ext.mlm_head_parts(sel.numel(), 48, head.vocab_size, 2) == 2
        assert ext.mlm_head_parts(sel.numel(), 48, head.vocab_size, 1) == 1
        assert ext.mlm_head_parts(20, 48, head.vocab_size, 2) == 1              # < 16 rows a part
        assert ext.mlm_head_parts(sel.numel(), 64, 250002, 2) == 1              # the decoder's copies too large
        got = _grads(head, weight, hs, lambda: _node(head, hs, sel, target, weight,
                                                                              head.vocab_size, chunk_rows))
        ref = _grads(head, weight, hs, lambda: vocab_parallel_masked_lm_loss(
            head.transform(hs.index_select(0, sel)), weight, head.bias, target, None, 0, head.vocab_size,
            chunk_rows=chunk_rows))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for name in got[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert got[1]["decoder"][head.vocab_size:].abs().max() == 0
