"""The masked-LM head and its loss over the masked rows as ONE autograd node on a CPU, beside its
reference (the module path: MLMHead.transform, then parallel/vocab.py's chunked vocab-parallel
cross-entropy, which is what runs whenever `applies` is False).

    d = h Wd^T    a = gelu(d + bd)    z = LN(a)    loss = sum_i CE(z_i Wdec^T + bdec, target_i)

over h = hidden[masked rows]. One C++ call (csrc/mlm_head_cpu.cpp) finds and gathers the masked
rows from the labels (`masked_loss_sum_labels`, which kernels.apply installs in place of
MLMHead.masked_loss_sum where `applies`), does the forward and, as the
chunked loss does, the gradients for an upstream gradient of 1 chunk by chunk (the [chunk, V]
logits become softmax - onehot in place and never outlive their chunk); the backward scales them.
GEMMs through torch's own sgemm (kernels/cpu_fast_path.py), the rows through the AVX2 kernels (bias +
GELU, LayerNorm, the loss rows of csrc/xent_cpu.cpp). At the tiny shapes of a scaling study the
module path's ~25 ops and autograd nodes for these few dozen rows cost more than their work.

It runs (`applies`) at TP = 1, for fp32 CPU tensors where the CPU kernels may run
(`dispatch.cpu_kernels`: AVX2/FMA, not under autocast or torch.compile, XLMR_MP_KERNELS not
`reference`), with torch's sgemm found and contiguous fp32 parameters. Tests:
tests/test_mlm_head_cpu.py (value and every gradient against the module path).
"""
from __future__ import annotations

import torch

from xlmr_mp.ids import IGNORE_INDEX
from xlmr_mp.kernels import dispatch
from xlmr_mp.kernels.cpu_fast_path import addr, blas_sgemm, fp32_cpu_contiguous


def _params(head) -> tuple:
    """(dense weight, dense bias, LN weight, LN bias, decoder bias) of an MLMHead, from the modules'
    dicts (nn.Module attribute access costs 1-2 us each)."""
    m = head._modules
    dense, ln = m["dense"]._parameters, m["layernorm"]._parameters
    return dense["weight"], dense["bias"], ln["weight"], ln["bias"], head._parameters["bias"]


def applies(head, hidden: torch.Tensor, decoder_weight: torch.Tensor) -> bool:
    """Whether `masked_loss_sum` should run the MLMHead `head` on hidden [..., H] with the tied
    decoder matrix `decoder_weight` [V_local, H]."""
    if head.tp_group is not None and torch.distributed.get_world_size(head.tp_group) > 1:
        return False
    return (dispatch.cpu_kernels(hidden) is not None and blas_sgemm()
            and fp32_cpu_contiguous((*_params(head), decoder_weight)))


class _MaskedHeadLoss(torch.autograd.Function):
    """(loss sum, masked-row count) over the rows of hidden [T, H] whose label is not IGNORE_INDEX;
    the C++ call gathers them, and writes dhidden [T, H] whole."""

    @staticmethod
    def forward(ctx, hidden, labels, offset, w_dense, b_dense, ln_w, ln_b, w_dec, b_dec, n_real, eps, chunk_rows,
                need_grad):
        ext = dispatch._cpu_extension()
        params = tuple(None if t is None else t.detach() for t in (w_dense, b_dense, ln_w, ln_b, w_dec, b_dec))
        hidden = hidden.detach()
        T, H = hidden.shape
        labels = labels.contiguous()
        grads = (None,) * 7
        if need_grad:
            grads = (torch.empty_like(hidden), *(torch.empty_like(t) for t in params[:4]), torch.zeros_like(params[4]),
                     None if params[5] is None else torch.zeros_like(params[5]))
        total, count = ext.mlm_head_loss_labels((T, H, n_real, chunk_rows), hidden.data_ptr(), labels.data_ptr(),
                                                IGNORE_INDEX, offset, tuple(addr(t) for t in params), eps,
                                                tuple(addr(g) for g in grads), torch.get_num_threads())
        ctx.grads = grads
        n = torch.tensor(float(count))
        ctx.mark_non_differentiable(n)
        return torch.tensor(total, dtype=torch.float32), n

    @staticmethod
    def backward(ctx, grad_total, _grad_count):
        grads = ctx.grads
        ctx.grads = None
        if grads[0] is None:
            raise RuntimeError("masked_loss_sum ran without gradients (no input required grad at the call)")
        torch._foreach_mul_([g for g in grads if g is not None], grad_total)
        return (grads[0], None, None, *grads[1:], None, None, None, None)


def masked_loss_sum_labels(head, hidden: torch.Tensor, labels: torch.Tensor, offset: int,
                           decoder_weight: torch.Tensor, n_real: int, chunk_rows: int) -> tuple:
    """(sum of the masked-LM cross-entropy (0-d fp32), number of masked rows (0-d float)) of MLMHead
    `head` over the rows of hidden [T, H] whose label [T] is not IGNORE_INDEX, against label - offset
    (decoder row ids; rows >= n_real of the decoder are padding, never predicted). The masked rows are
    found and gathered in the C++ call (no nonzero / index_select / index_copy around it). Check
    `applies` first."""
    params = _params(head)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or decoder_weight.requires_grad
                                             or any(p.requires_grad for p in params))
    return _MaskedHeadLoss.apply(hidden.contiguous(), labels, int(offset), *params[:4], decoder_weight, params[4],
                                 int(n_real), float(head.eps), int(chunk_rows), bool(need_grad))

