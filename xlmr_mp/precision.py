"""Mixed precision: autocast contexts and a dynamic loss scaler for fp16.

Parameters, gradients and optimizer state stay fp32 (they are the master weights); the forward and
backward matmuls run in bf16/fp16 under `torch.autocast`. With fp16 the loss is multiplied by the
scaler's scale before backward; `DynamicLossScaler.update(found_inf)` says whether to skip the
step, halves the scale after an overflow (after `hysteresis` overflows), doubles it after
`window` clean steps, and raises `LossScaleAtMinimum` when it would go below the minimum (the
trainer then saves a checkpoint and aborts).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(requested: str, device_type: str, capability: Optional[tuple] = None) -> str:
    """The compute dtype precision.dtype=`requested` means on a device: itself unless "auto"; "auto"
    is bf16 on a GPU of compute capability >= 8.0 (A100, H100, H200: bf16 tensor cores), fp16 on an
    older one (V100, sm_70: no bf16 tensor cores; fp16 with the dynamic loss scaler), fp32 on the CPU
    (a pure function, so the GPU branches run in CPU tests)."""
    if requested != "auto":
        return requested
    if device_type != "cuda":
        return "fp32"
    if capability is None:
        raise ValueError("precision.dtype=auto on cuda needs the device's compute capability")
    return "bf16" if tuple(capability) >= (8, 0) else "fp16"


def device_dtype(requested: str, device: torch.device) -> str:
    """`resolve_dtype` for the device a run trains on (reads a GPU's compute capability)."""
    if requested != "auto":
        return requested
    device = torch.device(device)
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return resolve_dtype(requested, device.type, cap)


class LossScaleAtMinimum(RuntimeError):
    """fp16 gradients overflowed with the loss scale already at precision.min_loss_scale."""


def autocast(dtype: str, device: torch.device):
    """Autocast context for `dtype` ('fp32' gives a no-op context; 'auto' is resolved for `device`)."""
    dtype = device_dtype(dtype, device)
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


class DynamicLossScaler:
    """Loss scale with skip-on-overflow, backoff, growth and a minimum (Megatron/fairseq style)."""

    def __init__(self, initial_scale: float = 2.0 ** 16, min_scale: float = 1.0, window: int = 1000,
                 hysteresis: int = 1, backoff: float = 0.5, growth: float = 2.0, max_scale: float = 2.0 ** 24):
        self.scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.window = int(window)
        self.hysteresis = int(hysteresis)
        self.backoff = backoff
        self.growth = growth
        self.max_scale = max_scale
        self._good_steps = 0
        self._hysteresis_left = self.hysteresis
        self.skipped_steps = 0

    def update(self, found_inf: bool) -> bool:
        """Record one step's overflow flag; return True when the optimizer step must be skipped."""
        if found_inf:
            self.skipped_steps += 1
            self._good_steps = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                if self.scale <= self.min_scale:
                    raise LossScaleAtMinimum(
                        f"fp16 gradients overflow at the minimum loss scale {self.min_scale}; the run "
                        f"diverged: lower optim.lr, use precision.dtype=bf16, or lower precision.min_loss_scale")
                self.scale = max(self.scale * self.backoff, self.min_scale)
                self._hysteresis_left = self.hysteresis
            return True
        self._good_steps += 1
        if self._good_steps >= self.window:
            self.scale = min(self.scale * self.growth, self.max_scale)
            self._good_steps = 0
            self._hysteresis_left = self.hysteresis
        return False

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self._good_steps,
                "hysteresis_left": self._hysteresis_left, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = float(sd["scale"])
        self._good_steps = int(sd["good_steps"])
        self._hysteresis_left = int(sd["hysteresis_left"])
        self.skipped_steps = int(sd.get("skipped_steps", 0))


class ConstantScaler:
    """Scale 1, never skips: used for fp32 and bf16 (same interface as DynamicLossScaler)."""
    scale = 1.0
    skipped_steps = 0

    def update(self, found_inf: bool) -> bool:
        return False

    def state_dict(self) -> dict:
        return {"scale": 1.0}

    def load_state_dict(self, sd: dict) -> None:
        pass


def build_scaler(pcfg) -> "DynamicLossScaler | ConstantScaler":
    """Dynamic scaler for fp16, constant 1 otherwise."""
    if pcfg.dtype == "fp16":
        return DynamicLossScaler(pcfg.initial_loss_scale, pcfg.min_loss_scale,
                                 pcfg.loss_scale_window, pcfg.hysteresis)
    return ConstantScaler()


def _grads(tensors) -> list:
    """Gradient tensors of parameters (their .grad) or the given gradient tensors themselves."""
    out = [t.grad if isinstance(t, torch.nn.Parameter) else t for t in tensors]
    return [g for g in out if g is not None and g.numel()]


def grads_have_inf(params: Iterable[torch.Tensor], group: Optional[dist.ProcessGroup] = None) -> bool:
    """True when any gradient on any rank of `group` (default: the world) holds inf or nan.
    `params`: parameters (their .grad is checked) or gradient tensors (e.g. the flat buffers)."""
    from xlmr_mp.distributed import comm_device
    flag = torch.zeros(1, device=comm_device())
    grads = _grads(params)
    if grads:
        # the max-abs norm is inf/nan iff some element is (it cannot overflow, unlike a sum of
        # squares); one multi-tensor pass instead of an isfinite copy per tensor
        norms = torch._foreach_norm(grads, float("inf"))
        if not bool(torch.isfinite(torch.stack(norms)).all()):
            flag.fill_(1.0)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item() > 0)


@torch.no_grad()
def unscale_grads(params: Iterable[torch.Tensor], scale: float) -> None:
    """Divide every gradient by the loss scale (no-op at scale 1); parameters or gradient tensors."""
    if scale == 1.0:
        return
    grads = _grads(params)
    if grads:
        torch._foreach_mul_(grads, 1.0 / scale)
