"""Rank/world discovery (torchrun, SLURM, MPI) and process-group initialisation.

`discover_env()` reads, in order of precedence, torchrun's RANK/WORLD_SIZE/LOCAL_RANK, SLURM's
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, Open MPI's OMPI_COMM_WORLD_* and MPICH/Intel MPI's
PMI_RANK/PMI_SIZE (+ MPI_LOCALRANKID); with none of them it is a single process.
`init_distributed()` sets MASTER_ADDR/MASTER_PORT defaults when a launcher did not, then calls
`torch.distributed.init_process_group` with nccl on GPU and gloo on CPU; a world of one rank uses
an in-process store and binds no port. `exit_with_launcher()` makes a worker die with torchrun.
"""
from __future__ import annotations

import datetime
import os
import re
import signal
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"          # torchrun | slurm | mpi | pmi | single
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise RuntimeError(f"environment variable {key}={env[key]!r} is not an integer; "
                           f"check the launcher command") from None


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as 'gpu[012-015,020],cpu3' -> 'gpu012'."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return "127.0.0.1"
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def discover_env(env: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Rank, world size, local rank and rendezvous address from the launcher's variables."""
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR")
    port = int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(_int(env, "RANK"), _int(env, "WORLD_SIZE"),
                       _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                       "torchrun", addr or "127.0.0.1", port)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if addr is None:
            addr = _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
            # 20000-31999: below Linux's ephemeral ports (32768-60999), which outgoing connections take
            port = 20000 + _int(env, "SLURM_JOB_ID") % 12000
        return DistEnv(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"),
                       _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0, "slurm", addr, port)
    if "OMPI_COMM_WORLD_RANK" in env:
        return DistEnv(_int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE"),
                       _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0,
                       "mpi", addr or "127.0.0.1", port)
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        local = env.get("MPI_LOCALRANKID", env.get("PMI_LOCAL_RANK", "0"))
        return DistEnv(_int(env, "PMI_RANK"), _int(env, "PMI_SIZE"), int(local), "pmi",
                       addr or "127.0.0.1", port)
    return DistEnv(master_addr=addr or "127.0.0.1", master_port=port)


def pick_device(requested: str = "auto") -> torch.device:
    """cuda when available (or asked for), else cpu."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but torch.cuda.is_available() is False; use train.device=cpu")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def init_distributed(backend: str = "auto", device: str = "auto", timeout_s: float = 1800) -> DistEnv:
    """Initialise torch.distributed from the launcher's environment (no-op if already done).

    A single process with no launcher variables still gets a 1-rank process group, so the
    training loop has one code path.
    """
    e = discover_env()
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(e.local_rank % torch.cuda.device_count())
    if dist.is_initialized():
        e.rank, e.world_size = dist.get_rank(), dist.get_world_size()
        return e
    if backend == "auto":
        backend = "nccl" if (device != "cpu" and torch.cuda.is_available()) else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if e.world_size == 1:
        # one rank needs no rendezvous: an in-process store binds no port, so any number of
        # single-process runs (and the test suite beside them) can share a machine
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return e
    os.environ.setdefault("MASTER_ADDR", e.master_addr)
    os.environ.setdefault("MASTER_PORT", str(e.master_port))
    dist.init_process_group(backend, rank=e.rank, world_size=e.world_size, timeout=timeout)
    return e


PR_SET_PDEATHSIG = 1


def exit_with_parent(sig: int = signal.SIGKILL, expected_parent: Optional[int] = None) -> bool:
    """Have the kernel send `sig` to this process when its parent dies (Linux prctl PR_SET_PDEATHSIG).

    `expected_parent` (default: the current parent) closes the race of a parent that died before
    the call: if the parent is already another process, this one exits at once. Returns False where
    the platform has no prctl (nothing is armed)."""
    import ctypes
    import ctypes.util
    parent = os.getppid() if expected_parent is None else expected_parent
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def exit_with_launcher(env: Optional[Mapping[str, str]] = None) -> bool:
    """Under torchrun (or a study runner, XLMR_MP_PARENT_PID): die with the launcher, so a
    `kill -9` of the launcher does not leave workers training into the run directory."""
    env = os.environ if env is None else env
    if "XLMR_MP_PARENT_PID" in env:
        return exit_with_parent(expected_parent=int(env["XLMR_MP_PARENT_PID"]))
    if "TORCHELASTIC_RUN_ID" in env or "TORCHELASTIC_RESTART_COUNT" in env:
        return exit_with_parent()
    return False


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def comm_device() -> torch.device:
    """Where small tensors for collectives must live: the current GPU under nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_floats(values, group=None, op: str = "sum") -> list:
    """`values` (floats) summed, or with op="max" max-ed, over `group` (None: every rank) in
    float64; returned as floats. The values themselves without torch.distributed or in a group of one."""
    values = [float(v) for v in values]
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return values
    if op not in ("sum", "max"):
        raise ValueError(f"all_reduce_floats: op={op!r}, choose sum or max")
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return t.tolist()
