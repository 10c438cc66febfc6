"""What the C++ fast-path nodes on a CPU share (encoder_layer_cpu.py, embeddings_cpu.py,
mlm_head_cpu.py, attention_cpu.py; their entry points are csrc/bindings_fast_path.cpp):

- their registration as ops, torch.ops.xlmr_mp.* (`define_cpu_op`: the schema, the CPU kernel, the
  fake kernel; `set_autograd`: the Autograd kernel), so that autograd, FakeTensor, the meta device
  and torch.compile see each node as one op; the raw addresses below are taken inside the kernels;
- their GEMM (csrc/blas_cpu.h): the Fortran `sgemm_` that torch's own libtorch_cpu exports (MKL's in
  the x86 wheels, the BLAS torch.mm calls for fp32 on a CPU), found once with ctypes and handed to
  xlmr_mp._C, which checks it on a small product against plain loops; so those calls' products have
  torch.mm's bits and run on torch's MKL threads;
- the addresses their calls take, the dropout mask the module path would draw, and the check that
  their tensors are fp32, on the CPU and contiguous;
- the pool their saved activations come from (BufferPool), so those stay mapped between steps;
- adding parameter gradients straight into .grad (`accumulation_targets` at a backward; inside
  `gradients_into_grad`, `edge_free_targets` at a forward: no autograd edge to those parameters).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
import weakref

import numpy as np
import torch

from xlmr_mp.kernels import dispatch


@functools.lru_cache(maxsize=1)
def blas_sgemm() -> bool:
    """Whether xlmr_mp._C has its GEMM (False: no CPU kernels, no `sgemm_` in libtorch_cpu, or one
    that fails the check, e.g. an ILP64 build; then the callers keep their torch paths)."""
    ext = dispatch._cpu_extension()
    if ext is None or not hasattr(ext, "set_blas_sgemm"):
        return False
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        address = ctypes.cast(lib.sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return False
    if not address:
        return False
    ext.set_blas_sgemm(address)
    return bool(ext.blas_sgemm_selftest())


LIBRARY = torch.library.Library("xlmr_mp", "FRAGMENT")
"""Where the CPU nodes' ops are defined (namespace xlmr_mp, beside the custom_op ones of bias_gelu_op.py)."""


def define_cpu_op(schema: str, cpu_kernel, fake_kernel):
    """torch.ops.xlmr_mp.<name> defined by `schema` ("name(args) -> returns"), with its CPU kernel
    and its fake kernel (FakeTensor, the meta device, torch.compile's tracing); returns its
    OpOverload. The nodes are CPU-only: no CUDA key. Through torch.library's low-level Library
    rather than torch.library.custom_op, whose wrapper (an aliasing check over every tensor
    argument and output, a dynamo-disabled frame) costs a measurable share of a tiny model's step
    (bench/results/cpu_node_ops.txt)."""
    name = schema[:schema.index("(")]
    LIBRARY.define(schema)
    LIBRARY.impl(name, cpu_kernel, "CPU")
    torch.library.register_fake(f"xlmr_mp::{name}", fake_kernel, lib=LIBRARY)
    return getattr(torch.ops.xlmr_mp, name).default


def set_autograd(op, kernel) -> None:
    """Register `kernel` (the op's arguments -> its outputs, through an autograd.Function whose
    forward calls the op again under torch._C._AutoDispatchBelowAutograd) as op's Autograd kernel.
    What torch.library.register_autograd does, without its generic wrapper, which flattens list
    arguments through pytree and refills defaults on every call: measured too slow for the encoder
    node's 12 parameters a layer (bench/results/cpu_node_ops.txt)."""
    LIBRARY.impl(op._schema.name.split("::")[1], kernel, "Autograd")


def extension(node: str, gemm: bool = True):
    """xlmr_mp._C for a node's op kernel (with torch's sgemm set where `gemm`); RuntimeError naming
    the node where its kernels cannot run (its `applies` is then False)."""
    ext = dispatch._cpu_extension()
    if ext is None or (gemm and not blas_sgemm()):
        raise RuntimeError(f"the CPU {node} kernels are unavailable (xlmr_mp._C without them, a CPU without "
                           f"AVX2/FMA{', or no usable sgemm_ in libtorch_cpu' if gemm else ''}); check "
                           f"{node}_cpu.applies() first")
    return ext


def addr(t: torch.Tensor | None) -> int:
    """The address a C++ entry point takes for t (0 for None); t must be float32/int64 C-contiguous."""
    return 0 if t is None else t.data_ptr()


def fp32_cpu_contiguous(tensors) -> bool:
    """Whether every tensor exists and is fp32, on the CPU and contiguous (what a node's C++ call reads)."""
    return all(t is not None and t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() for t in tensors)


def dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """The mask F.dropout draws on a CPU (aten's _dropout_impl: bernoulli_(1 - p) then / (1 - p)),
    from the same generator in the same order, so the masks equal the module path's."""
    return torch.empty_like(like).bernoulli_(1 - p).div_(1 - p)


def _addable_grads(params) -> list | None:
    """Each parameter's .grad when a node may add its gradient to it in place as AccumulateGrad would:
    an fp32 contiguous dense tensor of the parameter's shape, and no hook on the parameter (a tensor
    hook would see the gradient first; a post-accumulate one, e.g. the DP reducer's, counts
    AccumulateGrad's runs). None otherwise."""
    grads = []
    for p in params:
        if not p.is_leaf:      # (a traced or computed tensor: no AccumulateGrad, no .grad)
            return None
        g = p.grad
        if (g is None or g.dtype != torch.float32 or not g.is_contiguous() or g.shape != p.shape
                or g.is_sparse or p._backward_hooks or p._post_accumulate_grad_hooks):
            return None
        grads.append(g)
    return grads


def accumulation_targets(ctx, params, inputs) -> list | None:
    """The .grad of each of `params` (the node's edges `inputs` of ctx.next_functions: one a tensor
    argument of apply, a None argument has none) when the backward may
    add its gradient to them itself, as Megatron's gradient-accumulation fusion adds to main_grad:
    what AccumulateGrad would do next, without the zero-filled temporary it would add (the word
    embedding's gradient is V x H) nor its own pass. Only where that is exactly what autograd would
    do: every .grad already an fp32 contiguous tensor (the trainer's flat-buffer views: AccumulateGrad
    then adds in place), no hook on a parameter (a tensor hook would see the gradient first; a
    post-accumulate one, e.g. the DP reducer's, counts AccumulateGrad's runs), not building a graph
    of the backward (create_graph adds out of place), and the engine about to run each parameter's
    AccumulateGrad (not autograd.grad, not backward(inputs=...) leaving one out). None: return
    the gradients as usual."""
    if torch.is_grad_enabled():
        return None
    grads = _addable_grads(params)
    if grads is None:
        return None
    nodes = ctx.next_functions
    try:
        if not all(torch._C._will_engine_execute_node(nodes[i][0]) for i in inputs):
            return None
    except RuntimeError:         # autograd.grad(): it never accumulates into .grad
        return None
    return grads


_EDGE_FREE = threading.local()


@contextlib.contextmanager
def gradients_into_grad():
    """Within it, a fast-path node (the encoder's, kernels/encoder_layer_cpu.py) may take its
    parameters without autograd edges and add their gradients to the parameters' .grad in its
    backward itself (`edge_free_targets`): the engine then runs no AccumulateGrad node for them. The
    caller promises what autograd could otherwise not know at the forward: the backward of what it
    builds here runs through Tensor.backward() with no `inputs=` (not autograd.grad), and nobody
    replaces a parameter's .grad between a forward and its backward (the node checks, and raises).
    `kernels.apply`'s result hands it to the trainer's schedule as `micro_batch` (AppliedKernels),
    which runs each micro-batch's forward in it at PP=1."""
    before = getattr(_EDGE_FREE, "on", False)
    _EDGE_FREE.on = True
    try:
        yield
    finally:
        _EDGE_FREE.on = before


def edge_free_targets(params) -> list | None:
    """Inside `gradients_into_grad`, the .grad of each of `params` when a node may leave them out of
    the graph and add to these itself: grad mode on, and each parameter a leaf that requires grad
    with an fp32 contiguous .grad of its shape (the trainer's flat-buffer views) and no hook (a
    tensor hook would see the gradient first; a post-accumulate one, e.g. the DP reducer's, counts
    AccumulateGrad's runs). None: keep the edges (and `accumulation_targets` at the backward)."""
    if not getattr(_EDGE_FREE, "on", False) or not torch.is_grad_enabled():
        return None
    if not all(p.requires_grad and p.is_leaf for p in params):
        return None
    return _addable_grads(params)


def check_targets(params, grads, who: str) -> None:
    """At the backward of an edge-free node: each parameter's .grad is still the tensor taken at its forward."""
    for p, g in zip(params, grads):
        if p.grad is not g:
            raise RuntimeError(f"{who}: a parameter's .grad was replaced between the forward and the backward "
                               f"of a node that adds to it (cpu_fast_path.gradients_into_grad); replace .grad "
                               f"before the forward, or run the forward outside gradients_into_grad()")


class BufferPool:
    """fp32 buffers that outlive a call (the layer's saved activations, live from its forward to
    its backward) and come back here when the last tensor on them is freed, for the next call of
    the same size. A fresh allocation of a few MiB every layer and micro-batch is a fresh mapping
    or heap growth that glibc trims again at the step's end, so its pages fault in anew on first
    touch (bench/results/README.md has the measured share of a step). Kept between steps
    (like CUDA's caching allocator), the buffers stay mapped: the pool never holds more than was
    live at once, plus what is idle up to `max_idle_bytes` (a buffer over it is freed).

    take(n) hands out a tensor over an n-float numpy array through a view array of its own; the
    tensor's storage holds that view, and a finalizer on it puts the array back once autograd (or
    anybody) lets the storage go. A buffer still referenced, e.g. by a graph kept with
    retain_graph, is never handed out twice."""

    def __init__(self, max_idle_bytes: int = 1 << 30):
        self.max_idle_bytes = max_idle_bytes
        self._idle: dict[int, list] = {}
        self._idle_bytes = 0

    def take(self, n: int) -> torch.Tensor:
        idle = self._idle.get(n)
        if idle:
            base = idle.pop()
            self._idle_bytes -= base.nbytes
        else:
            base = np.empty(n, np.float32)
        view = base[:]
        weakref.finalize(view, self._give_back, base).atexit = False
        return torch.from_numpy(view)

    def _give_back(self, base: np.ndarray) -> None:
        if self._idle_bytes + base.nbytes <= self.max_idle_bytes:
            self._idle.setdefault(base.size, []).append(base)
            self._idle_bytes += base.nbytes

    def idle_bytes(self) -> int:
        return self._idle_bytes

    def clear(self) -> None:
        self._idle.clear()
        self._idle_bytes = 0


# The encoder layer's workspaces (kernels/encoder_layer_cpu.py).
WORKSPACES = BufferPool()
