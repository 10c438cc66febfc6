"""The CPU nodes as registered ops (torch.ops.xlmr_mp.*: qkv_attention, embeddings, encoder_layers,
masked_head_loss and their backward ops; kernels/{attention,embeddings,encoder_layer,mlm_head}_cpu.py):
torch.library.opcheck (schema, FakeTensor, autograd registration, AOT dispatch) of every op on CPU,
with and without gradients (the CUDA cases are written and skipped: the nodes are CPU-only ops, no
CUDA key); each op's value and every gradient equal the model's plain torch reference (SDPA, the
Embeddings / EncoderLayer modules, MLMHead.transform + parallel/vocab.py's chunked loss); the meta
device gives each op's shapes; torch.compile(backend="aot_eager", fullgraph=True) traces through
each op (forward and backward) with no graph break and the same results; the fake workspace size
is the C++ one."""
import math

import pytest
import torch

from xlmr_mp.ids import IGNORE_INDEX
from xlmr_mp.kernels import attention_cpu, dispatch, embeddings_cpu, encoder_layer_cpu, mlm_head_cpu
from xlmr_mp.kernels.cpu_fast_path import blas_sgemm, dropout_mask
from xlmr_mp.model.config import ModelConfig
from xlmr_mp.model.encoder import EncoderLayer
from xlmr_mp.model.xlmr import Embeddings, MLMHead
from xlmr_mp.parallel.vocab import vocab_parallel_masked_lm_loss

pytestmark = pytest.mark.skipif(dispatch._cpu_extension() is None or not blas_sgemm(),
                                reason="xlmr_mp._C without the CPU kernels, a CPU without AVX2/FMA, or no sgemm_ "
                                "in libtorch_cpu")
CPU_ONLY = pytest.mark.skip(reason="a CPU-only op: no CUDA key is registered (the CUDA fused ops are kernels/*_op.py)")
DEVICES = ["cpu", pytest.param("cuda", marks=CPU_ONLY)]
OPS = torch.ops.xlmr_mp
H, HEADS, FFN = 32, 4, 48


def _rand(*shape, g, scale=1.0, offset=0.0):
    return torch.randn(*shape, generator=g) * scale + offset


def _cfg(dropout=0.0, vocab=90):
    return ModelConfig(vocab_size=vocab, hidden_size=H, num_layers=2, num_heads=HEADS, ffn_size=FFN,
                       max_positions=40, dropout=dropout, attention_dropout=0.0)


def _randomize(module, seed):
    """Non-trivial weights, LayerNorm affines and biases, so that every gradient is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(_rand(*p.shape, g=g, scale=0.2, offset=1.0 if p.dim() == 1 and p.numel() == H else 0.0))
    return module


def _grads(inputs, out, grad):
    """d(out . grad) / d(each input that requires grad), in order."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return torch.autograd.grad(out, leaves, grad)


def _close_all(got, ref, **tol):
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"gradient {i}: {m}")


# ----------------------------------------------------------------------------------------- qkv_attention

def _attention_args(grad, pad=True, B=2, S=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = _rand(B, S, HEADS, 3, H // HEADS, g=g, scale=2.0).requires_grad_(grad)
    key_bias = None
    if pad:
        key_bias = torch.zeros(B, S)
        key_bias[0, S // 2:] = torch.finfo(torch.float32).min
    return qkv, key_bias, 1.0 / math.sqrt(H // HEADS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("pad", [True, False], ids=["pad", "nopad"])
def test_qkv_attention_opcheck(device, grad, pad):
    torch.library.opcheck(OPS.qkv_attention.default, _attention_args(grad, pad))
    qkv, key_bias, scale = _attention_args(False, pad)
    out, probs = OPS.qkv_attention(qkv, key_bias, scale)
    torch.library.opcheck(OPS.qkv_attention_backward.default, (torch.randn_like(out), qkv, probs, out, scale))


def test_qkv_attention_equals_sdpa():
    qkv, key_bias, scale = _attention_args(True)
    grad = torch.randn(2, 12, H, generator=torch.Generator().manual_seed(1))
    out, probs = OPS.qkv_attention(qkv, key_bias, scale)
    got = _grads([qkv], out, grad)
    ref = attention_cpu.attention_ref(qkv, key_bias[:, None, None, :], scale)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _close_all(got, _grads([qkv], ref, grad), rtol=1e-4, atol=5e-5)
    q, k = qkv[:, :, :, 0].transpose(1, 2), qkv[:, :, :, 1].transpose(1, 2)
    ref_probs = torch.softmax(scale * q @ k.transpose(-1, -2) + key_bias[:, None, None, :], -1)
    torch.testing.assert_close(probs, ref_probs.detach(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- embeddings

def _embeddings_module(dropout=0.0):
    torch.manual_seed(0)
    emb = _randomize(Embeddings(_cfg(dropout), 96), 1)
    with torch.no_grad():
        emb.token_type_embeddings.copy_(torch.randn_like(emb.token_type_embeddings) * 0.1)
    return emb


def _embeddings_args(emb, grad, keep=False):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 90, (3, 11), generator=g)
    ids[0, 7:] = emb.pad_id                             # padding at the end of a row, and a repeated id
    ids[1, 0] = ids[1, 5] = 7
    tables = [t.detach().clone().requires_grad_(grad) for t in embeddings_cpu._tables(emb)]
    tables[1].requires_grad_(False)                     # the token-type row is a buffer
    mask = dropout_mask(torch.empty(3, 11, H), 0.2) if keep else None
    return (ids, *tables, mask, int(emb.pad_id), float(emb.layernorm.eps))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("keep", [True, False], ids=["keep", "no_keep"])
def test_embeddings_opcheck(device, grad, keep):
    emb = _embeddings_module()
    args = _embeddings_args(emb, grad, keep)
    torch.library.opcheck(OPS.embeddings.default, args)
    out, pos, y, mean, rstd = OPS.embeddings(*_embeddings_args(emb, False, keep))
    ids, word, _, position, ln_w, _, mask, pad_id, _ = args
    backward_args = (torch.randn_like(out), ids, pos, mask, ln_w.detach(), y, mean, rstd, pad_id,
                     torch.zeros_like(word.detach()), torch.zeros_like(position.detach()))
    torch.library.opcheck(OPS.embeddings_backward_.default, backward_args)


@pytest.mark.parametrize("keep", [True, False], ids=["keep", "no_keep"])
def test_embeddings_equal_the_module(keep):
    """The op (dropout mask `keep` as an input) against the Embeddings module in eval mode times the
    same mask: the output and the word, position and LayerNorm gradients."""
    emb = _embeddings_module()
    args = _embeddings_args(emb, True, keep)
    ids, mask = args[0], args[6]
    grad = torch.randn(3, 11, H, generator=torch.Generator().manual_seed(3))
    out = OPS.embeddings(*args)[0]
    got = _grads(args, out, grad)
    ref_emb = _embeddings_module().eval()
    with torch.no_grad():
        for p, t in zip(embeddings_cpu._tables(ref_emb), embeddings_cpu._tables(emb)):
            p.copy_(t)
    ref = Embeddings.forward(ref_emb, ids) * (1.0 if mask is None else mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    params = [t for t in embeddings_cpu._tables(ref_emb) if t.requires_grad]
    _close_all(got, torch.autograd.grad(ref, params, grad), rtol=1e-4, atol=1e-5)
    assert got[0][emb.pad_id].abs().max() == 0 and got[1][emb.pad_id].abs().max() == 0   # padding rows: none


# ----------------------------------------------------------------------------------------- encoder_layers

def _encoder_layers(n=2):
    torch.manual_seed(0)
    return [_randomize(EncoderLayer(_cfg()), 10 + i) for i in range(n)]


def _encoder_args(layers, grad, masks=False, pad=True, B=2, S=10, seed=4):
    g = torch.Generator().manual_seed(seed)
    x = _rand(B, S, H, g=g).requires_grad_(grad)
    key_bias = None
    if pad:
        key_bias = torch.zeros(B, S)
        key_bias[1, S - 3:] = torch.finfo(torch.float32).min
    params = [t.detach().clone().requires_grad_(grad) for layer in layers for t in encoder_layer_cpu._params(layer)]
    keep = [dropout_mask(torch.empty(B, S, H), 0.1) for _ in range(2 * len(layers))] if masks else []
    return x, key_bias, params, keep, HEADS, float(layers[0].eps), []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("masks", [True, False], ids=["masks", "no_masks"])
def test_encoder_layers_opcheck(device, grad, masks):
    layers = _encoder_layers()
    torch.library.opcheck(OPS.encoder_layers.default, _encoder_args(layers, grad, masks))
    x, key_bias, params, keep, heads, eps, _ = _encoder_args(layers, False, masks)
    out, ws = OPS.encoder_layers(x, key_bias, params, keep, heads, eps, [])
    for accumulate in (False, True):
        grads = [torch.randn_like(p) for p in params]
        torch.library.opcheck(OPS.encoder_layers_backward_.default,
                              (torch.randn_like(out), x, ws, params, keep, heads, grads, accumulate))


def test_encoder_layers_equal_the_modules():
    """The op over two layers against the EncoderLayer modules' plain torch path in turn: output,
    dx and all 24 parameter gradients; with dropout masks, against the modules in training mode
    drawing theirs from the same generator state."""
    layers = _encoder_layers()
    for masks in (False, True):
        torch.manual_seed(5)
        args = _encoder_args(layers, True, masks)
        x, key_bias, params = args[:3]
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
        out = OPS.encoder_layers(*args)[0]
        got = _grads([x, *params], out, grad)
        ref_layers = _encoder_layers()
        for layer in ref_layers:
            layer.dropout = 0.1 if masks else 0.0
            layer.train(masks)
        with torch.no_grad():
            for p, t in zip([p for layer in ref_layers for p in encoder_layer_cpu._params(layer)], params):
                p.copy_(t)
        torch.manual_seed(5)
        args = _encoder_args(layers, True, False)     # the same generator draws (x and the pad) before the masks
        xr = args[0]
        bias = key_bias[:, None, None, :]
        ref = xr
        for layer in ref_layers:
            ref = EncoderLayer.forward(layer, ref, bias)
        ref_params = [p for layer in ref_layers for p in encoder_layer_cpu._params(layer)]
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=3e-5)
        _close_all(got, _grads([xr, *ref_params], ref, grad), rtol=1e-4, atol=5e-5)


def test_workspace_size_is_the_kernels():
    ext = dispatch._cpu_extension()
    for shape in [(2, 10, 32, 4, 48), (8, 64, 64, 4, 128), (3, 17, 40, 5, 72)]:
        for layers in (1, 4):
            assert encoder_layer_cpu.workspace_floats(shape, layers) == ext.encoder_workspace_floats(shape, layers)


# ----------------------------------------------------------------------------------------- masked_head_loss

def _head(vocab=53, padded=56):
    torch.manual_seed(0)
    return _randomize(MLMHead(_cfg(vocab=vocab), padded), 7)


def _head_args(head, grad, need_grad=None, rows=20, chunk_rows=1000, bias=True):
    g = torch.Generator().manual_seed(8)
    hidden = _rand(rows, H, g=g).requires_grad_(grad)
    labels = torch.full((rows,), IGNORE_INDEX, dtype=torch.int64)
    labels[torch.randperm(rows, generator=g)[:7]] = torch.randint(0, head.vocab_size, (7,), generator=g)
    dense_w, dense_b, ln_w, ln_b, dec_b = (t.detach().clone().requires_grad_(grad) for t in mlm_head_cpu._params(head))
    decoder = _rand(56, H, g=g, scale=0.2).requires_grad_(grad)
    return (hidden, labels, 0, dense_w, dense_b, ln_w, ln_b, decoder, dec_b if bias else None, head.vocab_size,
            float(head.eps), chunk_rows, grad if need_grad is None else need_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_masked_head_loss_opcheck(device, grad, bias):
    head = _head()
    torch.library.opcheck(OPS.masked_head_loss.default, _head_args(head, grad, bias=bias, chunk_rows=3))


def test_masked_head_loss_equals_the_module_path():
    """The op against MLMHead.transform on the masked rows and parallel/vocab.py's chunked loss: the
    loss sum, the count and all seven gradients, for a non-trivial upstream gradient; without
    need_grad the same loss and count and no gradient outputs."""
    head = _head()
    args = _head_args(head, True, chunk_rows=3)
    hidden, labels, decoder = args[0], args[1], args[7]
    out = OPS.masked_head_loss(*args)
    loss, count = out[0], out[1]
    got = _grads(args, loss * 0.37, None)
    ref_head = _head()
    with torch.no_grad():
        for p, t in zip(mlm_head_cpu._params(ref_head), (args[3], args[4], args[5], args[6], args[8])):
            p.copy_(t)
    sel = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    ref = vocab_parallel_masked_lm_loss(ref_head.transform(hidden.index_select(0, sel)), decoder, ref_head.bias,
                                        labels[sel], None, 0, head.vocab_size, chunk_rows=3)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert count.item() == sel.numel() and not count.requires_grad
    leaves = [hidden, *mlm_head_cpu._params(ref_head)[:4], decoder, ref_head.bias]
    _close_all(got, torch.autograd.grad(ref * 0.37, leaves), rtol=1e-4, atol=1e-6)
    plain = OPS.masked_head_loss(*_head_args(head, False))
    assert all(t.numel() == 0 for t in plain[2:])
    assert torch.equal(plain[0], loss.detach()) and torch.equal(plain[1], count)


# ----------------------------------------------------------------------------------------- registration

FORWARD_OPS = ("qkv_attention", "embeddings", "encoder_layers", "masked_head_loss")
BACKWARD_OPS = ("qkv_attention_backward", "embeddings_backward_", "encoder_layers_backward_")


def test_each_op_has_its_keys():
    """A CPU kernel and a Meta one (the fake) for every op, an Autograd kernel for each forward op
    (opcheck passes an op without one whose outputs do not require grad: this does not), no CUDA
    key (CPU-only ops)."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for name in FORWARD_OPS + BACKWARD_OPS:
        qualname = f"xlmr_mp::{name}"
        assert has(qualname, "CPU") and has(qualname, "Meta") and not has(qualname, "CUDA"), name
        assert has(qualname, "Autograd") == (name in FORWARD_OPS), name


def test_ops_refuse_tensors_that_do_not_fit():
    """The C++ reads the tensors through raw addresses: a wrong size, dtype or layout is a ValueError
    (TypeError for a dtype the encoder's kernels do not take), never a read past a buffer."""
    layers = _encoder_layers()
    x, key_bias, params, keep, heads, eps, _ = _encoder_args(layers, False, True)
    with pytest.raises(ValueError, match="wrong size"):
        OPS.encoder_layers(x, key_bias, [params[0][:-1], *params[1:]], keep, heads, eps, [])
    with pytest.raises(ValueError, match="wrong size"):
        OPS.encoder_layers(x, key_bias[:, :-1].contiguous(), params, keep, heads, eps, [])
    with pytest.raises(TypeError, match="float32"):
        OPS.encoder_layers(x.double(), key_bias, params, keep, heads, eps, [])
    out, ws = OPS.encoder_layers(x, key_bias, params, keep, heads, eps, [])
    with pytest.raises(ValueError, match="workspace"):
        OPS.encoder_layers_backward_(out, x, ws[:-1], params, keep, heads, [torch.empty_like(p) for p in params], False)
    args = list(_embeddings_args(_embeddings_module(), False, True))
    args[6] = args[6][:, :-1].contiguous()                       # keep [B, S - 1, H]
    with pytest.raises(ValueError, match="wrong size"):
        OPS.embeddings(*args)
    args = list(_head_args(_head(), False))
    args[9] = args[7].shape[0] + 1                               # n_real over the decoder's rows
    with pytest.raises(ValueError, match="wrong size"):
        OPS.masked_head_loss(*args)


# ----------------------------------------------------------------------------------------- meta and compile

def _meta(t):
    return t.to("meta") if isinstance(t, torch.Tensor) else [_meta(u) for u in t] if isinstance(t, list) else t


def test_meta_device_gives_each_ops_shapes():
    qkv, key_bias, scale = _attention_args(False)
    out, probs = OPS.qkv_attention(_meta(qkv), _meta(key_bias), scale)
    assert out.device.type == "meta" and out.shape == (2, 12, H) and probs.shape == (2, HEADS, 12, 12)
    emb_out = OPS.embeddings(*map(_meta, _embeddings_args(_embeddings_module(), False, True)))
    assert [tuple(t.shape) for t in emb_out] == [(3, 11, H), (33,), (33, H), (33,), (33,)]
    assert emb_out[1].dtype == torch.int64
    layers = _encoder_layers()
    args = _encoder_args(layers, False, True)
    enc_out, ws = OPS.encoder_layers(*map(_meta, args))
    assert enc_out.shape == (2, 10, H) and ws.shape == (encoder_layer_cpu.workspace_floats((2, 10, H, HEADS, FFN), 2),)
    head_out = OPS.masked_head_loss(*map(_meta, _head_args(_head(), False, need_grad=True)))
    assert [tuple(t.shape) for t in head_out] == [(), (), (20, H), (H, H), (H,), (H,), (H,), (56, H), (56,)]


def _compiled_equals_eager(fn, inputs):
    """fn(*inputs) -> a scalar, eager and under torch.compile(aot_eager, fullgraph): value and the
    gradients of the inputs that require grad."""
    def run(f):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                  for t in inputs]
        value = f(*leaves)
        grads = torch.autograd.grad(value, [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad])
        return value.detach(), grads
    torch._dynamo.reset()
    eager = run(fn)
    compiled = run(torch.compile(fn, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=0)
    _close_all(compiled[1], eager[1], rtol=0, atol=0)


def test_compile_traces_through_each_op():
    w = torch.randn(2, 12, H)
    qkv, key_bias, scale = _attention_args(True)
    _compiled_equals_eager(lambda q, b: (OPS.qkv_attention(q * 1.5, b, scale)[0] * w).sum(), [qkv, key_bias])

    emb_args = list(_embeddings_args(_embeddings_module(), True, True))
    we = torch.randn(3, 11, H)

    def embeddings(ids, word, token_type, position, ln_w, ln_b, keep):
        out = OPS.embeddings(ids, word, token_type, position, ln_w, ln_b, keep, emb_args[7], emb_args[8])[0]
        return (out * we).sum()
    _compiled_equals_eager(embeddings, emb_args[:7])

    enc_args = _encoder_args(_encoder_layers(), True, True)
    wx = torch.randn(2, 10, H)

    def encoder(x, key_bias, *params):
        return (OPS.encoder_layers(x, key_bias, list(params), enc_args[3], HEADS, enc_args[5], [])[0] * wx).sum()
    _compiled_equals_eager(encoder, [enc_args[0], enc_args[1], *enc_args[2]])

    head_args = _head_args(_head(), True)

    def head(hidden, labels, dense_w, dense_b, ln_w, ln_b, decoder, dec_b):
        out = OPS.masked_head_loss(hidden, labels, 0, dense_w, dense_b, ln_w, ln_b, decoder, dec_b, *head_args[9:])
        return out[0] * 0.5
    _compiled_equals_eager(head, [t for i, t in enumerate(head_args[:9]) if i != 2])
