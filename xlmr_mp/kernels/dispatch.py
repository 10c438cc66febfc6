"""When a fused CUDA kernel replaces its torch reference.

`XLMR_MP_KERNELS` (environment, read at each call so tests can flip it):
  auto       (default) fused only for CUDA tensors, with the `xlmr_mp._cuda` extension built, and
             only for ops that `FASTER_ON` lists for this GPU (from a bench/kernels_gpu.py measurement);
  fused      always the fused kernel; a CPU tensor or a missing extension is an error;
  reference  always the torch reference.
The same switch governs the AVX2 CPU kernels in xlmr_mp._C (kernels/attention_cpu.py,
kernels/bias_gelu_cpu.py): `reference` never runs them, `auto` and `fused` do where they apply
(`cpu_kernels`; attention at S <= MAX_SEQ under `auto`, at any length under `fused`).
"""
from __future__ import annotations

import functools
import os

import torch

ENV = "XLMR_MP_KERNELS"
MODES = ("auto", "fused", "reference")
OPS = ("bias_gelu", "bias_dropout_add_layernorm", "scaled_masked_softmax", "mlm_xent")

# op -> GPU architectures ("sm_80", ...) where bench/kernels_gpu.py measured the fused kernel faster than
# the torch path it replaces (forward + backward). Only a GPU measurement may add an entry; `auto`
# keeps every op on its reference until a measured entry says otherwise.
FASTER_ON: dict[str, frozenset[str]] = {}


class KernelUnavailable(RuntimeError):
    """XLMR_MP_KERNELS=fused was asked for where the fused kernel cannot run."""


def mode() -> str:
    """The kernel switch, validated."""
    m = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"{ENV}={os.environ.get(ENV)!r} is not one of {'|'.join(MODES)}; "
                         f"unset it or set e.g. {ENV}=auto")
    return m


@functools.lru_cache(maxsize=1)
def _load_extension():
    try:
        from xlmr_mp import _cuda  # type: ignore[attr-defined]
        return _cuda, None
    except ImportError as e:  # not built: CPU torch, no nvcc, or XLMR_MP_NO_CUDA=1 at build time
        return None, str(e)


def extension():
    """The `xlmr_mp._cuda` module, or None when it was not built."""
    return _load_extension()[0]


def arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def use_fused(tensor: torch.Tensor, op: str) -> bool:
    """True when `op` on `tensor` should run the fused CUDA kernel (see module doc)."""
    if op not in OPS:
        raise ValueError(f"unknown fused op {op!r}; known: {', '.join(OPS)}")
    m = mode()
    if m == "reference":
        return False
    if m == "fused":
        if not tensor.is_cuda:
            raise KernelUnavailable(f"{ENV}=fused but {op} got a {tensor.device.type} tensor; the fused "
                                    f"kernels run on CUDA tensors only (set {ENV}=auto or reference)")
        if extension() is None:
            raise KernelUnavailable(f"{ENV}=fused but the CUDA extension xlmr_mp._cuda is not built "
                                    f"({_load_extension()[1]}); rebuild with a CUDA torch and nvcc: "
                                    f"pip install --no-build-isolation -e . (or set {ENV}=auto)")
        return True
    return tensor.is_cuda and extension() is not None and arch(tensor.device) in FASTER_ON.get(op, ())


@functools.lru_cache(maxsize=1)
def _cpu_extension():
    try:
        from xlmr_mp import _C
    except ImportError:
        return None
    if not hasattr(_C, "attention_forward") or not _C.cpu_kernels_supported():
        return None
    return _C


def cpu_kernels(tensor: torch.Tensor):
    """The `xlmr_mp._C` module when its AVX2 CPU kernels may run on `tensor`: an fp32 CPU tensor,
    outside autocast and torch.compile tracing (inductor fuses these ops itself), on a CPU with AVX2
    and FMA, and XLMR_MP_KERNELS not `reference`; None otherwise."""
    if tensor.device.type != "cpu" or tensor.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return None
    if torch.compiler.is_compiling() or mode() == "reference":
        return None
    return _cpu_extension()
