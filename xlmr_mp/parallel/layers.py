"""Column- and row-parallel linear layers: megatron-core's `ColumnParallelLinear` /
`RowParallelLinear` when the TP group has more than one rank, a plain linear with the same
parameter names and call convention otherwise.

Both return `(output, bias)` with the bias NOT added (megatron's `skip_bias_add=True`), so the
caller fuses it into the next op (`ops.bias_gelu`, `ops.bias_dropout_add_layernorm`). The bias
comes back in the output's dtype (`bias_like`): under bf16 / fp16 autocast the product is in the
compute dtype while the bias parameter stays fp32, and adding the fp32 bias would promote the
activation (the QKV output, the FFN intermediate) back to fp32.
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
(`finalize_grads`, before clipping). The autograd mappings between regions: `parallel/mappings.py`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from xlmr_mp.errors import ConfigError
from xlmr_mp.parallel.mappings import gather_sequence, reduce_scatter_sequence, tp_size_of
from xlmr_mp.parallel.megatron_import import megatron_module


def check_divisible(value: int, tp: int, option: str) -> int:
    """value / tp, or a ConfigError naming `option` when it does not divide."""
    if value % tp:
        raise ConfigError(f"{option}={value} is not divisible by parallel.tensor={tp}; change "
                          f"{option} or parallel.tensor")
    return value // tp


def megatron_config(params_dtype=torch.float32, sequence_parallel: bool = False):
    """The megatron-core ModelParallelConfig our layers are built with (CPU allocation, no init)."""
    ModelParallelConfig = megatron_module("megatron.core.model_parallel_config").ModelParallelConfig
    return ModelParallelConfig(use_cpu_initialization=True, perform_initialization=False,
                               params_dtype=params_dtype, sequence_parallel=sequence_parallel)


def _no_init(_):
    return None


def bias_like(bias, out: torch.Tensor):
    """The skipped bias in the dtype of the layer's output `out` (a differentiable cast, so the fp32
    parameter still gets an fp32 gradient): under autocast the product is bf16 / fp16 and the fp32
    bias would promote `out + bias` to fp32 (megatron-core likewise casts what it adds to the
    activation's dtype). The bias itself where the dtypes agree (fp32 training: nothing changes)."""
    if bias is None or bias.dtype == out.dtype:
        return bias
    return bias.to(out.dtype)


class _LocalLinear(nn.Module):
    """Single-rank linear with megatron's (output, bias) return convention."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x):
        out = F.linear(x, self.weight)
        return out, bias_like(self.bias, out)


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

        def forward(self, *args, **kwargs):
            out, bias = super().forward(*args, **kwargs)
            return out, bias_like(bias, out)

    Layer.__name__ = Layer.__qualname__ = cls.__name__
    return Layer


_CLASSES: dict = {}


def _column_cls():
    if "column" not in _CLASSES:
        layers = megatron_module("megatron.core.tensor_parallel.layers")
        _CLASSES["column"] = _without_extra_state(layers.ColumnParallelLinear)
    return _CLASSES["column"]


def _row_cls():
    if "row" not in _CLASSES:
        layers = megatron_module("megatron.core.tensor_parallel.layers")
        _CLASSES["row"] = _without_extra_state(layers.RowParallelLinear)
    return _CLASSES["row"]


class SequenceParallelColumnLinear(nn.Module):
    """Column-parallel linear whose input is a sequence shard [B, S/TP, in]; output [B, S, out/TP]."""

    def __init__(self, in_features: int, out_local: int, tp_group, bias: bool = True):
        super().__init__()
        self.tp_group = tp_group
        self.weight = nn.Parameter(torch.empty(out_local, in_features))
        self.bias = nn.Parameter(torch.empty(out_local)) if bias else None

    def forward(self, x):
        out = F.linear(gather_sequence(x, self.tp_group), self.weight)
        return out, bias_like(self.bias, out)


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
        out = reduce_scatter_sequence(F.linear(x, self.weight), self.tp_group)
        return out, bias_like(self.bias, out)


def mark_sequence_parallel(module: nn.Module) -> None:
    """Mark every parameter of `module` as used on sequence shards (partial gradients)."""
    for p in module.parameters():
        p.sequence_parallel = True

