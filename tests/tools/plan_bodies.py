"""Rank body for tests/tools/test_plan.py: the measured peak memory of a few trainer steps."""
import os

import torch

from tests.support import train_bodies as b
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
    import xlmr_mp.parallel.stages  # noqa: F401
    import xlmr_mp.parallel.data_parallel  # noqa: F401
    import xlmr_mp.parallel.schedule  # noqa: F401
    import xlmr_mp.train  # noqa: F401


def measure_body(rank, world_size, overrides, steps, run_dir):
    """Peak RSS growth of this rank from just before the Trainer is built through `steps` steps
    (bytes), and its pipeline rank. The peak is VmHWM reset at the start (xlmr_mp.metrics): never
    ru_maxrss, which a spawned rank inherits from the parent's RSS at the fork (late in a full test
    session the pytest process holds gigabytes, and the growth measured 2.3-3x the plan)."""
    from xlmr_mp.metrics import peak_rss_bytes, reset_peak_rss
    from xlmr_mp.parallel.state import destroy_parallel
    # glibc's mmap threshold fixed in this process (M_MMAP_THRESHOLD = -3) so freed tensors go back
    # to the OS and the RSS follows the live tensors
    import ctypes
    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)
    warm_imports()
    cfg = b.tiny_cfg(SHAPE + list(overrides) + [f"run_dir={run_dir}", "logging.jsonl=false"], world_size)
    base = _rss_bytes()
    if not reset_peak_rss():
        raise RuntimeError("/proc/self/clear_refs not writable: cannot measure the peak from here")
    tr, g = b.make_trainer(cfg)
    for _ in range(steps):
        tr.train_step()
    peak = peak_rss_bytes()
    destroy_parallel()
    return {"peak_growth": peak - base, "pp_rank": g.pp_rank, "base": base}
