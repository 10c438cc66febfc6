"""References of the fused masked-LM rows (the registered ops of kernels/mlm_xent_op.py:
`mlm_xent_stats`, `mlm_xent_grad_`; CUDA keys csrc/cuda/mlm_xent.cuh), which run inside the one
masked-LM loss, parallel/vocab.py's `vocab_parallel_masked_lm_loss`, where XLMR_MP_KERNELS
dispatches them.

For the masked tokens' final hidden states h [M, D] and rank t's vocabulary shard [vocab_start,
vocab_start + V_t) of the decoder: the local logsumexp and target logit of every row
(`xent_stats_ref` of the shard logits, `shard_xent_stats_ref` from h), the gradient of
loss = lse - logits[target] that the fused backward writes over the logits in place
(`shard_xent_grad_ref`), and both at once for one shard (TP = 1: `xent_rows_ref`, the CPU rows).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def local_targets(target: torch.Tensor, vocab_start: int, local_vocab: int) -> torch.Tensor:
    """Global target ids [M] -> int64 column in this shard [vocab_start, vocab_start + local_vocab),
    or -1 where another shard owns the id (also the rows of the loss's torch path, parallel/vocab.py)."""
    t = target.long() - vocab_start
    return torch.where((t >= 0) & (t < local_vocab), t, torch.full_like(t, -1))


def xent_stats_ref(logits, t_local):
    """(lse [M], target logit [M]) of shard logits [M, V] in fp32, the target logit 0 where
    t_local = -1 (the target is in another shard)."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    tl = lf.gather(1, t_local.clamp(min=0)[:, None]).squeeze(1)
    return lse, torch.where(t_local >= 0, tl, torch.zeros_like(tl))


def shard_xent_stats_ref(hidden, weight, bias, target, vocab_start: int = 0):
    """Plain composition: logits = hidden @ weight.T + bias (input dtype), then `xent_stats_ref`
    with the global targets [M] mapped into this shard."""
    return xent_stats_ref(F.linear(hidden, weight, bias), local_targets(target, vocab_start, weight.shape[0]))


def xent_rows_ref(logits, target):
    """(loss [M] fp32, softmax - onehot [M, V] in logits' dtype) of each row of logits [M, V],
    shifted by the row's max m as the loss's torch rows are: loss = log(sum(exp(row - m))) -
    (row[target] - m), that is logsumexp(row) - row[target], with no target term (and no onehot)
    where target is outside [0, V) (what the AVX2 kernel csrc/xent_cpu.cpp computes, in fp32)."""
    lf = logits.float()
    shifted = lf - lf.amax(dim=-1, keepdim=True)
    inside = (target >= 0) & (target < logits.shape[1])
    col = torch.where(inside, target, torch.zeros_like(target))[:, None]
    tl = torch.where(inside, shifted.gather(1, col).squeeze(1), shifted.new_zeros(()))
    e = shifted.exp()
    s = e.sum(dim=-1)
    grad = (e / s[:, None]).scatter_add(1, col, -inside.to(lf.dtype)[:, None])
    return s.log() - tl, grad.to(logits.dtype)


def shard_xent_grad_ref(logits, t_local, lse, grad):
    """dL/dlogits of loss = lse - logits[target] (what the fused backward writes in place):
    grad[:, None] * (exp(logits - lse[:, None]) - onehot(t_local)), t_local = -1: no onehot."""
    p = torch.exp(logits.float() - lse[:, None])
    rows = torch.nonzero(t_local >= 0).squeeze(1)
    p[rows, t_local[rows]] -= 1.0
    return (p * grad.float()[:, None]).to(logits.dtype)
