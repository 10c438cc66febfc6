"""AdamW with the RoBERTa/XLM-R recipe, the learning-rate schedule, and global gradient clipping.

- `param_groups()`: weight decay on matrices (and embeddings), none on biases and LayerNorm
  weights (every 1-D parameter).
- `LRSchedule`: linear warmup to `optim.lr`, then linear, cosine or 1-sqrt decay to `optim.min_lr`
  at `train.train_steps`, constant, or warmup-stable-decay (`wsd`: constant, then a 1-sqrt /
  linear / cosine decay over the last `optim.decay_steps` or `optim.decay_fraction`).
- `build_adamw()`: torch's fused AdamW (one multi-tensor kernel; CPU and CUDA), or foreach.
- `global_grad_norm()` / `clip_grads()`: the L2 norm of the full model's gradient, with each
  parameter counted once: TP-replicated parameters only on TP rank 0, the last stage's tied
  decoder copy never (its gradient equals the first stage's embedding gradient after the tied
  all-reduce), summed over TP then PP; DP replicas are identical after the DP all-reduce and are
  not summed, except under ZeRO-1 where each DP rank passes its own element ranges and the DP
  group (see parallel/data_parallel.py). The norm runs in the gradients' dtype with fp32
  accumulation over 4096-element blocks (`sum_of_squares`; fp64 only for the block norms, never a
  copy of a gradient), and clipping is one multi-tensor `torch._foreach_mul_`.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def no_decay(name: str, p: torch.Tensor) -> bool:
    """Biases and LayerNorm parameters (all 1-D tensors) get no weight decay."""
    return p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def param_groups(named_params: Iterable[Tuple[str, torch.nn.Parameter]], weight_decay: float) -> List[dict]:
    """Two AdamW groups: decayed matrices, undecayed biases/LayerNorms (each keeps its names)."""
    decay, skip = {"params": [], "names": [], "weight_decay": weight_decay}, \
        {"params": [], "names": [], "weight_decay": 0.0}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        g = skip if no_decay(name, p) else decay
        g["params"].append(p)
        g["names"].append(name)
    return [g for g in (decay, skip) if g["params"]]


ADAMW_IMPLS = ("fused", "foreach", "single")


def build_adamw(groups: List[dict], ocfg, impl: str = "fused") -> torch.optim.AdamW:
    """torch AdamW (decoupled weight decay, as fairseq's adam with weight_decay) from OptimConfig.
    impl: 'fused' (one kernel over all tensors; falls back to 'foreach' where torch has no fused
    kernel for the tensors' device), 'foreach' (multi-tensor ops), 'single' (one parameter at a
    time, the pre-fused reference)."""
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"AdamW impl {impl!r}: choose one of {', '.join(ADAMW_IMPLS)}")
    kw = dict(lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps, weight_decay=ocfg.weight_decay)
    if impl == "fused":
        dev = next(p for g in groups for p in g["params"]).device.type
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        if dev in _get_fused_kernels_supported_devices():
            return torch.optim.AdamW(groups, fused=True, **kw)
        impl = "foreach"
    return torch.optim.AdamW(groups, foreach=impl == "foreach", **kw)


class LRSchedule:
    """lr(step) for 0-based optimizer step: linear warmup, then linear / cosine / 1-sqrt decay to
    min_lr at total_steps, constant, or `wsd` (warmup-stable-decay): constant after the warmup,
    then `wsd_decay` (1-sqrt, linear or cosine) to min_lr over the last decay_steps steps (or the
    last decay_fraction of total_steps). 1-sqrt: lr = min + (lr - min) * (1 - sqrt(frac))."""

    DECAYS = ("linear", "cosine", "constant", "1-sqrt", "wsd")
    SHAPES = ("1-sqrt", "linear", "cosine")

    def __init__(self, lr: float, warmup_steps: int, total_steps: int, decay: str = "linear",
                 min_lr: float = 0.0, decay_steps: int = 0, decay_fraction: float = 0.0, wsd_decay: str = "1-sqrt"):
        if decay not in self.DECAYS:
            raise ValueError(f"optim.decay={decay!r}: choose one of {', '.join(self.DECAYS)}")
        if wsd_decay not in self.SHAPES:
            raise ValueError(f"optim.wsd_decay={wsd_decay!r}: choose one of {', '.join(self.SHAPES)}")
        self.lr, self.warmup, self.total, self.decay, self.min_lr = lr, warmup_steps, total_steps, decay, min_lr
        self.wsd_decay = wsd_decay
        if decay == "wsd":
            n = int(decay_steps) if decay_steps else int(round(decay_fraction * total_steps))
            if n < 1:
                raise ValueError("optim.decay=wsd needs optim.decay_steps >= 1 or optim.decay_fraction in (0, 1]")
            self.decay_start = max(total_steps - n, warmup_steps)
        else:
            self.decay_start = warmup_steps

    @classmethod
    def from_config(cls, ocfg, train_steps: int) -> "LRSchedule":
        return cls(ocfg.lr, ocfg.warmup_steps, train_steps, ocfg.decay, ocfg.min_lr,
                   getattr(ocfg, "decay_steps", 0), getattr(ocfg, "decay_fraction", 0.0),
                   getattr(ocfg, "wsd_decay", "1-sqrt"))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.decay == "constant" or step < self.decay_start:
            return self.lr
        span = max(self.total - self.decay_start, 1)
        frac = min(max(step - self.decay_start, 0) / span, 1.0)
        shape = self.wsd_decay if self.decay == "wsd" else self.decay
        if shape == "linear":
            return self.min_lr + (self.lr - self.min_lr) * (1.0 - frac)
        if shape == "1-sqrt":
            return self.min_lr + (self.lr - self.min_lr) * (1.0 - math.sqrt(frac))
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr


def norm_counted(name: str, p: torch.nn.Parameter, tp_rank: int, is_partitioned: Callable[[str, torch.nn.Parameter], bool],
                 tied_copy_names: Sequence[str] = ()) -> bool:
    """Whether `p`'s gradient enters the global norm on this rank (each element counted once)."""
    if name in tied_copy_names:
        return False
    return tp_rank == 0 or is_partitioned(name, p)


NORM_BLOCK = 4096


def sum_of_squares(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum(x^2) over all elements of `tensors` (fp64 0-d tensor), blocked: the L2 norms of
    NORM_BLOCK-element blocks are computed in the tensors' dtype with fp32 accumulation (one kernel
    per tensor over a [blocks, NORM_BLOCK] view, tails in one multi-tensor torch._foreach_norm) and
    only those block norms (numel / 4096 scalars) are squared and summed in fp64. A single fp32
    accumulation over a whole 64M-element gradient loses ~1e-3 relative on CPU; blocks keep it
    ~1e-7, with no fp64 copy of any gradient."""
    parts, tails = [], []
    for t in tensors:
        flat = t.reshape(-1)
        n = flat.numel() // NORM_BLOCK * NORM_BLOCK
        if n:
            parts.append(torch.linalg.vector_norm(flat[:n].view(-1, NORM_BLOCK), dim=1))
        if n < flat.numel():
            tails.append(flat[n:])
    if tails:
        parts.append(torch.stack(torch._foreach_norm(tails)).to(parts[0].dtype if parts else tails[0].dtype))
    if not parts:
        return torch.zeros((), dtype=torch.float64)
    return torch.cat([p.reshape(-1).to(torch.float32) for p in parts]).double().pow(2).sum()


@torch.no_grad()
def global_grad_norm(grads: Iterable[torch.Tensor], tp_group: Optional[dist.ProcessGroup] = None,
                     pp_group: Optional[dist.ProcessGroup] = None,
                     dp_group: Optional[dist.ProcessGroup] = None) -> float:
    """L2 norm of the given (already de-duplicated) local gradients summed over TP and PP (and DP
    when each DP rank holds different elements: ZeRO-1 ranges)."""
    from xlmr_mp.distributed import comm_device
    grads = [g.detach() for g in grads if g is not None and g.numel()]
    total = torch.zeros(1, dtype=torch.float64, device=comm_device())
    if grads:
        total += sum_of_squares(grads).to(total.device)
    if dist.is_initialized():
        for grp in (dp_group, tp_group, pp_group):
            if grp is not None and dist.get_world_size(grp) > 1:
                dist.all_reduce(total, group=grp)
    return float(total.sqrt().item())


@torch.no_grad()
def clip_grads(tensors: Iterable[torch.Tensor], total_norm: float, max_norm: float) -> float:
    """Scale every gradient by max_norm / total_norm when the norm exceeds max_norm; return the
    factor. `tensors`: gradient tensors (e.g. the flat gradient buffers), or parameters (their .grad)."""
    if max_norm <= 0 or not math.isfinite(total_norm) or total_norm <= max_norm:
        return 1.0
    coef = max_norm / (total_norm + 1e-6)
    grads = [t.grad if isinstance(t, torch.nn.Parameter) else t for t in tensors]
    grads = [g for g in grads if g is not None]
    if grads:
        torch._foreach_mul_(grads, coef)
    return coef
