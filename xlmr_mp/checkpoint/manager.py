"""Save, load and resume one rank's TrainState (checkpoint/state.py, the one the Trainer holds)
through the sharded checkpoints of checkpoint/sharded.py, at any TP / PP / DP layout.

    ckpt = CheckpointManager(cfg, groups)
    path = ckpt.resume_path()                 # <checkpoint.dir>/latest, else checkpoint.load, else None
    ckpt.load(state, path)                    # exact at the saved layout, resharded at another one
    ckpt.save(state)                          # collective: every rank calls it

The state saved is: the parameters (by global name), the optimizer's Adam state by name, and per
rank the step, the loss scaler, the data-loader position and the RNG states (Python, numpy, torch,
the generator of this rank's CUDA device and the tensor-parallel tracker). RNG streams do not map
across layouts: a load at another layout reseeds them from (train.seed + step).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from xlmr_mp.checkpoint.format import latest_checkpoint, read_meta, resolve_checkpoint_dir
from xlmr_mp.checkpoint.sharded import (load_model_state, load_optim_state, load_rank_state, same_layout,
                                        save_checkpoint)
from xlmr_mp.checkpoint.state import TrainState, log0
from xlmr_mp.config import config_to_dict
from xlmr_mp.parallel.grads import sync_tied_embedding_weight
from xlmr_mp.parallel.state import seed_parallel_rng


class CheckpointManager:
    """Where a run's checkpoints live and how a TrainState (checkpoint/state.py) goes in and out of
    them."""

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

    def save(self, state: TrainState) -> str:
        """Write `state` as ROOT/step_N (collective); returns the step directory."""
        _check_state(state)
        g, p = self.groups, self.cfg.parallel
        meta = {"model": config_to_dict(self.cfg.model), "tp": g.tp_size, "pp": g.pp_size, "dp": g.dp_size,
                "virtual_stages": p.virtual_stages, "zero": bool(p.distributed_optimizer),
                "config": config_to_dict(self.cfg)}
        rank_state = state.rank_state_dict()
        path = save_checkpoint(self.root, state.step, g,
                               model_state={n: t.detach() for n, t in state.named},
                               optim_state=state.optimizer.state_by_name(), rank_state=rank_state, meta=meta,
                               keep_last=self.cfg.checkpoint.keep_last,
                               write_optim=bool(p.distributed_optimizer) or g.dp_rank == 0)
        log0(f"saved checkpoint {path}")
        return path

    def load(self, state: TrainState, path: str, load_optim: bool = True, branch: bool = False) -> None:
        """Restore `state` from a step directory saved at any layout (exact at the same layout).
        branch: `path` is another run's checkpoint (checkpoint.branch_from): everything is restored,
        and the loader continues the parent's data position under this run's schedules."""
        _check_state(state)
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
            state.load_rank_state_dict(rs, restore_rng=same, branch=branch)
        if not same or rs is None:   # RNG streams do not map across layouts: reseed from (seed, step)
            seed_parallel_rng(self.cfg.train.seed + state.step, g)
        log0(f"loaded checkpoint {path} (step {state.step}, {'same' if same else 'resharded from'} layout "
              f"tp={meta['tp']} pp={meta['pp']} dp={meta.get('dp', '?')})")


def _check_state(state) -> None:
    if not isinstance(state, TrainState):
        raise TypeError(f"CheckpointManager takes a TrainState (checkpoint/state.py), not {type(state).__name__}: "
                        f"pass trainer.state")
