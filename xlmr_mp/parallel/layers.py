"""Column- and row-parallel linear layers: megatron-core's `ColumnParallelLinear` /
`RowParallelLinear` when the TP group has more than one rank, a plain linear with the same
parameter names and call convention otherwise.

Both return `(output, bias)` with the bias NOT added (megatron's `skip_bias_add=True`), so the
caller fuses it into the next op (`ops.bias_gelu`, `ops.bias_dropout_add_layernorm`).
Weights are created empty; `XLMRModel.reset_parameters` fills them from full-size tensors, so the
initial model is the same at every TP size.
Activations may be batch-first [B, S, H]: without sequence parallelism megatron's layers only
touch the last dimension.

Sequence parallelism (Korthikanti et al. 2022): between the TP-sharded regions activations are
split along the sequence, [B, S/TP, H]; the column-parallel layer all-gathers the sequence
(reduce-scatter of the gradient), the row-parallel layer reduce-scatters its output (all-gather of
the gradient). megatron-core's sequence-parallel path allocates its buffers on CUDA, so these
layers are ours (same parameter names and shapes). Parameters used on sequence shards (LayerNorms,
row-parallel biases, position embeddings) get partial gradients: they are marked
`param.sequence_parallel = True`; `xlmr_mp/parallel/grads.py` sums them over the TP group
(`finalize_grads`, before clipping).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from xlmr_mp.errors import ConfigError


def tp_size_of(group: Optional[dist.ProcessGroup]) -> int:
    """Number of ranks of a TP group (1 for None)."""
    return 1 if group is None else group.size()


def tp_rank_of(group: Optional[dist.ProcessGroup]) -> int:
    return 0 if group is None else group.rank()


def check_divisible(value: int, tp: int, option: str) -> int:
    """value / tp, or a ConfigError naming `option` when it does not divide."""
    if value % tp:
        raise ConfigError(f"{option}={value} is not divisible by parallel.tensor={tp}; change "
                          f"{option} or parallel.tensor")
    return value // tp


def megatron_config(params_dtype=torch.float32, sequence_parallel: bool = False):
    """The megatron-core ModelParallelConfig our layers are built with (CPU allocation, no init)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.model_parallel_config import ModelParallelConfig
    return ModelParallelConfig(use_cpu_initialization=True, perform_initialization=False,
                               params_dtype=params_dtype, sequence_parallel=sequence_parallel)


def _no_init(_):
    return None


class _LocalLinear(nn.Module):
    """Single-rank linear with megatron's (output, bias) return convention."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight), self.bias


def column_parallel_linear(in_features: int, out_features: int, tp_group=None, bias: bool = True,
                           option: str = "output size", sequence_parallel: bool = False) -> nn.Module:
    """Y = X A^T with A split by output rows across TP ranks; output stays sharded."""
    tp = tp_size_of(tp_group)
    check_divisible(out_features, tp, option)
    if tp == 1:
        return _LocalLinear(in_features, out_features, bias)
    if sequence_parallel:
        return SequenceParallelColumnLinear(in_features, out_features // tp, tp_group, bias)
    return _column_cls()(in_features, out_features, config=megatron_config(),
                                init_method=_no_init, bias=bias, gather_output=False,
                                skip_bias_add=True, tp_group=tp_group)


def row_parallel_linear(in_features: int, out_features: int, tp_group=None, bias: bool = True,
                        option: str = "input size", sequence_parallel: bool = False) -> nn.Module:
    """Y = X A^T with A split by input columns; input sharded, output all-reduced (bias replicated)."""
    tp = tp_size_of(tp_group)
    check_divisible(in_features, tp, option)
    if tp == 1:
        return _LocalLinear(in_features, out_features, bias)
    if sequence_parallel:
        return SequenceParallelRowLinear(in_features // tp, out_features, tp_group, bias)
    return _row_cls()(in_features, out_features, config=megatron_config(),
                             init_method=_no_init, bias=bias, input_is_parallel=True,
                             skip_bias_add=True, tp_group=tp_group)


def _without_extra_state(cls):
    """Subclass of a megatron-core layer whose state_dict has no `_extra_state` entries (they are
    always None without Transformer Engine) so parameter names match the TP=1 model exactly."""

    class Layer(cls):
        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._load_state_dict_pre_hooks.clear()

    Layer.__name__ = Layer.__qualname__ = cls.__name__
    return Layer


_CLASSES: dict = {}


def _column_cls():
    if "column" not in _CLASSES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.tensor_parallel.layers import ColumnParallelLinear
        _CLASSES["column"] = _without_extra_state(ColumnParallelLinear)
    return _CLASSES["column"]


def _row_cls():
    if "row" not in _CLASSES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.tensor_parallel.layers import RowParallelLinear
        _CLASSES["row"] = _without_extra_state(RowParallelLinear)
    return _CLASSES["row"]


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


class SequenceParallelColumnLinear(nn.Module):
    """Column-parallel linear whose input is a sequence shard [B, S/TP, in]; output [B, S, out/TP]."""

    def __init__(self, in_features: int, out_local: int, tp_group, bias: bool = True):
        super().__init__()
        self.tp_group = tp_group
        self.weight = nn.Parameter(torch.empty(out_local, in_features))
        self.bias = nn.Parameter(torch.empty(out_local)) if bias else None

    def forward(self, x):
        return F.linear(gather_sequence(x, self.tp_group), self.weight), self.bias


class SequenceParallelRowLinear(nn.Module):
    """Row-parallel linear with output reduce-scattered to a sequence shard [B, S/TP, out]."""

    def __init__(self, in_local: int, out_features: int, tp_group, bias: bool = True):
        super().__init__()
        self.tp_group = tp_group
        self.weight = nn.Parameter(torch.empty(out_features, in_local))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        if self.bias is not None:
            self.bias.sequence_parallel = True

    def forward(self, x):
        return reduce_scatter_sequence(F.linear(x, self.weight), self.tp_group), self.bias


def mark_sequence_parallel(module: nn.Module) -> None:
    """Mark every parameter of `module` as used on sequence shards (partial gradients)."""
    for p in module.parameters():
        p.sequence_parallel = True

