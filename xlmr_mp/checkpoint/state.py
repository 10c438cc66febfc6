"""TrainState: everything one rank needs to resume a run exactly, in one object the Trainer holds
and `CheckpointManager.save` / `load` take (lingua's stateful TrainState).

    state = TrainState(chunks, optimizer, scaler, loader)      # step 0
    ckpt.save(state); ckpt.load(state, path)

What it holds and where each part goes in a checkpoint (checkpoint/sharded.py):
  chunks / named   this rank's model chunks; `named` = [(global name, parameter)] in chunk order:
                   the model shards, by global name (resharded at another layout)
  optimizer        `state_by_name()` / `load_state_by_name()` / `owned_names`: the Adam state, by name
  step             optimizer steps taken                                        } this rank's
  scaler           the loss scaler's `state_dict()`                              } rank state
  loader           the data position (`state_dict()`; None for a plain iterator) }
  rng              the process's generators (Python, numpy, torch, this rank's CUDA device, the
                   tensor-parallel tracker): read by `rng_state()` when saved, not stored here,
                   since they are process-wide
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from xlmr_mp.parallel.state import get_rng_tracker


def rng_state() -> dict:
    """Every random generator's state on this rank (torch, this rank's CUDA device, Python, numpy,
    the TP tracker)."""
    return {"torch": torch.get_rng_state(), "cuda": cuda_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state(), "tracker": get_rng_tracker().get_states()}


def set_rng_state(st: dict) -> None:
    """Restore what `rng_state()` returned."""
    torch.set_rng_state(st["torch"])
    set_cuda_rng_state(st.get("cuda"))
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    get_rng_tracker().set_states(st["tracker"])


def cuda_rng_state(cuda=torch.cuda) -> Optional[torch.Tensor]:
    """The generator state of this rank's own (current) CUDA device, None without CUDA. One rank
    draws from its one device: not `get_rng_state_all()`, whose list is indexed by the devices the
    saving process saw (8 under torchrun, 1 a task under SLURM's binding). `cuda`: torch.cuda (a
    stand-in in tests)."""
    if not cuda.is_available():
        return None
    return cuda.get_rng_state(cuda.current_device())


def set_cuda_rng_state(saved, cuda=torch.cuda) -> None:
    """Put `saved` (what `cuda_rng_state` returned) into this rank's current CUDA device, whatever
    the number of devices this process sees. A checkpoint written before this format holds
    `get_rng_state_all()`'s list: its entry at the current device's index is used when there is
    one (the same device binding as the saver), else the generator is left as seeded."""
    if saved is None or not cuda.is_available():
        return
    index = cuda.current_device()
    if isinstance(saved, (list, tuple)):
        if index >= len(saved):
            log0(f"checkpoint holds CUDA generator states for {len(saved)} devices, this rank runs on "
                 f"device {index}: its CUDA generator is not restored")
            return
        saved = saved[index]
    cuda.set_rng_state(saved, index)


def log0(msg: str) -> None:
    """Print on rank 0 (every process when torch.distributed is not initialised)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[xlmr_mp.train] {msg}", flush=True)


@dataclass
class TrainState:
    """One rank's training state (see the module doc). `named` is derived from `chunks` once, in
    chunk order; the objects are shared with the Trainer (the Trainer's step is this step)."""
    chunks: List[nn.Module]
    optimizer: Any
    scaler: Any
    loader: Any = None
    step: int = 0
    named: List[Tuple[str, nn.Parameter]] = field(init=False, repr=False)

    def __post_init__(self):
        self.named = [(n, p) for c in self.chunks for n, p in c.named_parameters()]

    def rank_state_dict(self) -> dict:
        """This rank's part of a checkpoint: step, scaler, RNG states, loader position."""
        loader = self.loader
        return {"step": self.step, "scaler": self.scaler.state_dict(), "rng": rng_state(),
                "loader": loader.state_dict() if hasattr(loader, "state_dict") else None}

    def load_rank_state_dict(self, rs: dict, restore_rng: bool, branch: bool = False) -> None:
        """Restore the scaler, the loader's position (`branch`: continue the parent's position under
        this run's phases) and, with `restore_rng`, the RNG states (the step is the checkpoint's,
        set by the caller from its meta)."""
        self.scaler.load_state_dict(rs["scaler"])
        if rs.get("loader") is not None and hasattr(self.loader, "load_state_dict"):
            if branch:
                self.loader.load_state_dict(rs["loader"], branch=True)
            else:
                self.loader.load_state_dict(rs["loader"])
        if restore_rng:
            set_rng_state(rs["rng"])
