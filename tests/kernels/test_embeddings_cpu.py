"""XLM-R's input embeddings as one autograd node on a CPU (kernels/embeddings_cpu.py,
csrc/embeddings_cpu.cpp) beside the Embeddings module path they replace: output and every gradient
(word and position tables, LayerNorm) with dropout and padding, the padding rows' zero gradient,
a bad id's error, and the dispatch rule."""
import pytest
import torch

from xlmr_mp import kernels
from xlmr_mp.kernels import dispatch, embeddings_cpu
from xlmr_mp.model.config import ModelConfig
from xlmr_mp.model.xlmr import Embeddings

pytestmark = pytest.mark.skipif(dispatch._cpu_extension() is None,
                                reason="xlmr_mp._C without the CPU kernels, or a CPU without AVX2/FMA")


def _emb(dropout=0.1, hidden=40):
    cfg = ModelConfig(vocab_size=90, hidden_size=hidden, num_layers=1, num_heads=4, ffn_size=64, max_positions=40,
                      dropout=dropout)
    torch.manual_seed(0)
    emb = Embeddings(cfg, 96)
    with torch.no_grad():
        for p in emb.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
        emb.token_type_embeddings.copy_(torch.randn_like(emb.token_type_embeddings) * 0.1)
    kernels.apply(emb, "cpu")
    return emb


def _ids():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 90, (3, 29), generator=g)
    ids[0, 17:] = 1                                   # padding (pad_id 1) at the end of a row
    ids[2, 4] = 1                                     # and one in the middle of another
    ids[1, 0] = ids[1, 5] = 7                         # a repeated id: its rows add up
    return ids


def _run(emb, ids, grad, fused, seed=5):
    emb.zero_grad(set_to_none=True)
    orig = embeddings_cpu.applies
    if not fused:
        embeddings_cpu.applies = lambda *a: False
    try:
        torch.manual_seed(seed)
        out = emb(ids)
        out.backward(grad)
    finally:
        embeddings_cpu.applies = orig
    return out.detach(), {n: p.grad.clone() for n, p in emb.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_node_equals_the_module_path(dropout):
    emb, ids = _emb(dropout), _ids()
    assert embeddings_cpu.applies(emb, ids)
    grad = torch.randn(3, 29, 40, generator=torch.Generator().manual_seed(3))
    out, grads = _run(emb, ids, grad, fused=True)
    r_out, r_grads = _run(emb, ids, grad, fused=False)
    torch.testing.assert_close(out, r_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == r_grads.keys() and len(grads) == 4
    for n in grads:
        torch.testing.assert_close(grads[n], r_grads[n], rtol=1e-4, atol=1e-5, msg=n)
    assert grads["word_embeddings.weight"][1].abs().max() == 0           # the padding rows: no gradient
    assert grads["position_embeddings.weight"][1].abs().max() == 0
    if dropout:
        assert (out == 0).float().mean() > 0.05                         # the mask was applied


def test_bad_id_names_it_and_its_place():
    emb, ids = _emb(), _ids()
    ids[2, 6] = 96
    with pytest.raises(IndexError, match=r"token id 96 at \[2, 6\] is outside the vocabulary \[0, 96\)"):
        emb(ids)


def test_dispatch_rule(monkeypatch):
    emb, ids = _emb(), _ids()
    assert embeddings_cpu.applies(emb, ids)
    assert not embeddings_cpu.applies(emb, ids.int())                      # int32 ids: the module path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not embeddings_cpu.applies(emb, ids)
    monkeypatch.setenv("XLMR_MP_KERNELS", "reference")
    assert not embeddings_cpu.applies(emb, ids)


def test_adds_to_existing_grads_as_autograd_would(monkeypatch):
    """With .grad already there (the trainer's flat buffers) the backward adds the word and position
    rows to them itself (no V x H temporary, no AccumulateGrad pass): the same .grad as autograd's
    accumulation; not with a hook on the table, nor under autograd.grad (which never touches .grad)."""
    from xlmr_mp.kernels import cpu_fast_path
    emb = _emb(dropout=0.0).train()
    ids = _ids()
    grad = torch.randn(3, 29, 40, generator=torch.Generator().manual_seed(3))
    word, pos = emb.word_embeddings.weight, emb.position_embeddings.weight
    seen = []
    real = cpu_fast_path.accumulation_targets
    monkeypatch.setattr(embeddings_cpu, "accumulation_targets", lambda *a: seen.append(real(*a)) or seen[-1])

    def backward_with(start):
        emb.zero_grad(set_to_none=True)
        if start is not None:
            word.grad, pos.grad = start[0].clone(), start[1].clone()
        embeddings_cpu.embeddings_forward(emb, ids).backward(grad)
        return word.grad.clone(), pos.grad.clone()
    fresh = backward_with(None)
    assert seen[-1] is None                              # no .grad yet: returned as usual
    start = (torch.randn_like(word), torch.randn_like(pos))
    added = backward_with(start)
    assert seen[-1] is not None                          # added in place
    torch.testing.assert_close(added[0], start[0] + fresh[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(added[1], start[1] + fresh[1], rtol=1e-6, atol=1e-6)
    calls = []
    handle = word.register_post_accumulate_grad_hook(lambda p: calls.append(1))
    backward_with(start)
    assert seen[-1] is None and calls == [1]              # the hook sees AccumulateGrad run once
    handle.remove()
    word.grad, pos.grad = start[0].clone(), start[1].clone()
    out = embeddings_cpu.embeddings_forward(emb, ids)
    torch.autograd.grad(out, [emb.layernorm.weight], grad)
    assert seen[-1] is None
    assert torch.equal(word.grad, start[0]) and torch.equal(pos.grad, start[1])
