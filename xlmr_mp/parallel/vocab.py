"""Vocabulary parallelism: the token embedding and the tied MLM decoder split by vocabulary rows
across TP ranks, and the cross-entropy computed on the local logit shard without gathering them.

The vocabulary is padded to a multiple of `make_vocab_size_divisible_by x TP` (Megatron's rule);
rank r owns rows [r * Vp / TP, (r + 1) * Vp / TP). Padding rows are zero and never predicted: their
logits are set to -inf before the softmax (`mask_padded_logits`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from xlmr_mp.ids import IGNORE_INDEX
from xlmr_mp.parallel.mappings import copy_to_tp, reduce_from_tp, reduce_scatter_sequence, tp_rank_of, tp_size_of


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Vocabulary rounded up to a multiple of divisible_by * tp."""
    m = max(1, divisible_by) * tp
    return ((vocab_size + m - 1) // m) * m


def vocab_range(padded_vocab: int, tp_rank: int, tp_size: int) -> tuple:
    """[start, end) of the vocabulary rows owned by tp_rank."""
    per = padded_vocab // tp_size
    return tp_rank * per, (tp_rank + 1) * per


class VocabParallelEmbedding(nn.Module):
    """Token embedding with rows split across the TP group; output [*, H] replicated on every rank.
    `padding_idx` gets no gradient (as nn.Embedding(padding_idx=...)). With `sequence_parallel`
    the partial lookups are reduce-scattered instead: output [B, S/TP, H], this rank's shard."""

    def __init__(self, padded_vocab: int, dim: int, tp_group=None, padding_idx: Optional[int] = None,
                 sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel and tp_size_of(tp_group) > 1
        self.tp_group = tp_group
        self.padded_vocab = padded_vocab
        self.start, self.end = vocab_range(padded_vocab, tp_rank_of(tp_group), tp_size_of(tp_group))
        self.padding_idx = padding_idx
        self.weight = nn.Parameter(torch.empty(self.end - self.start, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local_pad = None
        if self.padding_idx is not None and self.start <= self.padding_idx < self.end:
            local_pad = self.padding_idx - self.start
        if tp_size_of(self.tp_group) == 1:
            return F.embedding(ids, self.weight, padding_idx=local_pad)
        outside = (ids < self.start) | (ids >= self.end)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight, padding_idx=local_pad)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_sequence(out, self.tp_group)
        return reduce_from_tp(out, self.tp_group)


def parallel_lm_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       tp_group=None) -> torch.Tensor:
    """Local vocabulary shard of the logits: hidden [N, H] (replicated) @ weight [V/TP, H]^T + bias."""
    return F.linear(copy_to_tp(hidden, tp_group), weight, bias)


def mask_padded_logits(logits: torch.Tensor, vocab_size: int, vocab_start: int) -> torch.Tensor:
    """Set the logits of padding ids (>= vocab_size) in a local shard starting at vocab_start to
    -inf, so they are never predicted and carry no gradient.

    Where no gradient is recorded (evaluation, inference) the padding columns of `logits` are
    filled in place and `logits` itself is returned: the same values as the out-of-place mask,
    without writing a second [N, V_local] tensor. With autograd recording, a new tensor."""
    n_real = vocab_size - vocab_start
    if n_real >= logits.shape[-1]:
        return logits
    if not (torch.is_grad_enabled() and logits.requires_grad):
        logits[..., max(n_real, 0):].fill_(float("-inf"))
        return logits
    keep = torch.arange(logits.shape[-1], device=logits.device) < n_real
    return logits.masked_fill(~keep, float("-inf"))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy from logit shards (Megatron's algorithm, explicit group, ignore_index)."""

    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, ignore_index):
        logits = logits.float()
        tp = tp_size_of(group)
        logits_max = logits.amax(dim=-1)
        if tp > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        n_local = logits.shape[-1]
        ignored = target == ignore_index
        local_t = target - vocab_start
        outside = (local_t < 0) | (local_t >= n_local) | ignored
        local_t = local_t.masked_fill(outside, 0)
        rows = torch.arange(shifted.shape[0], device=shifted.device)
        predicted = shifted[rows, local_t].masked_fill(outside, 0.0)
        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        if tp > 1:
            stacked = torch.stack([predicted, sum_exp])
            dist.all_reduce(stacked, group=group)
            predicted, sum_exp = stacked[0], stacked[1]
        loss = (sum_exp.log() - predicted).masked_fill(ignored, 0.0)
        exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(exp, local_t, outside, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, outside, ignored = ctx.saved_tensors
        grad = softmax
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= (~outside).to(grad.dtype)
        scale = grad_loss.masked_fill(ignored, 0.0)
        grad.mul_(scale.unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None,
                                 vocab_start: int = 0, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token loss [N] (0 where target == ignore_index) from local logits [N, V/TP] whose
    columns are global ids [vocab_start, vocab_start + V/TP). Equals F.cross_entropy(full logits,
    target, ignore_index, reduction='none') in value and gradient, without gathering the logits.
    Computed in fp32; the gradient has the logits' dtype cast back by autograd."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, V_local] and target [N]; got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group, vocab_start, ignore_index)


# ----------------------------------------------------------------------------- masked-LM loss, chunked

MLM_LOSS_CHUNK_BYTES = 256 * 2 ** 20   # fp32 logits of one chunk, [rows, V/TP] x 4 bytes, at most this
# On an accelerator (mlm_loss_plan): larger chunks (fewer, larger kernels; 1073 rows at V=250002), and
# the gradient logits of up to MLM_DEVICE_GRAD_BYTES of masked rows (8589 rows in bf16 at V=250002,
# more than a 16 x 512 micro-batch masks) kept for one decoder-gradient product.
MLM_DEVICE_CHUNK_BYTES = 2 ** 30
MLM_DEVICE_GRAD_BYTES = 4 * 2 ** 30


def real_rows(local_rows: int, vocab_size: int, vocab_start: int) -> int:
    """How many of a shard's `local_rows` decoder rows (global ids from vocab_start) are real
    vocabulary, not padding: the rows a masked-LM loss may predict."""
    return max(0, min(local_rows, vocab_size - vocab_start))


def mlm_loss_chunk_rows(local_vocab: int, budget_bytes: int = MLM_LOSS_CHUNK_BYTES) -> int:
    """Masked tokens per chunk of the chunked loss: as many rows of [rows, V/TP] fp32 logits as fit
    in budget_bytes (256 MiB: 268 rows at V=250002 on one TP rank, 536 at TP=2), at least 16. A byte
    budget, not a row count: at XLM-R's vocabulary 1024 rows would be 977 MiB, as much as the whole
    masked set of a 16 x 512 micro-batch."""
    return max(16, budget_bytes // (4 * max(1, local_vocab)))


class MLMLossPlan(NamedTuple):
    """How the chunked masked-LM loss walks its M masked rows on one device."""
    chunk_rows: int       # rows whose [rows, V/TP] fp32 logits / softmax exist at a time
    product_rows: int     # rows per decoder-gradient product (gradient logits kept in the compute
                          # dtype until then); 0: one product per chunk, nothing kept (the host plan)


def mlm_loss_plan(device_type: str, local_vocab: int, compute_dtype: torch.dtype = torch.float32) -> MLMLossPlan:
    """The chunked loss's plan on a device of `device_type` ("cpu", "cuda", ...) for a vocabulary
    shard of `local_vocab` real rows. On the host: 256 MiB chunks (mlm_loss_chunk_rows) and the
    decoder-gradient products chunk by chunk, which keeps the memory small and costs little there.
    On an accelerator that would re-read and re-write the whole [V/TP, H] fp32 decoder gradient
    once per chunk (268 rows at V=250002: ~5 passes over 1 GiB for a 16 x 512 micro-batch), so the
    chunks grow to MLM_DEVICE_CHUNK_BYTES of fp32 logits and each chunk's gradient logits go into
    one [rows, V/TP] buffer in the compute dtype, multiplied once (d decoder = P^T h, d hidden =
    P W) per MLM_DEVICE_GRAD_BYTES of it: one product per micro-batch at XLM-R's shapes."""
    v = max(1, local_vocab)
    if device_type == "cpu":
        return MLMLossPlan(mlm_loss_chunk_rows(local_vocab), 0)
    chunk = max(16, MLM_DEVICE_CHUNK_BYTES // (4 * v))
    item = torch.finfo(compute_dtype).bits // 8
    return MLMLossPlan(chunk, max(chunk, MLM_DEVICE_GRAD_BYTES // (item * v)))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


class _ChunkedMaskedLMLoss(torch.autograd.Function):
    """Sum over masked tokens of the vocab-parallel cross-entropy of hidden @ weight^T + bias, in
    chunks of rows; the gradients (for an upstream gradient of 1) are computed in the forward and
    scaled in the backward, so neither the [M, V/TP] fp32 logits nor their softmax are kept, and
    nothing is recomputed (the fused linear + cross-entropy of Liger / Megatron). The softmax rows
    run as one AVX2 kernel at TP = 1 in fp32 on a CPU (csrc/xent_cpu.cpp, where
    `dispatch.cpu_kernels` allows), as the fused CUDA kernels where dispatched, else as torch ops.
    `product_rows` (mlm_loss_plan): 0 multiplies each chunk's gradient logits into the decoder and
    hidden gradients at once (the host plan); otherwise they are kept, in the compute dtype, for one
    product per `product_rows` rows (an accelerator). Nothing here reads a device value on the host
    on an accelerator: no boolean indexing, no item()."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, group, vocab_start, n_real, chunk_rows, product_rows, need_grad):
        from xlmr_mp.kernels import dispatch
        from xlmr_mp.kernels.mlm_xent import local_targets
        cdt = _compute_dtype(hidden)
        tp = tp_size_of(group)
        host = product_rows == 0
        fused = dispatch.use_fused(hidden, "mlm_xent")
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight[:n_real].to(cdt)                     # the real (not padding) rows of this shard, once
            b = None if bias is None else bias[:n_real].to(cdt)
            h_all = hidden.to(cdt)
            # fp32 on an AVX2 CPU at TP = 1: one kernel for each chunk's softmax rows (csrc/xent_cpu.cpp),
            # which also drops targets outside [0, n_real) as local_targets does
            rows_kernel = (dispatch.cpu_kernels(hidden) if host and not fused and tp == 1 and cdt == torch.float32
                           else None)
            if rows_kernel is not None:
                t_all = (target.long() - vocab_start).contiguous()
            else:
                t_all = local_targets(target, vocab_start, n_real)       # column here, or -1
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            gh = gw = gb = None
            if need_grad:
                gh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
                gw = torch.zeros_like(weight)
                gb = None if bias is None else torch.zeros_like(bias)
            M = hidden.shape[0]
            group_rows = product_rows or chunk_rows
            for g0 in range(0, M, group_rows):
                g1 = min(g0 + group_rows, M)
                # the group's gradient logits, one buffer when the group has several chunks
                buf = None
                if need_grad and g1 - g0 > chunk_rows:
                    buf = torch.empty((g1 - g0, n_real), dtype=cdt, device=hidden.device)
                for r0 in range(g0, g1, chunk_rows):
                    r1 = min(r0 + chunk_rows, g1)
                    h, t = h_all[r0:r1], t_all[r0:r1]
                    out = None if buf is None else buf[r0 - g0:r1 - g0]
                    logits = _linear(h, w, b, out)          # [m, n_real], compute dtype
                    if rows_kernel is not None:
                        p = logits.detach().contiguous()
                        loss_rows = torch.empty(r1 - r0, dtype=torch.float32)
                        rows_kernel.xent_rows(p.numpy(), t.numpy(), loss_rows.numpy(), torch.get_num_threads())
                        total += loss_rows.sum()
                    elif fused:   # one pass over the low-precision logits, no fp32 copy
                        from xlmr_mp.kernels import fused as fk
                        lse, tl = fk.mlm_xent_stats(logits, t)
                        if tp > 1:
                            gmax = lse.clone()
                            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
                            stacked = torch.stack([torch.exp(lse - gmax), tl])
                            dist.all_reduce(stacked, group=group)
                            lse, tl = gmax + torch.log(stacked[0]), stacked[1]
                        total += (lse - tl).sum()
                        if need_grad:
                            p = fk.mlm_xent_grad_(logits, t, lse, torch.ones_like(lse))   # in place, compute dtype
                    else:
                        rows = torch.arange(r1 - r0, device=h.device)
                        lf = logits.float()
                        del logits
                        m = lf.amax(dim=-1)             # amax: no argmax indices (faster on CPU)
                        if tp > 1:
                            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
                        lf -= m[:, None]
                        inside = t >= 0
                        tl = lf[rows, t.clamp(min=0)].masked_fill(~inside, 0.0)
                        s = lf.exp_().sum(dim=-1)
                        if tp > 1:
                            stacked = torch.stack([tl, s])
                            dist.all_reduce(stacked, group=group)
                            tl, s = stacked[0], stacked[1]
                        total += (s.log() - tl).sum()
                        if need_grad:
                            lf.div_(s[:, None])
                            if host:
                                lf[rows[inside], t[inside]] -= 1.0
                            else:    # no boolean index (a nonzero, a host sync): outside rows subtract 0
                                lf[rows, t.clamp(min=0)] -= inside.to(lf.dtype)
                            if out is not None:        # into the group's buffer (the same memory in fp32)
                                p = out if lf.data_ptr() == out.data_ptr() else out.copy_(lf)
                            else:
                                p = lf if cdt == torch.float32 else lf.to(cdt)
                if need_grad:
                    _add_gradient_products(p if buf is None else buf, h_all[g0:g1], w, gh[g0:g1], gw, gb, n_real,
                                           first=not host and g0 == 0)
        ctx.grads = (gh, gw, gb)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        gh, gw, gb = ctx.grads
        ctx.grads = None
        if gh is None:
            raise RuntimeError("masked_lm_loss_sum ran without gradients (no input required grad at the call)")
        g = grad_total.to(gh.dtype)
        gh.mul_(g)
        gw.mul_(grad_total.to(gw.dtype))
        if gb is not None:
            gb.mul_(grad_total.to(gb.dtype))
        return gh, gw, gb, None, None, None, None, None, None, None


def _linear(h, w, b, out):
    """h @ w^T + b, into `out` when given (a slice of the gradient-logits buffer)."""
    if out is None:
        return F.linear(h, w, b)
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def _add_gradient_products(p, h, w, gh_rows, gw, gb, n_real: int, first: bool) -> None:
    """The decoder-gradient product of the gradient logits p [m, n_real] of rows h [m, H]: d hidden
    of those rows = p w (written), d decoder rows [:n_real] += p^T h, d bias += the column sums of
    p. `first`: gw is still zero, so the product is written rather than added (no read of gw)."""
    if gh_rows.dtype == p.dtype:
        torch.mm(p, w, out=gh_rows)
    else:
        gh_rows[:] = (p @ w).to(gh_rows.dtype)
    if first:
        if gw.dtype == p.dtype:
            torch.mm(p.t(), h, out=gw[:n_real])
        else:
            gw[:n_real] = p.t() @ h
    elif gw.dtype == p.dtype:
        gw[:n_real].addmm_(p.t(), h)
    else:
        gw[:n_real] += (p.t() @ h).to(gw.dtype)
    if gb is not None:
        gb[:n_real] += p.sum(0, dtype=torch.float32).to(gb.dtype)


def vocab_parallel_masked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                  target: torch.Tensor, tp_group=None, vocab_start: int = 0,
                                  vocab_size: Optional[int] = None,
                                  chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Sum over the M masked tokens of cross_entropy(hidden @ weight^T + bias, target), a 0-d
    fp32 tensor, from this rank's vocabulary shard: hidden [M, H] (replicated over TP), weight
    [V/TP, H] and bias [V/TP] covering global ids [vocab_start, vocab_start + V/TP), target [M]
    global ids. Ids >= vocab_size (vocabulary padding) are never predicted. Equals
    vocab_parallel_cross_entropy(mask_padded_logits(parallel_lm_logits(...)), target).sum() in
    value and gradient without holding more than [chunk_rows, V/TP] fp32 logits (default: the
    device's plan, mlm_loss_plan: a 256 MiB budget on the host). The masked-LM loss of the package:
    the fused rows (csrc/xent_cpu.cpp on an AVX2 CPU at TP = 1; the CUDA kernels of kernels/fused.py
    where XLMR_MP_KERNELS dispatches them) are implementations inside it, not other losses."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or target.shape != hidden.shape[:1]:
        raise ValueError(f"vocab_parallel_masked_lm_loss: hidden [M, H], weight [V_local, H], target [M] expected; "
                         f"got {tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(target.shape)}")
    if chunk_rows is not None and chunk_rows <= 0:
        raise ValueError(f"vocab_parallel_masked_lm_loss: chunk_rows must be positive, got {chunk_rows}")
    n_real = weight.shape[0] if vocab_size is None else real_rows(weight.shape[0], vocab_size, vocab_start)
    plan = mlm_loss_plan(hidden.device.type, n_real, _compute_dtype(hidden))
    if chunk_rows is None:
        chunk_rows = plan.chunk_rows
    hidden = copy_to_tp(hidden, tp_group)          # backward: the TP sum of every shard's partial d hidden
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _ChunkedMaskedLMLoss.apply(hidden, weight, bias, target, tp_group, int(vocab_start), int(n_real),
                                      int(chunk_rows), int(plan.product_rows), bool(need_grad))
