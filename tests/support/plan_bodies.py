"""Rank body for tests/test_plan.py: the measured peak memory of a few trainer steps."""
import os
import resource

import torch

from support import train_bodies as b
SHAPE = ["model.vocab_size=32000", "model.hidden_size=256", "model.num_layers=4", "model.num_heads=4",
         "model.ffn_size=1024", "model.max_positions=130", "data.seq_length=128", "train.micro_batch=8",
         "optim.warmup_steps=2"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def warm_imports() -> None:
    """Import what building a Trainer imports (megatron-core, torch pipelining: ~150 MB of RSS) so
    that the measured growth is the training state only."""
    import megatron.core.tensor_parallel  # noqa: F401
    import torch.distributed.pipelining  # noqa: F401
    import xlmr_mp.model.stages  # noqa: F401
    import xlmr_mp.parallel.data_parallel  # noqa: F401
    import xlmr_mp.parallel.schedule  # noqa: F401
    import xlmr_mp.train  # noqa: F401


def measure_body(rank, world_size, overrides, steps, run_dir):
    """Peak RSS growth of this rank from just before the Trainer is built through `steps` steps
    (bytes), and its pipeline rank."""
    from xlmr_mp.parallel.state import destroy_parallel
    # glibc's mmap threshold fixed in this process itself (M_MMAP_THRESHOLD = -3): the test's
    # MALLOC_MMAP_THRESHOLD_ does not reach ranks forked from a server started earlier in the session
    import ctypes
    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)
    warm_imports()
    cfg = b.tiny_cfg(SHAPE + list(overrides) + [f"run_dir={run_dir}", "logging.jsonl=false"], world_size)
    base = _rss_bytes()
    base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tr, g = b.make_trainer(cfg)
    for _ in range(steps):
        tr.train_step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    destroy_parallel()
    return {"peak_growth": peak - base, "pp_rank": g.pp_rank, "base": base, "base_peak": base_peak}
