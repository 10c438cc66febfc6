"""The fused masked-LM rows of a vocabulary shard as registered custom ops (torch.library): what
the one masked-LM loss, parallel/vocab.py's `vocab_parallel_masked_lm_loss`, may run on the shard
logits of a chunk of masked rows, the CUDA pair where XLMR_MP_KERNELS dispatches the fused CUDA
kernels, the CPU rows on an AVX2 CPU at TP = 1.

    mlm_xent_stats(logits [M, V], target [M] int64) -> (lse [M] fp32, target_logit [M] fp32)
    mlm_xent_grad_(logits [M, V] (mutated), target, lse [M] fp32, grad_scale [M] fp32) -> None
    mlm_xent_rows_(logits [M, V] (mutated), target [M] int64) -> loss [M] fp32

target holds each row's column in this shard, or -1 where another shard owns the id
(mlm_xent.local_targets). `mlm_xent_stats` gives the shard-local logsumexp and the target logit
(0 where the target is elsewhere), read in one pass over low-precision logits; it has an autograd
formula (torch ops: d logits = g_lse * softmax + g_target * onehot). `mlm_xent_grad_` overwrites the
logits, in place and in their dtype, with grad_scale[:, None] * (exp(logits - lse[:, None]) -
onehot(target)): the loss's gradient without an fp32 copy of the logits. It is itself a gradient
(the loss computes its gradients in its forward), so it has no autograd formula (torch.library
registers none for a mutating op). `mlm_xent_rows_` is both for a whole vocabulary (TP = 1): the
loss lse - logits[target] (no target term where target is outside [0, V)) and, in place, the rows
softmax - onehot (grad_scale 1), in one pass.

Keys: CUDA runs the kernels of xlmr_mp._cuda (csrc/cuda/mlm_xent.cuh) where it is built, CPU the
AVX2 kernel of xlmr_mp._C (csrc/xent_cpu.cpp) for `mlm_xent_rows_` on contiguous fp32 logits where
this CPU has it; everything else computes the torch references of kernels/mlm_xent.py.
"""
from __future__ import annotations

import torch

from xlmr_mp.kernels import dispatch
from xlmr_mp.kernels.mlm_xent import shard_xent_grad_ref, xent_rows_ref, xent_stats_ref


def _cuda_ok(logits: torch.Tensor, target: torch.Tensor) -> bool:
    return (logits.dim() == 2 and logits.stride(1) == 1 and target.dtype == torch.int64
            and logits.dtype in (torch.float32, torch.float16, torch.bfloat16))


@torch.library.custom_op("xlmr_mp::mlm_xent_stats", mutates_args=())
def mlm_xent_stats(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse [M] fp32, target_logit [M] fp32) of shard logits [M, V]; see the module doc."""
    return xent_stats_ref(logits, target)                 # devices without a kernel of their own


@mlm_xent_stats.register_kernel("cuda")
def _stats_cuda(logits, target):
    ext = dispatch.extension()
    if ext is None or not _cuda_ok(logits, target):
        return xent_stats_ref(logits, target)
    lse, tl = ext.mlm_xent_stats(logits, target.contiguous())
    return lse, tl


@mlm_xent_stats.register_fake
def _stats_fake(logits, target):
    m = logits.shape[0]
    return logits.new_empty(m, dtype=torch.float32), logits.new_empty(m, dtype=torch.float32)


def _stats_setup_context(ctx, inputs, output):
    logits, target = inputs
    ctx.save_for_backward(logits, target, output[0])


def _stats_backward(ctx, grad_lse, grad_target_logit):
    logits, target, lse = ctx.saved_tensors
    d = torch.exp(logits.float() - lse[:, None]) * grad_lse[:, None]
    inside = target >= 0
    onehot = torch.zeros_like(d).scatter(1, target.clamp(min=0)[:, None],
                                         (grad_target_logit * inside.to(grad_target_logit.dtype))[:, None])
    return (d + onehot).to(logits.dtype), None


mlm_xent_stats.register_autograd(_stats_backward, setup_context=_stats_setup_context)


@torch.library.custom_op("xlmr_mp::mlm_xent_grad_", mutates_args=("logits",))
def mlm_xent_grad_op(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad_scale: torch.Tensor) -> None:
    """logits <- grad_scale[:, None] * (exp(logits - lse[:, None]) - onehot(target)), in place."""
    logits.copy_(shard_xent_grad_ref(logits, target, lse, grad_scale))


@mlm_xent_grad_op.register_kernel("cuda")
def _grad_cuda(logits, target, lse, grad_scale):
    ext = dispatch.extension()
    if ext is None or not _cuda_ok(logits, target):
        logits.copy_(shard_xent_grad_ref(logits, target, lse, grad_scale))
        return
    ext.mlm_xent_grad_(logits, target.contiguous(), lse.float().contiguous(), grad_scale.float().contiguous())


@mlm_xent_grad_op.register_fake
def _grad_fake(logits, target, lse, grad_scale):
    return None


def mlm_xent_grad_(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                   grad_scale: torch.Tensor) -> torch.Tensor:
    """logits <- grad_scale[:, None] * (exp(logits - lse[:, None]) - onehot(target)), in place through
    torch.ops.xlmr_mp.mlm_xent_grad_ (lse and grad_scale taken as fp32); returns logits."""
    torch.ops.xlmr_mp.mlm_xent_grad_(logits, target, lse.float().contiguous(), grad_scale.float().contiguous())
    return logits


def _rows_ref_(logits, target):
    loss, grad = xent_rows_ref(logits, target)
    logits.copy_(grad)
    return loss


@torch.library.custom_op("xlmr_mp::mlm_xent_rows_", mutates_args=("logits",))
def mlm_xent_rows_(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """loss [M] fp32 of each row of logits [M, V] (whole vocabulary), the rows overwritten with
    softmax - onehot; see the module doc."""
    return _rows_ref_(logits, target)


@mlm_xent_rows_.register_kernel("cpu")
def _rows_cpu(logits, target):
    ext = dispatch._cpu_extension()
    if ext is None or logits.dtype != torch.float32 or logits.dim() != 2 or not logits.is_contiguous():
        return _rows_ref_(logits, target)
    loss = torch.empty(logits.shape[0], dtype=torch.float32)
    ext.xent_rows(logits.numpy(), target.long().contiguous().numpy(), loss.numpy(), torch.get_num_threads())
    return loss


@mlm_xent_rows_.register_fake
def _rows_fake(logits, target):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)
