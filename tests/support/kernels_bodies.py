"""Rank bodies for test_kernels.py (spawned processes import them by module name)."""
import torch
import torch.distributed as dist

from xlmr_mp.kernels.mlm_xent import mlm_cross_entropy


def shard_xent_rank(rank, world_size, hidden, weight, bias, target, grad, chunk):
    """This rank's vocabulary shard of the MLM cross-entropy: (loss, d hidden partial, d weight
    shard, d bias shard)."""
    vocab = weight.shape[0]
    per = (vocab + world_size - 1) // world_size
    start, end = rank * per, min(vocab, (rank + 1) * per)
    h = hidden.clone().requires_grad_(True)
    w = weight[start:end].clone().requires_grad_(True)
    b = bias[start:end].clone().requires_grad_(True)
    loss = mlm_cross_entropy(h, w, b, target, vocab_start=start, group=dist.group.WORLD, chunk=chunk)
    loss.backward(grad)
    return loss.detach(), h.grad, w.grad, b.grad
