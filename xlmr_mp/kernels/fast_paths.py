"""`apply(model, device, compile=...)`: the fused paths and compilation put on a built model from
outside, in one call the trainer makes once (as torchtitan applies parallelism and compilation), so
that the model itself (model/) stays the plain-torch reference and the pipeline schedule knows no
kernel.

What it installs, on the instances of the model's modules (no class is changed, parameters and
their names are untouched):

- on every device, the fused ops of kernels/ops.py in the model's op slots: `bias_gelu` (FFN and
  MLM head), `bias_dropout_add_layernorm` (each sublayer's epilogue) and `attend` (the attention
  core: the fused masked softmax where `ops.attention_uses_masked_softmax`); each runs its fused
  kernel where `dispatch` says so for the tensor at hand and the model's reference otherwise;
- on a CPU, the C++ nodes, each in place of a module method and each falling back to that method
  where its own check (`applies`, read at every call: fp32, TP = 1, the switch, ...) is False:
  `XLMRModel.encode_layers` -> the stage's layers as one node (encoder_layer_cpu.stack_forward),
  `EncoderLayer.forward` -> one layer as one node (under full recompute),
  `SelfAttention.context` -> the fused attention kernel (attention_cpu),
  `Embeddings.forward` -> embeddings_cpu, `MLMHead.masked_loss_sum` -> mlm_head_cpu (the head and
  the loss over the masked rows as one node; the one masked-LM loss's CPU implementation);
- with `compile=True` (the run's `train.compile`), after the above: torch.compile of each encoder
  layer and of the masked-LM head's transform, in place (parallel/compile.py's `compile_chunks`, the
  compile wiring; the compiled graphs trace the installed ops, the C++ nodes stepping aside while
  tracing as `dispatch.cpu_kernels` says).

`apply` returns an `AppliedKernels`: what it applied, and `micro_batch()`, the context a training
schedule runs each micro-batch's forward in (`cpu_fast_path.gradients_into_grad` where the C++
nodes are applied: they may then add parameter gradients to .grad without autograd edges).
"""
from __future__ import annotations

import contextlib
import math
import types
from dataclasses import dataclass
from typing import Iterable, Union

import torch
from torch import nn

from xlmr_mp.kernels import attention_cpu, embeddings_cpu, encoder_layer_cpu, mlm_head_cpu, ops
from xlmr_mp.kernels.cpu_fast_path import gradients_into_grad
from xlmr_mp.model.encoder import EncoderLayer, FeedForward, SelfAttention
from xlmr_mp.model.xlmr import Embeddings, MLMHead, XLMRModel
from xlmr_mp.parallel import compile as parallel_compile
from xlmr_mp.parallel.vocab import mlm_loss_chunk_rows, real_rows

FUSED_OPS = ("bias_gelu", "bias_dropout_add_layernorm", "attention")
CPU_NODES = ("encoder_stack_cpu", "encoder_layer_cpu", "attention_cpu", "embeddings_cpu", "mlm_head_cpu")


def fast_paths(device_type: str) -> tuple:
    """The names `apply` installs on a model on a device of `device_type` ("cpu", "cuda", ...):
    the fused ops everywhere, the C++ nodes on a CPU only."""
    return FUSED_OPS + (CPU_NODES if device_type == "cpu" else ())


@dataclass(frozen=True)
class AppliedKernels:
    """What `apply` installed (names of `fast_paths`, then "compile" where it compiled) and on how
    many modules; `compiled`: how many modules torch.compile wraps (0: not compiled)."""
    applied: tuple
    modules: int
    compiled: int = 0

    def micro_batch(self):
        """The context manager a schedule runs one micro-batch's forward in, its backward being
        Tensor.backward() right after (cpu_fast_path.gradients_into_grad's promise) where the C++
        nodes are applied; a null context otherwise."""
        return gradients_into_grad() if "encoder_stack_cpu" in self.applied else contextlib.nullcontext()

    def __str__(self) -> str:
        text = f"kernels applied to {self.modules} modules: {', '.join(self.applied) or 'none'}"
        return text + (f"; torch.compile on {self.compiled} modules" if self.compiled else "")


# ----------------------------------------------------------------------------- the C++ nodes, each beside
# the module method it replaces (called where the node's check is False)

def _encode_layers(model, x, bias):
    layers = list(model.layers.values())
    recompute = model.recompute == "full" and torch.is_grad_enabled()
    if not recompute and encoder_layer_cpu.stack_applies(layers, x, bias):
        return encoder_layer_cpu.stack_forward(layers, x, bias)      # fp32 CPU: all layers as one node
    return type(model).encode_layers(model, x, bias)


def _layer_forward(layer, x, bias):
    if encoder_layer_cpu.applies(layer, x, bias):                  # fp32 CPU at TP = 1: one autograd node
        return encoder_layer_cpu.layer_forward(layer, x, bias)
    return type(layer).forward(layer, x, bias)


def _attention_context(attn, qkv, bias):
    recompute = attn.selective_recompute and torch.is_grad_enabled()
    if not recompute and attention_cpu.applies(qkv, bias, attn.attention_dropout if attn.training else 0.0):
        # the kernel reads the heads from qkv in place and returns [B, S, heads * D]
        return attention_cpu.attention(qkv, bias, 1.0 / math.sqrt(attn.head_dim))
    return type(attn).context(attn, qkv, bias)


def _embeddings_forward(emb, input_ids):
    emb.check_input(input_ids)
    if embeddings_cpu.applies(emb, input_ids):                     # fp32 CPU at TP = 1: one autograd node
        return embeddings_cpu.embeddings_forward(emb, input_ids)
    return type(emb).forward(emb, input_ids)


def _head_masked_loss_sum(head, hidden, labels, decoder_weight):
    if mlm_head_cpu.applies(head, hidden, decoder_weight):        # the masked rows found in C++
        n_real = real_rows(decoder_weight.shape[0], head.vocab_size, head.vocab_start)
        return mlm_head_cpu.masked_loss_sum_labels(head, hidden, labels, head.vocab_start, decoder_weight, n_real,
                                                   mlm_loss_chunk_rows(n_real))
    return type(head).masked_loss_sum(head, hidden, labels, decoder_weight)


_CPU_METHODS = ((XLMRModel, "encode_layers", _encode_layers), (EncoderLayer, "forward", _layer_forward),
                (SelfAttention, "context", _attention_context), (Embeddings, "forward", _embeddings_forward),
                (MLMHead, "masked_loss_sum", _head_masked_loss_sum))
_OP_SLOTS = ((FeedForward, "bias_gelu", ops.bias_gelu), (MLMHead, "bias_gelu", ops.bias_gelu),
             (EncoderLayer, "bias_dropout_add_layernorm", ops.bias_dropout_add_layernorm),
             (SelfAttention, "attend", ops.attention))


def apply(model: Union[nn.Module, Iterable[nn.Module]], device, compile: bool = False) -> AppliedKernels:
    """Install the fast paths of `fast_paths(device type)` on `model` (a module or this rank's
    pipeline chunks) in place, before the first forward, then, with `compile`, torch.compile its
    encoder layers and head transform (parallel/compile.py); returns what was applied. Idempotent.
    Values and gradients equal the reference model's to rounding (the kernels' tests); which path
    a call takes is decided at the call."""
    roots = [model] if isinstance(model, nn.Module) else list(model)
    cpu = torch.device(device).type == "cpu"
    touched = 0
    for root in roots:
        for m in root.modules():
            hit = False
            for cls, name, fn in _OP_SLOTS:
                if isinstance(m, cls):
                    setattr(m, name, fn)
                    hit = True
            if cpu:
                for cls, name, fn in _CPU_METHODS:
                    if isinstance(m, cls):
                        setattr(m, name, types.MethodType(fn, m))
                        hit = True
            touched += hit
    names = fast_paths(torch.device(device).type)
    if not compile:
        return AppliedKernels(names, touched)
    return AppliedKernels(names + ("compile",), touched, parallel_compile.compile_chunks(roots))
