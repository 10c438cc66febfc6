"""XLM-R's input embeddings as ONE autograd node on a CPU, beside their reference (the Embeddings
module of xlmr_mp/model/xlmr.py, which is what runs whenever `applies` is False; kernels.apply
installs `embeddings_forward` as Embeddings.forward).

    pos = fairseq positions of ids    y = (word[ids] + token_type) + position[pos]    out = Dropout(LN(y))

One C++ call each way (csrc/embeddings_cpu.cpp): the position ids, both gathers and the sum in one
pass, then the LayerNorm kernel of layernorm_cpu.cpp; backward, the LayerNorm's and the rows'
gradients added into the word and position tables in token order (their padding rows get none, as
nn.Embedding(padding_idx=...)). The module path is ~12 ops and autograd nodes (cumsum, two
embedding lookups and their dense backward, adds, LayerNorm) for a few hundred rows. The dropout
mask is the Bernoulli draw F.dropout makes (the same generator, the same order), so outputs and
gradients equal the module path's to rounding.

It runs (`applies`) at TP = 1 without sequence parallelism, for fp32 CPU tables where the CPU
kernels may run (`dispatch.cpu_kernels`: AVX2/FMA, not under autocast or torch.compile,
XLMR_MP_KERNELS not `reference`), with contiguous parameters. Tests: tests/kernels/test_embeddings_cpu.py.

The node is a registered op, torch.ops.xlmr_mp.embeddings (and its backward,
xlmr_mp::embeddings_backward_, which adds the rows into the tables' gradients it is given): CPU-only
(a CPU key and a fake kernel for FakeTensor, the meta device and torch.compile's tracing; no CUDA
key), its autograd an Autograd kernel (cpu_fast_path.set_autograd); the raw addresses the C++
takes are passed inside the op's kernels. The dropout mask is an input (drawn by
`embeddings_forward`), so the op is a pure function. Where the tables' .grad already exist (the
trainer's flat buffers) the backward adds the rows straight into them
(cpu_fast_path.accumulation_targets): no V x H zero-filled temporary and no AccumulateGrad pass
over it. Tests of the op: tests/kernels/test_cpu_node_ops.py.
"""
from __future__ import annotations

import torch

from xlmr_mp.kernels import dispatch
from xlmr_mp.kernels.cpu_fast_path import (accumulation_targets, addr, define_cpu_op, dropout_mask, extension,
                                          fp32_cpu_contiguous, set_autograd)


def _tables(emb) -> tuple:
    """(word, token type row, position, LN weight, LN bias) of an Embeddings module."""
    m = emb._modules
    ln = m["layernorm"]._parameters
    return (m["word_embeddings"]._parameters["weight"], emb._buffers["token_type_embeddings"],
            m["position_embeddings"]._parameters["weight"], ln["weight"], ln["bias"])


def applies(emb, ids: torch.Tensor) -> bool:
    """Whether `embeddings_forward` should run the Embeddings module `emb` on ids [B, S]."""
    if emb.tp_size != 1 or emb.sequence_parallel or ids.dim() != 2 or ids.dtype != torch.int64 or not ids.is_cpu:
        return False
    tables = _tables(emb)
    return dispatch.cpu_kernels(tables[0]) is not None and fp32_cpu_contiguous(tables)


def _shape(ids, word, position, pad_id) -> tuple:
    """(B, S, H, vocab, positions, pad id): what the C++ calls take."""
    return (*ids.shape, word.shape[1], word.shape[0], position.shape[0], pad_id)


def _check(op: str, ids, word, position, floats, per_token, keep) -> None:
    """ValueError where an embeddings op's tensors do not fit (the C++ reads them through raw
    addresses; it checks the ids and positions against the tables itself): ids [B, S] int64, the
    tables [V, H] and [P, H], `floats` (each H floats), `per_token` (each B * S * a multiple of H
    floats, or B * S), keep [B, S, H] or None; every float tensor fp32 contiguous."""
    if ids.dim() != 2 or ids.dtype != torch.int64 or word.dim() != 2 or position.dim() != 2:
        raise ValueError(f"{op}: ids must be [B, S] int64 and the tables 2-D")
    (B, S), H = ids.shape, word.shape[1]
    tensors = [word, position, *floats, *per_token] + ([] if keep is None else [keep])
    if (position.shape[1] != H or any(t.numel() != H for t in floats)
            or any(t.numel() not in (B * S, B * S * H) for t in per_token)
            or (keep is not None and keep.numel() != B * S * H) or not fp32_cpu_contiguous(tensors)):
        raise ValueError(f"{op}: for ids [{B}, {S}] and hidden {H}, a tensor has the wrong size, or is not "
                         f"float32 and contiguous")


def _embeddings(ids, word, token_type, position, ln_weight, ln_bias, keep, pad_id, eps):
    ids, keep = ids.contiguous(), None if keep is None else keep.contiguous()
    tables = tuple(t.contiguous() for t in (word, token_type, position, ln_weight, ln_bias))
    _check("embeddings", ids, tables[0], tables[2], tables[1::2], (), keep)
    ext = extension("embeddings", gemm=False)
    shape = _shape(ids, word, position, pad_id)
    B, S, H = shape[:3]
    out = word.new_empty(B, S, H)
    pos = ids.new_empty(B * S)
    y = word.new_empty(B * S, H)
    mean, rstd = word.new_empty(B * S), word.new_empty(B * S)
    ext.embeddings_forward(shape, ids.data_ptr(), tuple(t.data_ptr() for t in tables), addr(keep), eps,
                           (pos.data_ptr(), y.data_ptr(), out.data_ptr(), mean.data_ptr(), rstd.data_ptr()),
                           torch.get_num_threads())
    return out, pos, y, mean, rstd


def _embeddings_fake(ids, word, token_type, position, ln_weight, ln_bias, keep, pad_id, eps):
    B, S = ids.shape
    H = word.shape[1]
    return (word.new_empty(B, S, H), ids.new_empty(B * S), word.new_empty(B * S, H), word.new_empty(B * S),
            word.new_empty(B * S))


_FORWARD = define_cpu_op("embeddings(Tensor ids, Tensor word, Tensor token_type, Tensor position, Tensor ln_weight, "
                         "Tensor ln_bias, Tensor? keep, int pad_id, float eps) -> (Tensor, Tensor, Tensor, Tensor, "
                         "Tensor)", _embeddings, _embeddings_fake)
"""torch.ops.xlmr_mp.embeddings(ids, word, token_type, position, ln_weight, ln_bias, keep, pad_id, eps)
-> (out [B, S, H], positions [B*S] int64, y [B*S, H], mean [B*S], rstd [B*S]):
out = keep * LayerNorm(word[ids] + token_type + position[positions]) for ids [B, S] (int64), the
fp32 tables word [V, H], token_type (H floats), position [P, H], the LayerNorm's weight and bias
[H] and eps, keep [B, S, H] (the dropout mask, already scaled) or None; positions are fairseq's
(a padding id, pad_id, at position pad_id). positions, y (the sum before the LayerNorm), mean and
rstd are what the backward reads (as native_layer_norm returns its mean and rstd)."""


def _embeddings_backward(grad, ids, positions, keep, ln_weight, y, mean, rstd, pad_id, word_grad, position_grad):
    grad, ids, positions = grad.contiguous(), ids.contiguous(), positions.contiguous()
    keep, y, mean, rstd = (None if t is None else t.contiguous() for t in (keep, y, mean, rstd))
    _check("embeddings_backward_", ids, word_grad, position_grad, (ln_weight,), (grad, y, mean, rstd), keep)
    if positions.dtype != torch.int64 or positions.numel() != ids.numel():
        raise ValueError("embeddings_backward_: positions must be the forward's (B * S int64)")
    ext = extension("embeddings", gemm=False)
    shape = _shape(ids, word_grad, position_grad, pad_id)
    dln_w, dln_b = torch.empty_like(ln_weight), torch.empty_like(ln_weight)
    ext.embeddings_backward(shape, grad.data_ptr(), ids.data_ptr(), positions.data_ptr(), addr(keep),
                            ln_weight.data_ptr(), (y.data_ptr(), mean.data_ptr(), rstd.data_ptr()),
                            (word_grad.data_ptr(), position_grad.data_ptr(), dln_w.data_ptr(), dln_b.data_ptr()),
                            torch.get_num_threads())
    return dln_w, dln_b


_BACKWARD = define_cpu_op("embeddings_backward_(Tensor grad, Tensor ids, Tensor positions, Tensor? keep, "
                          "Tensor ln_weight, Tensor y, Tensor mean, Tensor rstd, int pad_id, Tensor(a!) word_grad, "
                          "Tensor(b!) position_grad) -> (Tensor, Tensor)", _embeddings_backward,
                          lambda grad, ids, positions, keep, ln_weight, *_: (torch.empty_like(ln_weight),
                                                                             torch.empty_like(ln_weight)))
"""torch.ops.xlmr_mp.embeddings_backward_(grad, ids, positions, keep, ln_weight, y, mean, rstd, pad_id,
word_grad, position_grad) -> (ln_weight grad, ln_bias grad): the backward of `embeddings` for the
output gradient grad [B, S, H] from its forward's ids, keep and outputs; adds each row's gradient
into word_grad [V, H] and position_grad [P, H] in token order (fp32 contiguous; their padding rows
get none)."""


class _Embeddings(torch.autograd.Function):
    """xlmr_mp::embeddings's autograd (its Autograd kernel, cpu_fast_path.set_autograd)."""

    @staticmethod
    def forward(ctx, ids, word, token_type, position, ln_weight, ln_bias, keep, pad_id, eps):
        with torch._C._AutoDispatchBelowAutograd():      # the op's kernel below autograd (CPU, fake)
            out, pos, y, mean, rstd = torch.ops.xlmr_mp.embeddings.default(
                ids, word, token_type, position, ln_weight, ln_bias, keep, pad_id, eps)
        ctx.mark_non_differentiable(pos, y, mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(ids, pos, keep, ln_weight, y, mean, rstd)
        ctx.pad_id = pad_id
        ctx.tables = (word, position)      # the parameters, whose .grad the backward may add to
        return out, pos, y, mean, rstd

    @staticmethod
    def backward(ctx, grad, *_saved_grads):
        if grad is None:
            return (None,) * 9
        ids, pos, keep, ln_weight, y, mean, rstd = ctx.saved_tensors
        word, position = ctx.tables
        # the word and position rows added straight to their .grad where that is exactly what
        # AccumulateGrad would do (cpu_fast_path.accumulation_targets; edges 1 and 3: word, position)
        fused = accumulation_targets(ctx, ctx.tables, (1, 3))
        dword, dpos = fused if fused else (grad.new_zeros(word.shape), grad.new_zeros(position.shape))
        dln_w, dln_b = _BACKWARD(grad, ids, pos, keep, ln_weight, y, mean, rstd, ctx.pad_id, dword, dpos)
        if fused:
            dword = dpos = None
        return None, dword, None, dpos, dln_w, dln_b, None, None, None


set_autograd(_FORWARD, lambda *args: _Embeddings.apply(*args))


def embeddings_forward(emb, ids: torch.Tensor) -> torch.Tensor:
    """The Embeddings module `emb` applied to ids [B, S] as one autograd node, the registered op
    torch.ops.xlmr_mp.embeddings (check `applies` first). An id outside the vocabulary raises
    IndexError naming it and its place."""
    word, token_type, position, ln_w, ln_b = _tables(emb)
    p = emb.dropout if emb.training else 0.0
    keep = None
    if p > 0:    # F.dropout's draw, after the LayerNorm: the module path's mask
        keep = dropout_mask(word.new_empty(ids.shape[0], ids.shape[1], word.shape[1]), p)
    return _FORWARD(ids, word, token_type, position, ln_w, ln_b, keep, int(emb.pad_id),
                    float(emb._modules["layernorm"].eps))[0]
