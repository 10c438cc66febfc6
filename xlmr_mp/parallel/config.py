"""Parallel layout options (`parallel.*`): TP / PP / DP sizes, pipeline schedule, ZeRO, backend.

`validate()` checks each option alone; the rules that tie them to the model, the batch and the
world size live in `xlmr_mp/parallel/layout.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from xlmr_mp.errors import ConfigError

BACKENDS = ("auto", "nccl", "gloo")


@dataclass
class ParallelConfig:
    tensor: int = 1                 # TP size
    pipeline: int = 1               # PP size
    data: int = 0                   # DP size; 0 = world_size / (TP * PP)
    virtual_stages: int = 1         # >1 selects the interleaved 1F1B schedule
    schedule: str = "1f1b"          # 1f1b | interleaved | gpipe
    stage_layers: Optional[list] = None  # explicit layers per (virtual) stage, e.g. [5, 6, 6, 7]
    first_last_fewer: int = 0       # without stage_layers: first/last stage count as this many extra layers
                                    # (embedding / MLM head), so they get fewer; 0 = even split
    sequence_parallel: bool = False
    distributed_optimizer: bool = False  # ZeRO-1: optimizer state sharded across DP
    ddp_bucket_mb: float = 25.0
    backend: str = "auto"           # auto (nccl on GPU, gloo on CPU) | nccl | gloo

    def validate(self) -> None:
        """Each option on its own (sizes, bucket, backend); layout rules: `layout.validate_layout`."""
        for name in ("tensor", "pipeline", "virtual_stages"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.data < 0:
            raise ConfigError(f"parallel.data={self.data} must be >= 0 (0 = infer from world size)")
        if self.ddp_bucket_mb <= 0:
            raise ConfigError(f"parallel.ddp_bucket_mb={self.ddp_bucket_mb} must be > 0")
        if self.backend not in BACKENDS:
            raise ConfigError(f"parallel.backend={self.backend!r}: choose auto, nccl or gloo")
