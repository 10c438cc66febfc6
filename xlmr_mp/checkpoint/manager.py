"""Save, load and resume one rank's training state (the TrainState the Trainer holds) through the
sharded checkpoints of checkpoint/sharded.py, at any TP / PP / DP layout.

    ckpt = CheckpointManager(cfg, groups)
    path = ckpt.resume_path()                 # <checkpoint.dir>/latest, else checkpoint.load, else None
    ckpt.load(trainer, path)                  # exact at the saved layout, resharded at another one
    ckpt.save(trainer)                        # collective: every rank calls it

The state saved is: the parameters (by global name), the optimizer's Adam state by name, and per
rank the step, the loss scaler, the data-loader position and the RNG states (Python, numpy, torch,
the generator of this rank's CUDA device and the tensor-parallel tracker). RNG streams do not map
across layouts: a load at another layout reseeds them from (train.seed + step).
"""
from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from xlmr_mp.checkpoint.format import latest_checkpoint, read_meta, resolve_checkpoint_dir
from xlmr_mp.checkpoint.sharded import (load_model_state, load_optim_state, load_rank_state, same_layout,
                                        save_checkpoint)
from xlmr_mp.config import config_to_dict
from xlmr_mp.parallel.grads import sync_tied_embedding_weight
from xlmr_mp.parallel.state import get_rng_tracker, seed_parallel_rng


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
            _log0(f"checkpoint holds CUDA generator states for {len(saved)} devices, this rank runs on "
                  f"device {index}: its CUDA generator is not restored")
            return
        saved = saved[index]
    cuda.set_rng_state(saved, index)


def _log0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[xlmr_mp.train] {msg}", flush=True)


class CheckpointManager:
    """Where a run's checkpoints live and how a TrainState goes in and out of them. The state is
    an object with `named` ([(global name, parameter)]), `chunks`, `optimizer` (state_by_name,
    load_state_by_name, owned_names), `scaler`, `loader` and `step`: the Trainer."""

    def __init__(self, cfg, groups):
        self.cfg, self.groups = cfg, groups
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.root = cfg.checkpoint.dir or os.path.join(cfg.run_dir, "checkpoints")

    def resume_path(self) -> Optional[str]:
        """The step directory to start from: this run's `latest` (checkpoint.resume), else
        checkpoint.load (a step directory or a root whose `latest` names one), else None."""
        if self.cfg.checkpoint.resume:
            p = latest_checkpoint(self.root)
            if p is not None:
                return p
        if self.cfg.checkpoint.load:
            return resolve_checkpoint_dir(self.cfg.checkpoint.load)
        return None

    def save(self, state) -> str:
        """Write `state` as ROOT/step_N (collective); returns the step directory."""
        g, p = self.groups, self.cfg.parallel
        meta = {"model": config_to_dict(self.cfg.model), "tp": g.tp_size, "pp": g.pp_size, "dp": g.dp_size,
                "virtual_stages": p.virtual_stages, "zero": bool(p.distributed_optimizer),
                "config": config_to_dict(self.cfg)}
        loader = state.loader
        rank_state = {"step": state.step, "scaler": state.scaler.state_dict(), "rng": rng_state(),
                      "loader": loader.state_dict() if hasattr(loader, "state_dict") else None}
        path = save_checkpoint(self.root, state.step, g,
                               model_state={n: t.detach() for n, t in state.named},
                               optim_state=state.optimizer.state_by_name(), rank_state=rank_state, meta=meta,
                               keep_last=self.cfg.checkpoint.keep_last,
                               write_optim=bool(p.distributed_optimizer) or g.dp_rank == 0)
        _log0(f"saved checkpoint {path}")
        return path

    def load(self, state, path: str, load_optim: bool = True, branch: bool = False) -> None:
        """Restore `state` from a step directory saved at any layout (exact at the same layout).
        branch: `path` is another run's checkpoint (checkpoint.branch_from): everything is restored,
        and the loader continues the parent's data position under this run's schedules."""
        meta = read_meta(path)
        g = self.groups
        same = same_layout(meta, g, self.cfg.parallel.virtual_stages, self.cfg.parallel.distributed_optimizer)
        sd = load_model_state(path, [n for n, _ in state.named], self.cfg.model, g, same)
        with torch.no_grad():
            for n, p in state.named:
                if n not in sd:
                    raise KeyError(f"{path}: no weights for {n!r}; model.* options differ from the checkpoint's")
                if tuple(sd[n].shape) != tuple(p.shape):
                    raise ValueError(f"{path}: {n} has shape {tuple(sd[n].shape)}, this model {tuple(p.shape)}; "
                                     f"model.* options differ from the checkpoint's meta.json")
                p.copy_(sd[n])
        sync_tied_embedding_weight(state.chunks, g)
        if load_optim:
            opt = state.optimizer
            opt.load_state_by_name(load_optim_state(path, opt.owned_names, self.cfg.model, g, same))
        rs = load_rank_state(path, self.rank if same else 0)
        state.step = int(meta.get("step", 0))
        if rs is not None:
            state.scaler.load_state_dict(rs["scaler"])
            if rs.get("loader") is not None and hasattr(state.loader, "load_state_dict"):
                if branch:
                    state.loader.load_state_dict(rs["loader"], branch=True)
                else:
                    state.loader.load_state_dict(rs["loader"])
        if same and rs is not None:
            set_rng_state(rs["rng"])
        else:   # RNG streams do not map across layouts: reseed from (seed, step)
            seed_parallel_rng(self.cfg.train.seed + state.step, g)
        _log0(f"loaded checkpoint {path} (step {state.step}, {'same' if same else 'resharded from'} layout "
              f"tp={meta['tp']} pp={meta['pp']} dp={meta.get('dp', '?')})")
