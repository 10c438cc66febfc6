"""`train.compile`: torch.compile of each encoder layer and of the masked-LM head's transform,
applied to a built model by `xlmr_mp.kernels.apply(..., compile=True)` (the trainer's one call),
after the fused paths are installed.

At the shapes of a tiny scaling study a step is mostly small-op overhead (dozens of kernels per
layer, each microseconds of work); compiling a layer fuses its elementwise ops (bias, GELU,
dropout, residual, LayerNorm) around the matmuls. Compiled in place (`nn.Module.compile`), so
parameter names, hooks, activation checkpointing and checkpoints are unchanged. The chunked
vocab-parallel cross-entropy (parallel/vocab.py) stays eager: its cost is matmuls, and its
TP collectives must stay outside a graph. Off by default: the first step pays the compilation
(minutes on a small CPU). Dropout in the compiled graphs draws from torch's generators (inductor's
`fallback_random`), so the masks are eager's: selective recompute (attention, kept eager: a graph
break) and the TP RNG streams see the same draws as without compile.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


# Inductor settings of our compiled modules only (no process-wide config change). fallback_random:
# dropout in a compiled graph draws from torch's generators (aten's RNG ops), not inductor's own
# Philox stream, so the masks are eager's and selective recompute (an eager region), the TP RNG
# streams and exact resume behave as without compile.
INDUCTOR_OPTIONS = {"fallback_random": True}


def compile_chunks(chunks: Sequence[nn.Module]) -> int:
    """Compile every encoder layer and head transform of the model chunks in place; returns how
    many modules are compiled. Idempotent: a module compiled already is left as it is."""
    n = 0
    for c in chunks:
        for layer in getattr(c, "layers", {}).values():
            if getattr(layer, "_compiled_call_impl", None) is None:
                layer.compile(options=INDUCTOR_OPTIONS)
            n += 1
        head = getattr(c, "lm_head", None)
        if head is not None and hasattr(head, "transform"):
            if "transform" not in vars(head):       # not yet an instance attribute: the compiled method
                head.transform = torch.compile(head.transform, dynamic=True, options=INDUCTOR_OPTIONS)
            n += 1
    return n
