"""Vocabulary parallelism: the token embedding and the tied MLM decoder split by vocabulary rows
across TP ranks, and the cross-entropy computed on the local logit shard without gathering them.

The vocabulary is padded to a multiple of `make_vocab_size_divisible_by x TP` (Megatron's rule);
rank r owns rows [r * Vp / TP, (r + 1) * Vp / TP). Padding rows are zero and never predicted: their
logits are set to -inf before the softmax (`mask_padded_logits`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from xlmr_mp.parallel.layers import copy_to_tp, reduce_from_tp, reduce_scatter_sequence, tp_rank_of, tp_size_of


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
    -inf, so they are never predicted and carry no gradient."""
    n_real = vocab_size - vocab_start
    if n_real >= logits.shape[-1]:
        return logits
    keep = torch.arange(logits.shape[-1], device=logits.device) < n_real
    return logits.masked_fill(~keep, float("-inf"))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy from logit shards (Megatron's algorithm, explicit group, ignore_index)."""

    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, ignore_index):
        logits = logits.float()
        tp = tp_size_of(group)
        logits_max = logits.max(dim=-1).values
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
                                 vocab_start: int = 0, ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss [N] (0 where target == ignore_index) from local logits [N, V/TP] whose
    columns are global ids [vocab_start, vocab_start + V/TP). Equals F.cross_entropy(full logits,
    target, ignore_index, reduction='none') in value and gradient, without gathering the logits.
    Computed in fp32; the gradient has the logits' dtype cast back by autograd."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, V_local] and target [N]; got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group, vocab_start, ignore_index)
