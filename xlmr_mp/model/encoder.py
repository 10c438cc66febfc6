"""The post-LayerNorm XLM-R / RoBERTa encoder layer, tensor-parallel Megatron style.

    x = LN(x + Dropout(Attn(x)))      attention: QKV column-parallel, output row-parallel
    x = LN(x + Dropout(FFN(x)))       FFN: fc1 column-parallel, exact GELU, fc2 row-parallel

Activations are batch-first [B, S, H] (replicated on every TP rank); inside the attention and the
FFN they are sharded over heads / FFN columns. No collective is called here: the all-reduces live
in the parallel layers (xlmr_mp.parallel.layers).

QKV weight layout (global, [3H, H]): Megatron's per-head interleave, row (h * 3 + j) * D + d for
head h, j in (q, k, v), d < D = H / heads; a contiguous split by rows then gives each TP rank whole
heads. The HF name map (xlmr_mp.checkpoint.hf) converts from/to HF's separate query/key/value.

These modules are the reference: plain torch and megatron-core TP layers, no device or kernel
branch. Their elementwise ops are class attributes (`bias_gelu`, `bias_dropout_add_layernorm`,
`attend`; model/functional.py) and the attention context and the layer's forward are methods:
`xlmr_mp.kernels.apply` may replace them on an instance by fused implementations of the same contract.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from xlmr_mp.model import functional
from xlmr_mp.model.config import ModelConfig
from xlmr_mp.parallel.layers import check_divisible, column_parallel_linear, mark_sequence_parallel, row_parallel_linear
from xlmr_mp.parallel.mappings import tp_size_of
from xlmr_mp.parallel.state import RecomputeRNG, tp_rng_context


# The additive bias at padding keys in half precision: Megatron's -10000. exp() of it underflows to 0
# as of finfo.min, and it stays finite when a score is added to it in the dtype itself (fp16's
# finfo.min minus any score above 16 is -inf, and a fully padded row of -inf gives NaN).
HALF_PADDING_BIAS = -1e4


def padding_bias_value(dtype: torch.dtype) -> float:
    """The additive attention bias of a padding key in `dtype`: finfo.min in fp32 / fp64 (as HF
    builds it), HALF_PADDING_BIAS in fp16 / bf16; finite in every dtype."""
    if dtype in (torch.float16, torch.bfloat16):
        return HALF_PADDING_BIAS
    return torch.finfo(dtype).min


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the attention scores of activations like x are computed in: the autocast dtype
    of x's device type when autocast is on there, x's dtype otherwise."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def attention_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive key-padding bias [B, 1, 1, S] in `dtype` from a [B, S] mask (1 = real token): 0 at
    real keys, padding_bias_value(dtype) at padding keys (finite, so fully padded rows stay finite)."""
    if attention_mask is None:
        return None
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * padding_bias_value(dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the local heads; `attend(q, k, v, bias, scale, dropout_p)`
    is scaled_dot_product_attention (flash or memory-efficient kernels on GPUs that have them, the
    math path elsewhere)."""

    attend = staticmethod(functional.attention)

    def __init__(self, cfg: ModelConfig, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        tp = tp_size_of(tp_group)
        self.tp_size = tp
        self.local_heads = check_divisible(cfg.num_heads, tp, "model.num_heads")
        check_divisible(cfg.hidden_size, tp, "model.hidden_size")
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.attention_dropout = cfg.attention_dropout
        self.selective_recompute = False
        self.qkv = column_parallel_linear(cfg.hidden_size, 3 * cfg.hidden_size, tp_group,
                                          option="3 x model.hidden_size", sequence_parallel=sequence_parallel)
        self.out = row_parallel_linear(cfg.hidden_size, cfg.hidden_size, tp_group, option="model.hidden_size",
                                       sequence_parallel=sequence_parallel)

    def core(self, q, k, v, bias):
        """softmax(q k^T / sqrt(D) + bias) v with attention dropout; q, k, v [B, heads, S, D]."""
        p = self.attention_dropout if self.training else 0.0
        with tp_rng_context(self.tp_size):  # heads differ per TP rank: sharded-region RNG stream
            return self.attend(q, k, v, bias, 1.0 / math.sqrt(self.head_dim), p)

    # Eager under train.compile (a graph break around it): dynamo cannot trace checkpoint's custom
    # context_fn (the RNG-stream replay), and the recomputed region is attention alone.
    @torch.compiler.disable
    def recomputed_core(self, q, k, v, bias):
        """core() under activation checkpointing (train.recompute=selective): the scores and
        probabilities are recomputed in backward, with the same dropout masks (RecomputeRNG)."""
        return checkpoint(self.core, q, k, v, bias, use_reentrant=False, context_fn=RecomputeRNG())

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None):
        """x [B, S, H] (sequence parallel: [B, S/TP, H]) -> (output before its bias, same shape as
        x, output bias)."""
        qkv, qkv_bias = self.qkv(x)
        B, S = qkv.shape[:2]
        if qkv_bias is not None:
            qkv = qkv + qkv_bias
        qkv = qkv.view(B, S, self.local_heads, 3, self.head_dim)
        return self.out(self.context(qkv, bias))

    def context(self, qkv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Attention of the local heads: qkv [B, S, heads, 3, D] (per-head interleaved q, k, v),
        key-padding bias [B, 1, 1, S] | None -> context [B, S, heads * D], the output projection's input."""
        B, S = qkv.shape[:2]
        recompute = self.selective_recompute and torch.is_grad_enabled()
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=3))  # each [B, heads, S, D]
        if bias is not None and bias.dtype != q.dtype:  # a bias built in another dtype: padding stays finite
            bias = torch.where(bias < 0, padding_bias_value(q.dtype), 0.0).to(q.dtype)
        if recompute:
            ctx = self.recomputed_core(q, k, v, bias)
        else:
            ctx = self.core(q, k, v, bias)
        return ctx.transpose(1, 2).reshape(B, S, self.local_heads * self.head_dim)


class FeedForward(nn.Module):
    """fc1 (column-parallel) -> exact GELU (`bias_gelu`, with fc1's bias) -> fc2 (row-parallel)."""

    bias_gelu = staticmethod(functional.bias_gelu)

    def __init__(self, cfg: ModelConfig, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        check_divisible(cfg.ffn_size, tp_size_of(tp_group), "model.ffn_size")
        self.fc1 = column_parallel_linear(cfg.hidden_size, cfg.ffn_size, tp_group, option="model.ffn_size",
                                          sequence_parallel=sequence_parallel)
        self.fc2 = row_parallel_linear(cfg.ffn_size, cfg.hidden_size, tp_group, option="model.ffn_size",
                                       sequence_parallel=sequence_parallel)

    def forward(self, x):
        h, b = self.fc1(x)
        return self.fc2(self.bias_gelu(h, b))


class EncoderLayer(nn.Module):
    """One post-LN transformer layer; forward(x [B, S, H], bias [B, 1, 1, S] | None) -> [B, S, H].
    With sequence parallelism x and the output are sequence shards [B, S/TP, H] (bias stays full),
    and the hidden dropout, now on a TP-sharded region, draws from the tensor-parallel RNG stream.
    Each sublayer ends in `bias_dropout_add_layernorm` (model/functional.py)."""

    bias_dropout_add_layernorm = staticmethod(functional.bias_dropout_add_layernorm)

    def __init__(self, cfg: ModelConfig, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        self.dropout = cfg.dropout
        self.eps = cfg.layernorm_eps
        self.sequence_parallel = sequence_parallel and tp_size_of(tp_group) > 1
        self.tp_size = tp_size_of(tp_group)
        self.attention = SelfAttention(cfg, tp_group, self.sequence_parallel)
        self.attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.ffn = FeedForward(cfg, tp_group, self.sequence_parallel)
        self.ffn_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        if self.sequence_parallel:
            mark_sequence_parallel(self.attention_layernorm)
            mark_sequence_parallel(self.ffn_layernorm)

    def _epilogue(self, y, y_bias, residual, ln):
        if self.sequence_parallel and self.training and self.dropout > 0:
            with tp_rng_context(self.tp_size):
                return self.bias_dropout_add_layernorm(y, y_bias, residual, ln.weight, ln.bias, self.dropout,
                                                       self.training, self.eps)
        return self.bias_dropout_add_layernorm(y, y_bias, residual, ln.weight, ln.bias, self.dropout,
                                               self.training, self.eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        a, a_bias = self.attention(x, bias)
        x = self._epilogue(a, a_bias, x, self.attention_layernorm)
        f, f_bias = self.ffn(x)
        return self._epilogue(f, f_bias, x, self.ffn_layernorm)
