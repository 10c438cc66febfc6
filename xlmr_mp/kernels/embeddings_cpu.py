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
XLMR_MP_KERNELS not `reference`), with contiguous parameters. Tests: tests/test_embeddings_cpu.py.
"""
from __future__ import annotations

import torch

from xlmr_mp.kernels import dispatch
from xlmr_mp.kernels.cpu_fast_path import accumulation_targets, addr, dropout_mask, fp32_cpu_contiguous


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


class _Embeddings(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, word, token_type, position, ln_w, ln_b, pad_id, eps, p):
        ext = dispatch._cpu_extension()
        B, S = ids.shape
        H = word.shape[1]
        shape = (B, S, H, word.shape[0], position.shape[0], pad_id)
        tables = tuple(t.detach() for t in (word, token_type.reshape(-1), position, ln_w, ln_b))
        out = word.new_empty(B, S, H)
        keep = dropout_mask(out, p) if p > 0 else None       # F.dropout's draw, after the LayerNorm
        pos = ids.new_empty(B * S)
        y = word.new_empty(B * S, H)
        mean, rstd = word.new_empty(B * S), word.new_empty(B * S)
        ext.embeddings_forward(shape, ids.data_ptr(), tuple(t.data_ptr() for t in tables), addr(keep), eps,
                               (pos.data_ptr(), y.data_ptr(), out.data_ptr(), mean.data_ptr(), rstd.data_ptr()),
                               torch.get_num_threads())
        ctx.save_for_backward(ids, pos, keep, tables[3], y, mean, rstd)
        ctx.meta = (shape, word.shape, position.shape)
        ctx.tables = (word, position)      # the parameters, whose .grad the backward may add to
        return out

    @staticmethod
    def backward(ctx, grad):
        ids, pos, keep, ln_w, y, mean, rstd = ctx.saved_tensors
        shape, word_shape, pos_shape = ctx.meta
        grad = grad.detach().contiguous()
        fused = accumulation_targets(ctx, ctx.tables, (1, 3))     # the kernel adds its rows to them
        dword, dpos = fused if fused else (grad.new_zeros(word_shape), grad.new_zeros(pos_shape))
        dln_w, dln_b = torch.empty_like(ln_w), torch.empty_like(ln_w)
        dispatch._cpu_extension().embeddings_backward(
            shape, grad.data_ptr(), ids.data_ptr(), pos.data_ptr(), addr(keep), ln_w.data_ptr(),
            (y.data_ptr(), mean.data_ptr(), rstd.data_ptr()),
            (dword.data_ptr(), dpos.data_ptr(), dln_w.data_ptr(), dln_b.data_ptr()), torch.get_num_threads())
        if fused:
            dword = dpos = None
        return None, dword, None, dpos, dln_w, dln_b, None, None, None


def embeddings_forward(emb, ids: torch.Tensor) -> torch.Tensor:
    """The Embeddings module `emb` applied to ids [B, S] as one autograd node (check `applies`
    first). An id outside the vocabulary raises IndexError naming it and its place."""
    word, token_type, position, ln_w, ln_b = _tables(emb)
    p = emb.dropout if emb.training else 0.0
    return _Embeddings.apply(ids.contiguous(), word, token_type, position, ln_w, ln_b, int(emb.pad_id),
                             float(emb._modules["layernorm"].eps), float(p))
