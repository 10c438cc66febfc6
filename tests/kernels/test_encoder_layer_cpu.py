"""The encoder layer as one autograd node on a CPU (kernels/encoder_layer_cpu.py) beside the module
path it replaces (model/encoder.py with the same kernels) and beside the pure torch reference
(XLMR_MP_KERNELS=reference: SDPA, F.gelu): values, every gradient, hidden dropout masks, padding,
full recompute, the dispatch rule, and gradients added to .grad by the node itself."""
import contextlib

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from xlmr_mp import kernels
from xlmr_mp.kernels import attention_cpu, cpu_fast_path, encoder_layer_cpu
from xlmr_mp.model.config import ModelConfig
from xlmr_mp.model.encoder import EncoderLayer, attention_bias
from tests.support.model_case import loss_and_grads, padded_batch, tiny_model

pytestmark = pytest.mark.skipif(attention_cpu._ext() is None, reason="xlmr_mp._C without the CPU kernels, "
                                "or a CPU without AVX2/FMA")


def _layer(hidden=64, heads=4, ffn=128, dropout=0.1, attention_dropout=0.0, seed=0):
    cfg = ModelConfig(vocab_size=64, hidden_size=hidden, num_layers=1, num_heads=heads, ffn_size=ffn,
                      max_positions=140, dropout=dropout, attention_dropout=attention_dropout)
    torch.manual_seed(seed)
    layer = EncoderLayer(cfg)
    with torch.no_grad():   # non-trivial LayerNorm affine and biases, so every gradient is tested
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and p.numel() == hidden else 0.0))
    kernels.apply(layer, "cpu")
    return layer


def _padding(B, S):
    keep = torch.ones(B, S)
    keep[0, S // 3:] = 0
    return attention_bias(keep, torch.float32)


def _run(layer, x, bias, grad, seed=7, fused=True, recompute=False):
    """(output, dx, {name: grad}) with the RNG at `seed`; fused=False forces the module path."""
    for p in layer.parameters():
        p.grad = None
    xi = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    orig = encoder_layer_cpu.applies
    if not fused:
        encoder_layer_cpu.applies = lambda *a: False
    try:
        if recompute:
            out = checkpoint(layer, xi, bias, use_reentrant=False)
        else:
            out = layer(xi, bias)
        out.backward(grad)
    finally:
        encoder_layer_cpu.applies = orig
    return out.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def _close(a, b, **tol):
    out, dx, grads = a
    r_out, r_dx, r_grads = b
    torch.testing.assert_close(out, r_out, **tol)
    torch.testing.assert_close(dx, r_dx, **tol)
    assert grads.keys() == r_grads.keys() and len(grads) == 12
    for n in grads:
        torch.testing.assert_close(grads[n], r_grads[n], **tol, msg=lambda m, n=n: f"{n}: {m}")


SHAPES = [(8, 64, 64, 4, 128), (2, 128, 96, 4, 384), (3, 17, 40, 5, 72)]


@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_equals_module_path_with_dropout(shape, pad):
    B, S, H, heads, ffn = shape
    layer = _layer(H, heads, ffn, dropout=0.1).train()
    g = torch.Generator().manual_seed(1)
    x, grad = torch.randn(B, S, H, generator=g), torch.randn(B, S, H, generator=g)
    bias = _padding(B, S) if pad else None
    assert encoder_layer_cpu.applies(layer, x, bias)
    fused = _run(layer, x, bias, grad)
    ref = _run(layer, x, bias, grad, fused=False)
    # the same kernels and dropout masks; only the GEMMs' summation order may differ (dx = dy + dqkv
    # Wqkv in one addmm, 2-D instead of 3-D operands)
    _close(fused, ref, rtol=1e-4, atol=5e-5)
    other_seed = _run(layer, x, bias, grad, seed=8)
    assert not torch.allclose(other_seed[0], fused[0])   # dropout is on: another seed, other masks


def test_equals_torch_reference(monkeypatch):
    layer = _layer(dropout=0.0).train()
    g = torch.Generator().manual_seed(2)
    x, grad = torch.randn(4, 64, 64, generator=g), torch.randn(4, 64, 64, generator=g)
    bias = _padding(4, 64)
    fused = _run(layer, x, bias, grad)
    monkeypatch.setenv("XLMR_MP_KERNELS", "reference")
    assert not encoder_layer_cpu.applies(layer, x, bias)
    ref = _run(layer, x, bias, grad)
    _close(fused, ref, rtol=1e-4, atol=3e-5)   # near-zero entries (the key bias: softmax-invariant)


def test_runs_as_one_node_and_under_full_recompute():
    layer = _layer().train()
    x = torch.randn(2, 32, 64, requires_grad=True)
    out = layer(x, None)
    assert type(out.grad_fn).__name__ == "_EncoderBackward"
    grad = torch.randn(2, 32, 64)
    plain = _run(layer, x.detach(), None, grad)
    recomputed = _run(layer, x.detach(), None, grad, recompute=True)
    _close(recomputed, plain, rtol=0, atol=0)      # the recompute redraws the same dropout masks


def test_dispatch_rule():
    x = torch.randn(2, 16, 64)
    layer = _layer(attention_dropout=0.1)
    assert not encoder_layer_cpu.applies(layer.train(), x, None)     # the attention kernel has no dropout
    assert encoder_layer_cpu.applies(layer.eval(), x, None)
    layer = _layer().train()
    assert encoder_layer_cpu.applies(layer, x, None)
    assert not encoder_layer_cpu.applies(layer, x.double(), None)
    assert not encoder_layer_cpu.applies(layer, torch.randn(2, attention_cpu.MAX_SEQ + 1, 64), None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not encoder_layer_cpu.applies(layer, x, None)
    layer.attention.selective_recompute = True
    assert not encoder_layer_cpu.applies(layer, x, None)
    layer.attention.selective_recompute = False
    layer.tp_size = 2
    assert not encoder_layer_cpu.applies(layer, x, None)


def test_whole_model_equals_the_reference_and_runs_the_node(monkeypatch):
    """XLMRModel (hidden dropout on, padding in the batch) with its layers as ONE node and with
    XLMR_MP_KERNELS=reference: the same loss and gradients, and the node ran once for all layers."""
    model, batch = tiny_model().train(), padded_batch()
    assert len(model.layers) >= 2
    calls = []
    real = encoder_layer_cpu._FORWARD               # the registered op xlmr_mp::encoder_layers
    monkeypatch.setattr(encoder_layer_cpu, "_FORWARD", lambda *a: calls.append(len(a[2])) or real(*a))
    loss_k, grads_k = loss_and_grads(model, batch, monkeypatch, "auto")
    assert calls == [12 * len(model.layers)]
    loss_r, grads_r = loss_and_grads(model, batch, monkeypatch, "reference")
    assert len(calls) == 1
    torch.testing.assert_close(loss_k, loss_r, rtol=1e-5, atol=1e-6)
    for n in grads_r:
        torch.testing.assert_close(grads_k[n], grads_r[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("threads", [1, 2])
def test_layers_as_one_node_equal_one_node_each(threads):
    """Three layers as one node (the model's path) against three one-layer nodes in turn, with hidden
    dropout and padding: the same masks in the same order, so the same output and gradients; and
    a hook on a layer, or a layer with another dropout, keeps one node each."""
    layers = [_layer(dropout=0.1, seed=s).train() for s in range(3)]
    g = torch.Generator().manual_seed(4)
    x, grad = torch.randn(4, 40, 64, generator=g), torch.randn(4, 40, 64, generator=g)
    bias = _padding(4, 40)
    assert encoder_layer_cpu.stack_applies(layers, x, bias)

    def run(stacked):
        for layer in layers:
            for p in layer.parameters():
                p.grad = None
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(9)
        if stacked:
            out = encoder_layer_cpu.stack_forward(layers, xi, bias)
            assert type(out.grad_fn).__name__ == "_EncoderBackward"
        else:
            out = xi
            for layer in layers:
                out = layer(out, bias)
        out.backward(grad)
        return out.detach(), xi.grad, [p.grad.clone() for layer in layers for p in layer.parameters()]

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one, each = run(True), run(False)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one[0], each[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one[1], each[1], rtol=1e-4, atol=1e-5)
    for a, b in zip(one[2], each[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    handle = layers[1].register_forward_hook(lambda *a: None)
    assert not encoder_layer_cpu.stack_applies(layers, x, bias)
    handle.remove()
    layers[2].dropout = 0.2
    assert not encoder_layer_cpu.stack_applies(layers, x, bias)
    layers[2].dropout = layers[0].dropout
    assert encoder_layer_cpu.stack_applies(layers, x, bias)
    assert not encoder_layer_cpu.stack_applies(layers + [_layer(ffn=96)], x, bias)   # another FFN size


def test_workspace_comes_back_to_the_pool_only_when_released():
    """The layer's saved activations come from cpu_fast_path.WORKSPACES: the next forward of the same
    shape reuses the buffer a finished backward let go (no fresh pages a step), and never one a
    retained graph still holds (its second backward equals its first)."""
    from xlmr_mp.kernels.cpu_fast_path import WORKSPACES
    layer = _layer(dropout=0.0)
    x, grad = torch.randn(2, 24, 64), torch.randn(2, 24, 64)
    WORKSPACES.clear()
    seen = []
    orig = WORKSPACES.take

    def take(n):
        t = orig(n)
        seen.append(t.data_ptr())
        return t
    WORKSPACES.take = take
    try:
        layer(x.clone().requires_grad_(True), None).backward(grad)
        assert WORKSPACES.idle_bytes() > 0
        layer(x.clone().requires_grad_(True), None).backward(grad)
        assert seen[1] == seen[0]                       # reused, not reallocated
        xi = x.clone().requires_grad_(True)
        out = layer(xi, None)
        out.backward(grad, retain_graph=True)
        first = xi.grad.clone()
        held = seen[-1]
        for _ in range(2):                              # graph still holds its workspace
            layer(torch.randn(2, 24, 64).requires_grad_(True), None).backward(grad)
            assert seen[-1] != held
        xi.grad = None
        out.backward(grad)
        torch.testing.assert_close(xi.grad, first, rtol=0, atol=0)
    finally:
        WORKSPACES.take = orig
    WORKSPACES.max_idle_bytes, cap = 0, WORKSPACES.max_idle_bytes
    try:
        WORKSPACES.clear()
        layer(x.clone().requires_grad_(True), None).backward(grad)
        assert WORKSPACES.idle_bytes() == 0             # over the cap: freed, not kept
    finally:
        WORKSPACES.max_idle_bytes = cap


@pytest.mark.parametrize("threads,B,parts", [(2, 8, 2), (4, 8, 4), (2, 9, 2), (4, 6, 1), (2, 1, 1)])
def test_batch_parts_equal_module_path(threads, B, parts):
    """At several threads the call runs as `parts` ranges of batch rows, each on one thread with
    single-threaded kernels, the parameters' gradients of parts > 0 added at the end: values and
    every gradient equal the module path's with dropout and padding on (the masks and the key bias
    cut at each part's rows)."""
    from xlmr_mp.kernels import dispatch
    layer = _layer(dropout=0.1).train()
    g = torch.Generator().manual_seed(3)
    x, grad = torch.randn(B, 40, 64, generator=g), torch.randn(B, 40, 64, generator=g)
    bias = _padding(B, 40)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ext = dispatch._cpu_extension()
        shape = (B, 40, 64, 4, 128)
        assert ext.encoder_parts(shape, 1, threads, False) == parts
        assert ext.encoder_parts(shape, 1, threads, True) == parts
        fused = _run(layer, x, bias, grad)
        ref = _run(layer, x, bias, grad, fused=False)
    finally:
        torch.set_num_threads(before)
    _close(fused, ref, rtol=1e-4, atol=5e-5)


def test_backward_keeps_one_part_when_the_gradient_copies_are_large():
    from xlmr_mp.kernels import dispatch
    ext = dispatch._cpu_extension()
    assert ext.encoder_parts((8, 64, 256, 4, 1024), 1, 2, True) == 2       # ~0.8M floats a copy
    assert ext.encoder_parts((8, 64, 256, 4, 1024), 4, 2, True) == 1       # 4 layers: ~3.2M
    assert ext.encoder_parts((8, 64, 768, 12, 3072), 1, 2, True) == 1      # ~7M: threaded kernels
    assert ext.encoder_parts((8, 64, 768, 12, 3072), 1, 2, False) == 2     # the forward has none


@pytest.mark.parametrize("threads", [1, 2])
def test_layers_add_to_existing_grads_as_autograd_would(monkeypatch, threads):
    """With every .grad already there (the trainer's flat buffers) the node adds its parameters'
    gradients to them itself: bit for bit autograd's `grad += new`; a post-accumulate hook (the DP
    reducer's) keeps AccumulateGrad, which then runs it once."""
    from xlmr_mp.kernels import cpu_fast_path
    layers = [_layer(dropout=0.1, seed=s).train() for s in range(3)]
    params = [p for layer in layers for p in layer.parameters()]
    g = torch.Generator().manual_seed(6)
    x, grad = torch.randn(4, 24, 64, generator=g), torch.randn(4, 24, 64, generator=g)
    assert encoder_layer_cpu.stack_applies(layers, x, None)
    seen = []
    real = cpu_fast_path.accumulation_targets
    monkeypatch.setattr(encoder_layer_cpu, "accumulation_targets", lambda *a: seen.append(real(*a)) or seen[-1])

    def backward_with(start):
        for p, s in zip(params, start or [None] * len(params)):
            p.grad = None if s is None else s.clone()
        torch.manual_seed(2)
        encoder_layer_cpu.stack_forward(layers, x.clone().requires_grad_(True), None).backward(grad)
        return [p.grad.clone() for p in params]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fresh = backward_with(None)
        assert seen[-1] is None
        start = [torch.randn_like(p) for p in params]
        added = backward_with(start)
        assert seen[-1] is not None
        for a, s, f in zip(added, start, fresh):
            torch.testing.assert_close(a, s + f, rtol=0, atol=0)
        calls = []
        handle = params[5].register_post_accumulate_grad_hook(lambda p: calls.append(1))
        hooked = backward_with(start)
        handle.remove()
    finally:
        torch.set_num_threads(before)
    assert seen[-1] is None and calls == [1]
    for a, b in zip(hooked, added):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradients_into_grad_leaves_the_parameters_out_of_the_graph():
    """Inside cpu_fast_path.gradients_into_grad (where the trainer runs its forwards) the node takes
    its parameters detached, so the engine runs no AccumulateGrad for them, and adds their gradients
    to .grad itself: the same bits as the edges' path; a hooked parameter or a missing .grad keeps
    the edges; a .grad replaced between the forward and the backward is an error."""
    layers = [_layer(dropout=0.1, seed=s).train() for s in range(3)]
    params = [p for layer in layers for p in layer.parameters()]
    g = torch.Generator().manual_seed(7)
    x, grad = torch.randn(4, 24, 64, generator=g), torch.randn(4, 24, 64, generator=g)
    start = [torch.randn_like(p) for p in params]

    def forward(edge_free, grads=True):
        for p, s in zip(params, start):
            p.grad = s.clone() if grads else None
        torch.manual_seed(3)
        xi = x.clone().requires_grad_(True)
        with cpu_fast_path.gradients_into_grad() if edge_free else contextlib.nullcontext():
            out = encoder_layer_cpu.stack_forward(layers, xi, None)
        return out, sum(f is not None for f, _ in out.grad_fn.next_functions)

    out, edges = forward(False)
    assert edges == 1 + len(params)
    out.backward(grad)
    with_edges = [p.grad.clone() for p in params]
    out, edges = forward(True)
    assert edges == 1                                       # x's alone
    out.backward(grad)
    for a, b in zip(params, with_edges):
        torch.testing.assert_close(a.grad, b, rtol=0, atol=0)
    assert forward(True, grads=False)[1] == 1 + len(params)   # no .grad to add to: the edges
    handle = params[3].register_hook(lambda t: t)
    assert forward(True)[1] == 1 + len(params)                # a tensor hook must see the gradient
    handle.remove()
    out, edges = forward(True)
    params[0].grad = torch.zeros_like(params[0])
    with pytest.raises(RuntimeError, match="replaced between the forward and the backward"):
        out.backward(grad)


def _trainer_body(rank, world_size, run_dir):
    from tests.support import train_bodies as b
    from xlmr_mp.parallel.state import destroy_parallel
    taken = []
    real = encoder_layer_cpu.edge_free_targets
    encoder_layer_cpu.edge_free_targets = lambda params: taken.append(real(params) is not None) or real(params)
    out = {}
    for mode in ("edges", "edge_free"):
        cfg = b.tiny_cfg(["train.global_batch=8", "train.micro_batch=4", "model.dropout=0.1",
                          f"run_dir={run_dir}/{mode}", "logging.jsonl=false"], world_size)
        tr, _ = b.make_trainer(cfg)
        if mode == "edges":          # the schedule without the applied kernels' micro-batch context
            tr.schedule.micro_batch = None
        taken.clear()
        ms = [tr.train_step() for _ in range(3)]
        out[mode] = {"losses": [m["loss"] for m in ms], "grad_norms": [m["grad_norm"] for m in ms],
                     "params": b.local_params(tr), "taken": list(taken)}
        destroy_parallel()
    return out


def test_trainer_runs_its_forwards_edge_free_with_the_same_bits(tmp_path):
    from tests.support.harness import run_distributed
    r = run_distributed(_trainer_body, 1, args=(str(tmp_path),), timeout=600)[0]
    assert r["edge_free"]["taken"] and all(r["edge_free"]["taken"])
    assert r["edges"]["taken"] and not any(r["edges"]["taken"])
    assert r["edge_free"]["losses"] == r["edges"]["losses"]
    assert r["edge_free"]["grad_norms"] == r["edges"]["grad_norms"]
    for n, t in r["edges"]["params"].items():
        torch.testing.assert_close(r["edge_free"]["params"][n], t, rtol=0, atol=0, msg=n)
