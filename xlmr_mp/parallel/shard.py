"""Tensor-parallel resharding of model (and optimizer-state) tensors, keyed by parameter name.

A FULL state dict holds every tensor at its unsharded shape with the REAL vocabulary
(cfg.vocab_size rows); a LOCAL one is what TP rank r of TP size T holds: split tensors cut into T
contiguous chunks along `partition_dim(name)`, vocabulary tensors first padded with zero rows to
`padded_vocab_size(V, cfg.make_vocab_size_divisible_by, T)`. So any checkpoint reshards to any TP.
Pure tensor functions over a `ShardSpec`, the model's table of which names are split how (XLM-R's
is `xlmr_mp/model/sharding.py`); the trainer applies them to optimizer states of the same shapes too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from xlmr_mp.parallel.vocab import padded_vocab_size


@dataclass(frozen=True)
class ShardSpec:
    """How a model's parameters are split under TP, by name: `vocab` names (dim 0 is the
    vocabulary: padded under TP, split on dim 0, stripped in full state dicts), `column` suffixes
    (split on dim 0) and `row` suffixes (split on dim 1); every other tensor is replicated."""
    vocab: tuple
    column: tuple
    row: tuple

    def is_vocab_param(self, name: str) -> bool:
        return name in self.vocab

    def partition_dim(self, name: str) -> Optional[int]:
        """Dimension `name` is split on under TP, or None when it is replicated on every TP rank."""
        if self.is_vocab_param(name) or name.endswith(self.column):
            return 0
        if name.endswith(self.row):
            return 1
        return None

    def shard_tensor(self, name: str, full: torch.Tensor, cfg, tp_size: int, tp_rank: int) -> torch.Tensor:
        """The TP rank's local piece of one full tensor (vocab padding added), contiguous."""
        dim = self.partition_dim(name)
        if self.is_vocab_param(name):
            if full.shape[0] != cfg.vocab_size:
                raise ValueError(f"{name}: full tensor has {full.shape[0]} vocabulary rows, model.vocab_size is "
                                 f"{cfg.vocab_size}; the checkpoint and the config disagree")
            vp = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp_size)
            if vp > full.shape[0]:
                pad = full.new_zeros((vp - full.shape[0],) + tuple(full.shape[1:]))
                full = torch.cat([full, pad], dim=0)
        if dim is None or tp_size == 1:
            return full.clone().contiguous() if dim is None else full.contiguous()
        if full.shape[dim] % tp_size:
            raise ValueError(f"{name}: dim {dim} of size {full.shape[dim]} is not divisible by TP size {tp_size}")
        return full.chunk(tp_size, dim=dim)[tp_rank].clone().contiguous()

    def full_to_local(self, full_state_dict: dict, cfg, tp_size: int, tp_rank: int) -> dict:
        """Local state dict of TP rank `tp_rank` (of `tp_size`) from a full state dict."""
        return {k: self.shard_tensor(k, v, cfg, tp_size, tp_rank) if torch.is_tensor(v) else v
                for k, v in full_state_dict.items()}

    def local_to_full(self, local_state_dicts: list, cfg) -> dict:
        """Full state dict (real vocabulary) from the local state dicts of TP ranks 0..T-1, in order.
        Replicated tensors are taken from rank 0."""
        if not local_state_dicts:
            raise ValueError("local_to_full needs at least one local state dict")
        first = local_state_dicts[0]
        out = {}
        for k, v in first.items():
            if not torch.is_tensor(v):
                out[k] = v
                continue
            dim = self.partition_dim(k)
            if dim is None or len(local_state_dicts) == 1:
                full = v.clone()
            else:
                full = torch.cat([sd[k] for sd in local_state_dicts], dim=dim)
            if self.is_vocab_param(k):
                full = full[: cfg.vocab_size].clone()
            out[k] = full
        return out
