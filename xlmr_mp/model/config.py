"""Model configuration and presets (XLM-R Base/Large/XL/XXL and the paper's ablation shapes)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from xlmr_mp.errors import ConfigError

# Shape presets: XLM-R Base/Large (Conneau et al. 2020), XL/XXL (Goyal et al. 2021), and the
# XLM-R paper's ablation shapes (BERT-base with a 150k vocabulary; 12-layer models of widths
# 768 / 960 / 1152 with 64-dim heads and the same 150k vocabulary).
PRESETS: dict = {
    "base": dict(vocab_size=250002, hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072),
    "large": dict(vocab_size=250002, hidden_size=1024, num_layers=24, num_heads=16, ffn_size=4096),
    "xl": dict(vocab_size=250002, hidden_size=2560, num_layers=36, num_heads=32, ffn_size=10240),
    "xxl": dict(vocab_size=250002, hidden_size=4096, num_layers=48, num_heads=32, ffn_size=16384),
    "bert-base-150k": dict(vocab_size=150002, hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072),
    "width-768": dict(vocab_size=150002, hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072),
    "width-960": dict(vocab_size=150002, hidden_size=960, num_layers=12, num_heads=15, ffn_size=3840),
    "width-1152": dict(vocab_size=150002, hidden_size=1152, num_layers=12, num_heads=18, ffn_size=4608),
}


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

    # Fields given explicitly (constructor values that differ from the default, or any value set
    # after construction, e.g. by YAML or overrides) win over the preset.
    def __post_init__(self):
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        object.__setattr__(self, "_explicit", {k for k, v in defaults.items() if getattr(self, k) != v})

    def __setattr__(self, name, value):
        if hasattr(self, "_explicit"):
            self._explicit.add(name)
        object.__setattr__(self, name, value)

    @classmethod
    def resolved(cls, **fields) -> "ModelConfig":
        """A config whose values are final (e.g. read back from a checkpoint's meta.json): every
        field counts as explicit, so the preset named in it changes nothing."""
        cfg = cls(**fields)
        cfg._explicit.update(f.name for f in dataclasses.fields(cls))
        return cfg

    def apply_preset(self) -> "ModelConfig":
        """Fill the shape fields from PRESETS[self.preset], keeping explicitly set values; in place."""
        if not self.preset:
            return self
        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset={self.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
        for k, v in PRESETS[self.preset].items():
            if k not in self._explicit:
                object.__setattr__(self, k, v)
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        """Apply the preset (explicit values win), then check the shapes."""
        self.apply_preset()
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "max_positions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 1")
        if not (0 <= self.dropout < 1 and 0 <= self.attention_dropout < 1):
            raise ConfigError("model.dropout and model.attention_dropout must be in [0, 1)")
