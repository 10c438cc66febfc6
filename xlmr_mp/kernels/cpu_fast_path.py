"""What the C++ fast-path nodes on a CPU share (encoder_layer_cpu.py, embeddings_cpu.py,
mlm_head_cpu.py; their entry points are csrc/bindings_fast_path.cpp):

- their GEMM (csrc/blas_cpu.h): the Fortran `sgemm_` that torch's own libtorch_cpu exports (MKL's in
  the x86 wheels, the BLAS torch.mm calls for fp32 on a CPU), found once with ctypes and handed to
  xlmr_mp._C, which checks it on a small product against plain loops; so those calls' products have
  torch.mm's bits and run on torch's MKL threads;
- the addresses their calls take, the dropout mask the module path would draw, and the check that
  their tensors are fp32, on the CPU and contiguous.
"""
from __future__ import annotations

import ctypes
import functools
import os

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
