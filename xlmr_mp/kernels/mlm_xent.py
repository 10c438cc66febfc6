"""Masked-LM cross-entropy on a vocabulary shard (tensor parallel LM head).

Rank t of a TP group holds the rows [vocab_start, vocab_start + V_t) of the output embedding.
For the M masked tokens' final hidden states h [M, D] it needs, per token, the logsumexp over its
shard's logits and the target logit (when it owns the target); shards then combine:
lse = logsumexp_t(lse_t), loss = lse - target_logit. Three implementations of the local part:

* `shard_xent_stats_ref`: the plain composition (full [M, V_t] fp32 logits), the spec;
* `shard_xent_stats_chunked`: the same in torch over vocabulary chunks, never holding more than
  [M, chunk] fp32 logits (the reference path of `mlm_cross_entropy`, forward and backward);
* the fused kernel (csrc/cuda/mlm_xent.cuh): one pass over the [M, V_t] low-precision logits for
  max / sum-exp / target logit, and a backward that overwrites those logits with their gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from xlmr_mp.kernels import dispatch

DEFAULT_CHUNK = 8192


def local_targets(target: torch.Tensor, vocab_start: int, local_vocab: int) -> torch.Tensor:
    """Global target ids -> column in this shard, or -1 where another shard owns the id."""
    t = target.long() - vocab_start
    return torch.where((t >= 0) & (t < local_vocab), t, torch.full_like(t, -1))


def shard_xent_stats_ref(hidden, weight, bias, target, vocab_start: int = 0):
    """Plain composition: logits = hidden @ weight.T + bias (input dtype) in fp32, then the local
    logsumexp [M] and target logit [M] (0 where the target is not in this shard)."""
    logits = F.linear(hidden, weight, bias).float()
    lse = torch.logsumexp(logits, dim=-1)
    t = local_targets(target, vocab_start, weight.shape[0])
    tl = logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
    return lse, torch.where(t >= 0, tl, torch.zeros_like(tl))


def _chunked_stats(hidden, weight, bias, t_local, chunk):
    M, V = hidden.shape[0], weight.shape[0]
    m = torch.full((M,), float("-inf"), device=hidden.device)
    s = torch.zeros(M, device=hidden.device)
    tl = torch.zeros(M, device=hidden.device)
    rows = torch.arange(M, device=hidden.device)
    for c0 in range(0, V, chunk):
        c1 = min(V, c0 + chunk)
        lc = F.linear(hidden, weight[c0:c1], None if bias is None else bias[c0:c1]).float()  # [M, c]
        new_m = torch.maximum(m, lc.max(dim=1).values)
        s = s * torch.exp(m - new_m) + torch.exp(lc - new_m[:, None]).sum(dim=1)
        m = new_m
        inside = (t_local >= c0) & (t_local < c1)
        tl = torch.where(inside, lc[rows, (t_local - c0).clamp(0, c1 - c0 - 1)], tl)
    return m + torch.log(s), tl


def shard_xent_stats_chunked(hidden, weight, bias, target, vocab_start: int = 0,
                             chunk: int = DEFAULT_CHUNK):
    """Same result as shard_xent_stats_ref, over vocabulary chunks of `chunk` rows of weight:
    at most [M, chunk] fp32 logits exist at a time (online max / sum-exp)."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    return _chunked_stats(hidden, weight, bias, local_targets(target, vocab_start, weight.shape[0]), chunk)


def shard_xent_grad_ref(logits, t_local, lse, grad):
    """dL/dlogits of loss = lse - logits[target] (what the fused backward writes in place):
    grad[:, None] * (exp(logits - lse[:, None]) - onehot(t_local)), t_local = -1: no onehot."""
    p = torch.exp(logits.float() - lse[:, None])
    rows = torch.nonzero(t_local >= 0).squeeze(1)
    p[rows, t_local[rows]] -= 1.0
    return (p * grad.float()[:, None]).to(logits.dtype)


def combine_shard_stats(lse_local: torch.Tensor, target_logit: torch.Tensor, group=None):
    """(global logsumexp, global target logit) from every shard's local ones (all-reduce over
    `group`; identity without a group or at TP=1)."""
    if group is None or dist.get_world_size(group) == 1:
        return lse_local, target_logit
    gmax = lse_local.clone()
    dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
    s = torch.exp(lse_local - gmax)
    dist.all_reduce(s, group=group)
    tl = target_logit.clone()
    dist.all_reduce(tl, group=group)
    return gmax + torch.log(s), tl


class _ShardCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, vocab_start, group, chunk, fused):
        t_local = local_targets(target, vocab_start, weight.shape[0])
        logits = None
        if fused:
            from xlmr_mp.kernels import fused as fk
            logits = F.linear(hidden, weight, bias)  # [M, V_t] in the input dtype; no fp32 copy
            lse_l, tl = fk.mlm_xent_stats(logits, t_local)
        else:
            lse_l, tl = _chunked_stats(hidden, weight, bias, t_local, chunk)
        lse, tl = combine_shard_stats(lse_l, tl, group)
        ctx.save_for_backward(hidden, weight, bias, t_local, lse, logits)
        ctx.chunk, ctx.fused, ctx.done = chunk, fused, False
        return lse - tl

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, t_local, lse, logits = ctx.saved_tensors
        g = grad.float()
        if ctx.fused:
            if ctx.done:
                raise RuntimeError("mlm_cross_entropy (fused) overwrote its logits with their gradient "
                                   "in the first backward; it cannot run backward twice")
            ctx.done = True
            from xlmr_mp.kernels import fused as fk
            gl = fk.mlm_xent_grad_(logits, t_local, lse, g)  # in place: logits now hold dL/dlogits
            gh = gl @ weight
            gw = gl.t() @ hidden
            gb = None if bias is None else gl.sum(0, dtype=torch.float32).to(bias.dtype)
            return gh, gw, gb, None, None, None, None, None
        M, V = hidden.shape[0], weight.shape[0]
        gh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        gw = torch.empty_like(weight)
        gb = None if bias is None else torch.empty_like(bias)
        rows = torch.arange(M, device=hidden.device)
        for c0 in range(0, V, ctx.chunk):
            c1 = min(V, c0 + ctx.chunk)
            lc = F.linear(hidden, weight[c0:c1], None if bias is None else bias[c0:c1]).float()
            p = torch.exp(lc - lse[:, None])
            inside = (t_local >= c0) & (t_local < c1)
            p[rows[inside], t_local[inside] - c0] -= 1.0
            gc = p * g[:, None]  # [M, c] fp32
            gh += gc @ weight[c0:c1].float()
            gc_low = gc.to(weight.dtype)
            gw[c0:c1] = gc_low.t() @ hidden
            if gb is not None:
                gb[c0:c1] = gc.sum(0).to(bias.dtype)
        return gh.to(hidden.dtype), gw, gb, None, None, None, None, None


def mlm_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      target: torch.Tensor, vocab_start: int = 0, group=None,
                      chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Per-token cross-entropy [M] (fp32) of the masked tokens against their target ids.

    hidden [M, D]: final hidden states of the masked tokens (after the LM-head transform);
    weight [V_t, D], bias [V_t]: this rank's vocabulary shard, covering global ids
    [vocab_start, vocab_start + V_t); target [M]: global ids in [0, vocab) (drop ignored positions
    before the call); group: the TP process group (None at TP=1).
    The gradient returned for `hidden` is this shard's partial sum; the caller all-reduces it over
    the TP group (megatron's copy-to-tensor-parallel-region before the LM head does exactly that).
    Runs the fused CUDA kernel when dispatch.use_fused(hidden, "mlm_xent"), else the chunked torch
    reference (never more than [M, chunk] fp32 logits)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"mlm_cross_entropy: hidden [M, D] and weight [V_t, D] expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if target.shape != hidden.shape[:1]:
        raise ValueError(f"mlm_cross_entropy: target must be [M]={hidden.shape[0]}, got {tuple(target.shape)}")
    if chunk <= 0:
        raise ValueError(f"mlm_cross_entropy: chunk must be positive, got {chunk}")
    fused = dispatch.use_fused(hidden, "mlm_xent")
    return _ShardCrossEntropy.apply(hidden, weight, bias, target, int(vocab_start), group, int(chunk), fused)
