"""Rank bodies for tests/data/test_data_loader.py (spawned processes import them by module name)."""
import torch
import torch.distributed as dist


def _loader(path, rank, world_size, num_workers=0):
    from xlmr_mp.data.config import DataConfig
    from xlmr_mp.data.loader import MLMLoader
    cfg = DataConfig(path=path, seq_length=64, num_workers=num_workers)
    return MLMLoader(cfg, rank, world_size, micro_batch=2, global_batch=8, vocab_size=1000)


def resume_rank(rank, world_size, path, k):
    """Run 2k micro-batches; separately, stop after k, save the state on rank 0, broadcast it,
    resume a fresh loader and run k more. Returns both runs' batches and the gathered global batch."""
    straight = _loader(path, rank, world_size)
    full = [next(straight) for _ in range(2 * k)]
    first = _loader(path, rank, world_size)
    for _ in range(k):
        next(first)
    state = [first.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(state, src=0)
    resumed = _loader(path, rank, world_size, num_workers=1)
    resumed.load_state_dict(state[0])
    after = [next(resumed) for _ in range(k)]
    # the global batch of step 0: gather every rank's first micro-batches
    ids = torch.cat([b["input_ids"] for b in full[:straight.accumulation_steps]])
    gathered = [torch.zeros_like(ids) for _ in range(world_size)]
    dist.all_gather(gathered, ids)
    return {"full": full, "after": after, "global0": torch.cat(gathered), "state": state[0]}
