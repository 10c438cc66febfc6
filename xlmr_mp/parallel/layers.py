"""Column- and row-parallel linear layers: megatron-core's `ColumnParallelLinear` /
`RowParallelLinear` when the TP group has more than one rank, a plain linear with the same
parameter names and call convention otherwise.

Both return `(output, bias)` with the bias NOT added (megatron's `skip_bias_add=True`), so the
caller fuses it into the next op (`ops.bias_gelu`, `ops.bias_dropout_add_layernorm`).
Weights are created empty; `XLMRModel.reset_parameters` fills them from full-size tensors, so the
initial model is the same at every TP size.
Activations may be batch-first [B, S, H]: without sequence parallelism megatron's layers only
touch the last dimension.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def tp_size_of(group: Optional[dist.ProcessGroup]) -> int:
    """Number of ranks of a TP group (1 for None)."""
    return 1 if group is None else group.size()


def tp_rank_of(group: Optional[dist.ProcessGroup]) -> int:
    return 0 if group is None else group.rank()


def check_divisible(value: int, tp: int, option: str) -> int:
    """value / tp, or a ConfigError naming `option` when it does not divide."""
    from xlmr_mp.config import ConfigError
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
    return _column_cls()(in_features, out_features, config=megatron_config(sequence_parallel=sequence_parallel),
                                init_method=_no_init, bias=bias, gather_output=False,
                                skip_bias_add=True, tp_group=tp_group)


def row_parallel_linear(in_features: int, out_features: int, tp_group=None, bias: bool = True,
                        option: str = "input size", sequence_parallel: bool = False) -> nn.Module:
    """Y = X A^T with A split by input columns; input sharded, output all-reduced (bias replicated)."""
    tp = tp_size_of(tp_group)
    check_divisible(in_features, tp, option)
    if tp == 1:
        return _LocalLinear(in_features, out_features, bias)
    return _row_cls()(in_features, out_features, config=megatron_config(sequence_parallel=sequence_parallel),
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
