"""Autograd mappings between tensor-parallel regions (megatron-core's `tensor_parallel/mappings.py`):

    copy_to_tp(x)               identity forward, all-reduce of the gradient (enter a TP region)
    reduce_from_tp(x)           all-reduce forward, identity backward (leave a TP region)
    gather_sequence(x)          [B, S/TP, ...] -> [B, S, ...]; backward reduce-scatters or splits
    reduce_scatter_sequence(x)  partial sums [B, S, ...] -> summed shard [B, S/TP, ...]; backward all-gathers

Each is the identity at TP 1 (a None group). Activations are batch-first, so the sequence is dim 1.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def tp_size_of(group: Optional[dist.ProcessGroup]) -> int:
    """Number of ranks of a TP group (1 for None)."""
    return 1 if group is None else group.size()


def tp_rank_of(group: Optional[dist.ProcessGroup]) -> int:
    return 0 if group is None else group.rank()


# ----------------------------------------------------------------------------- TP region mappings
# (megatron-core's versions all-reduce `x.contiguous()` and return `x`, which silently drops the
# reduction for non-contiguous gradients; these return the reduced tensor.)

def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient across the TP group backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward; identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a TP-sharded region from a replicated activation."""
    return x if tp_size_of(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Sum partial results of a TP-sharded region into a replicated activation."""
    return x if tp_size_of(group) == 1 else _ReduceFromTP.apply(x, group)


# ----------------------------------------------------------------------------- sequence parallelism

SEQ_DIM = 1  # batch-first activations [B, S, H]


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    tp = group.size()
    if dist.get_backend(group) == "gloo":  # gloo has no reduce_scatter: all-reduce, keep our chunk
        return _all_reduce(x, group).chunk(tp, dim=SEQ_DIM)[group.rank()].contiguous()
    chunks = [c.contiguous() for c in x.chunk(tp, dim=SEQ_DIM)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    return out


def _all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group.size())]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=SEQ_DIM)


def _split_seq(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(group.size(), dim=SEQ_DIM)[group.rank()].contiguous()


class _GatherSeq(torch.autograd.Function):
    """All-gather the sequence; backward reduce-scatters (reduce=True) or splits the gradient."""

    @staticmethod
    def forward(ctx, x, group, reduce_grad):
        ctx.group, ctx.reduce_grad = group, reduce_grad
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        g = _reduce_scatter_seq(grad, ctx.group) if ctx.reduce_grad else _split_seq(grad, ctx.group)
        return g, None, None


class _ReduceScatterSeq(torch.autograd.Function):
    """Reduce-scatter partial sums along the sequence; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None


def gather_sequence(x: torch.Tensor, group, grad_is_partial: bool = True) -> torch.Tensor:
    """[B, S/TP, ...] -> [B, S, ...]. `grad_is_partial`: the consumer's gradient differs per rank
    (a column-parallel layer) and is reduce-scattered; else it is replicated and just split."""
    return _GatherSeq.apply(x, group, grad_is_partial)


def reduce_scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Partial sums [B, S, ...] -> summed sequence shard [B, S/TP, ...]."""
    return _ReduceScatterSeq.apply(x, group)
