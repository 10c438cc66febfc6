"""`train.compile`: torch.compile of each encoder layer and of the masked-LM head's transform.

At the shapes of a tiny scaling study a step is mostly small-op overhead (dozens of kernels per
layer, each microseconds of work); compiling a layer fuses its elementwise ops (bias, GELU,
dropout, residual, LayerNorm) around the matmuls. Compiled in place (`nn.Module.compile`), so
parameter names, hooks, activation checkpointing and checkpoints are unchanged. The chunked
vocab-parallel cross-entropy (parallel/vocab.py) stays eager: its cost is matmuls, and its
TP collectives must stay outside a graph. Off by default: the first step pays the compilation
(minutes on a small CPU), and the compiled dropout draws from inductor's RNG, not torch's
generator, so runs with dropout are not bitwise equal to eager ones.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def compile_chunks(chunks: Sequence[nn.Module]) -> int:
    """Compile every encoder layer and head transform of the model chunks in place; returns how
    many modules were compiled."""
    n = 0
    for c in chunks:
        for layer in getattr(c, "layers", {}).values():
            layer.compile()
            n += 1
        head = getattr(c, "lm_head", None)
        if head is not None and hasattr(head, "transform"):
            head.transform = torch.compile(head.transform, dynamic=True)
            n += 1
    return n
