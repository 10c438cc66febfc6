"""Model configuration and presets (XLM-R Base/Large/XL/XXL and the paper's ablation shapes)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    preset: str = ""                 # when set, fills the shape fields below (explicit keys still win)
    vocab_size: int = 250002         # real vocabulary (dictionary size); padded for TP in parallel/
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_size: int = 4096
    max_positions: int = 514         # 512 tokens + padding_idx offset of 2, as fairseq/HF
    pad_id: int = 1
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layernorm_eps: float = 1e-5
    init_std: float = 0.02
    make_vocab_size_divisible_by: int = 128

    def validate(self) -> None:
        from xlmr_mp.config import ConfigError
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "max_positions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 1")
        if not (0 <= self.dropout < 1 and 0 <= self.attention_dropout < 1):
            raise ConfigError("model.dropout and model.attention_dropout must be in [0, 1)")
