"""Rank bodies for test_harness.py (spawned processes import them by module name)."""
import torch
import torch.distributed as dist


def allreduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def fail_on_rank1(rank, world_size):
    if rank == 1:
        raise RuntimeError("boom on rank 1")
    return rank
