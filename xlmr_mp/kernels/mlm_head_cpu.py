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
tests/kernels/test_mlm_head_cpu.py (value and every gradient against the module path).

The node is a registered op, torch.ops.xlmr_mp.masked_head_loss: CPU-only (a CPU key and a fake
kernel for FakeTensor, the meta device and torch.compile's tracing; no CUDA key), its autograd an
Autograd kernel (cpu_fast_path.set_autograd) that scales the gradients the forward returned (so it
has no backward op); the raw addresses the C++ takes are passed inside the op's kernel. Tests of
the op: tests/kernels/test_cpu_node_ops.py.
"""
from __future__ import annotations

import torch

from xlmr_mp.ids import IGNORE_INDEX
from xlmr_mp.kernels import dispatch
from xlmr_mp.kernels.cpu_fast_path import (addr, blas_sgemm, define_cpu_op, extension, fp32_cpu_contiguous,
                                          set_autograd)


def _params(head) -> tuple:
    """(dense weight, dense bias, LN weight, LN bias, decoder bias) of an MLMHead, from the modules'
    dicts, which skips nn.Module.__getattr__'s Python-level lookup."""
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


def _masked_head_loss(hidden, labels, offset, dense_weight, dense_bias, ln_weight, ln_bias, decoder_weight,
                      decoder_bias, n_real, eps, chunk_rows, need_grad):
    params = tuple(None if t is None else t.contiguous()
                   for t in (dense_weight, dense_bias, ln_weight, ln_bias, decoder_weight, decoder_bias))
    hidden, labels = hidden.contiguous(), labels.contiguous()
    if hidden.dim() != 2 or labels.dtype != torch.int64 or labels.numel() != hidden.shape[0]:
        raise ValueError("masked_head_loss: hidden must be [T, H] and labels T int64")
    T, H = hidden.shape
    sizes = (H * H, H, H, H, params[4].numel(), None if params[5] is None else params[5].numel())
    if (params[4].dim() != 2 or params[4].shape[1] != H or not 0 < n_real <= params[4].shape[0]
            or (params[5] is not None and params[5].numel() != params[4].shape[0])
            or any(t is not None and t.numel() != n for t, n in zip(params, sizes))
            or not fp32_cpu_contiguous([hidden, *(t for t in params if t is not None)]) or chunk_rows < 1):
        raise ValueError(f"masked_head_loss: for hidden [{T}, {H}] a parameter has the wrong size (the decoder "
                         f"[V >= n_real, H], its bias [V]), or is not float32 and contiguous; or chunk_rows < 1")
    ext = extension("mlm_head")
    if need_grad:    # the decoder's two are added to across chunks and parts: zeros
        grads = (torch.empty_like(hidden), *(torch.empty_like(t) for t in params[:4]), torch.zeros_like(params[4]),
                 None if params[5] is None else torch.zeros_like(params[5]))
    else:
        grads = (None,) * 7
    total, count = ext.mlm_head_loss_labels((T, H, n_real, chunk_rows), hidden.data_ptr(), labels.data_ptr(),
                                            IGNORE_INDEX, offset, tuple(addr(t) for t in params), eps,
                                            tuple(addr(g) for g in grads), torch.get_num_threads())
    grads = tuple(hidden.new_empty(0) if g is None else g for g in grads)
    return (torch.tensor(total, dtype=torch.float32), torch.tensor(float(count)), *grads)


def _masked_head_loss_fake(hidden, labels, offset, dense_weight, dense_bias, ln_weight, ln_bias, decoder_weight,
                           decoder_bias, n_real, eps, chunk_rows, need_grad):
    like = (hidden, dense_weight, dense_bias, ln_weight, ln_bias, decoder_weight, decoder_bias)
    grads = tuple(hidden.new_empty(0) if t is None or not need_grad else torch.empty_like(t) for t in like)
    return (hidden.new_empty(()), hidden.new_empty(()), *grads)


_FORWARD = define_cpu_op("masked_head_loss(Tensor hidden, Tensor labels, int offset, Tensor dense_weight, "
                         "Tensor dense_bias, Tensor ln_weight, Tensor ln_bias, Tensor decoder_weight, "
                         "Tensor? decoder_bias, int n_real, float eps, int chunk_rows, bool need_grad) -> "
                         "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
                         _masked_head_loss, _masked_head_loss_fake)
"""torch.ops.xlmr_mp.masked_head_loss(hidden, labels, offset, dense_weight, dense_bias, ln_weight,
ln_bias, decoder_weight, decoder_bias, n_real, eps, chunk_rows, need_grad) -> (loss sum, count,
*grads): the masked-LM head (dense, exact GELU, LayerNorm with eps, the tied decoder [V, H] and
its bias or None) and its cross-entropy summed over the rows of hidden [T, H] whose label [T]
(int64) is not IGNORE_INDEX, against label - offset; decoder rows >= n_real are padding, never
predicted; chunk_rows rows of [rows, V] logits at a time. loss sum: 0-d fp32; count: the masked
rows, 0-d float. grads: with need_grad, the gradients of the loss sum (upstream gradient 1) of
hidden, dense weight and bias, LayerNorm weight and bias, decoder weight and bias (the backward
scales them); an empty tensor for each without need_grad, and for the absent decoder bias.
Tensors fp32 (labels int64)."""


class _MaskedHeadLoss(torch.autograd.Function):
    """xlmr_mp::masked_head_loss's autograd (its Autograd kernel, cpu_fast_path.set_autograd): the
    forward's gradients, scaled in place by the loss's upstream gradient."""

    @staticmethod
    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():      # the op's kernel below autograd (CPU, fake)
            out = torch.ops.xlmr_mp.masked_head_loss.default(*args)
        ctx.mark_non_differentiable(*out[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*out[2:])
        ctx.has_bias = args[8] is not None
        ctx.spent = False
        return out

    @staticmethod
    def backward(ctx, grad_total, *_):
        grads = list(ctx.saved_tensors)
        if grads[1].numel() == 0:                         # the dense weight's: need_grad was False
            raise RuntimeError("masked_loss_sum ran without gradients (no input required grad at the call)")
        if ctx.spent:        # the gradients are scaled in place: a second backward would scale them again
            raise RuntimeError("masked_loss_sum: its backward ran twice (retain_graph is not supported)")
        ctx.spent = True
        if grad_total is None:
            return (None,) * 13
        if not ctx.has_bias:
            grads[6] = None
        present = [g for g in grads if g is not None]
        if all(type(g) is torch.Tensor for g in present):       # eager: in place, no second [V, H] buffer
            torch._foreach_mul_(present, grad_total)
        else:       # a tracer's tensors (torch.compile, opcheck): a saved output is not mutated in a backward
            scaled = iter(torch._foreach_mul(present, grad_total))
            grads = [None if g is None else next(scaled) for g in grads]
        return (grads[0], None, None, *grads[1:], None, None, None, None)


set_autograd(_FORWARD, lambda *args: _MaskedHeadLoss.apply(*args))


def masked_loss_sum_labels(head, hidden: torch.Tensor, labels: torch.Tensor, offset: int,
                           decoder_weight: torch.Tensor, n_real: int, chunk_rows: int) -> tuple:
    """(sum of the masked-LM cross-entropy (0-d fp32), number of masked rows (0-d float)) of MLMHead
    `head` over the rows of hidden [T, H] whose label [T] is not IGNORE_INDEX, against label - offset
    (decoder row ids; rows >= n_real of the decoder are padding, never predicted), through the
    registered op torch.ops.xlmr_mp.masked_head_loss. The masked rows are found and gathered in the
    C++ call (no nonzero / index_select / index_copy around it). Check `applies` first."""
    params = _params(head)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or decoder_weight.requires_grad
                                             or any(p.requires_grad for p in params))
    out = _FORWARD(hidden, labels, int(offset), *params[:4], decoder_weight, params[4], int(n_real),
                   float(head.eps), int(chunk_rows), bool(need_grad))
    return out[0], out[1]
