"""Data configuration: where the indexed datasets are, language sampling, packing, masking."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from xlmr_mp.errors import ConfigError


@dataclass
class DataConfig:
    path: str = ""                   # OUT of tools/preprocess_data.py: <path>/<lang>/{train,valid,test}.{bin,idx}
    tokenizer: str = ""              # SentencePiece model (P.model) with P.dict.txt beside it
    languages: Optional[list] = None  # None = every language found under path
    alpha: float = 0.3               # q_i proportional to p_i^alpha
    share_unit: str = "tokens"       # tokens | sentences: what p_i counts
    seq_length: int = 512            # block size (tokens, incl. <s>)
    break_mode: str = "complete"     # complete (blocks cross documents, fairseq) | complete_doc
    block_cache: bool = True         # cache block offsets next to the data (<split>.blocks-*.npy)
    mask_prob: float = 0.15
    mask_replace_prob: float = 0.8   # of masked: <mask>
    random_replace_prob: float = 0.1  # of masked: random non-special token
    whole_word_mask: bool = False
    span_mask: bool = False
    span_mean_length: float = 3.0
    num_workers: int = 0             # loader worker processes (samples identical for any value)
    seed: int = 1234
    # schedules (xlmr_mp/data/phases.py): lists of phases {step: N | tokens: N, <value>: ...}
    alpha_schedule: Optional[list] = None     # [{step: 0, alpha: 0.7}, ...]
    alpha_interpolation: str = "stepped"      # stepped | linear
    alpha_update_steps: int = 100             # linear alpha: one value per this many steps
    language_schedule: Optional[list] = None  # [{step: 0, languages: [en, fr]}, ...]
    mask_schedule: Optional[list] = None      # [{step: 0, mask_prob: 0.3}, ...]
    mask_interpolation: str = "stepped"       # stepped | linear

    def validate(self) -> None:
        if self.alpha <= 0 or self.alpha > 1:
            raise ConfigError(f"data.alpha={self.alpha} must be in (0, 1]")
        if self.share_unit not in ("tokens", "sentences"):
            raise ConfigError(f"data.share_unit={self.share_unit!r}: choose tokens or sentences")
        if not 0 < self.mask_prob < 1:
            raise ConfigError(f"data.mask_prob={self.mask_prob} must be in (0, 1)")
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise ConfigError("data.mask_replace_prob + data.random_replace_prob must be <= 1")
        if self.seq_length < 4:
            raise ConfigError(f"data.seq_length={self.seq_length} must be >= 4")
        if self.break_mode not in ("complete", "complete_doc"):
            raise ConfigError(f"data.break_mode={self.break_mode!r}: choose complete or complete_doc")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")
        if self.span_mask and self.span_mean_length < 1:
            raise ConfigError(f"data.span_mean_length={self.span_mean_length} must be >= 1")
        if self.mask_replace_prob < 0 or self.random_replace_prob < 0:
            raise ConfigError("data.mask_replace_prob and data.random_replace_prob must be >= 0")
