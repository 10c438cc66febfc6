"""The small user API: load a checkpoint of any TP/PP layout as one single-process model.

    from xlmr_mp import load_model
    model = load_model("runs/x/checkpoints")          # step dir, or a root with a `latest` file
    logits = model(input_ids, attention_mask)          # [B, S, vocab_size], eval mode

Reads the trainer's checkpoints (parameters only) as well as the converter's; a checkpoint that
cannot be read raises `CheckpointError` naming the file.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from xlmr_mp import kernels
from xlmr_mp.checkpoint.model_io import CheckpointError, load_full_model_state, local_state_for
from xlmr_mp.model.config import ModelConfig
from xlmr_mp.model.xlmr import XLMRModel

__all__ = ["load_model", "model_from_full_state", "run_tokenizer_path", "CheckpointError"]


def model_from_full_state(cfg: ModelConfig, full: dict, device: str = "cpu",
                          dtype: torch.dtype = torch.float32) -> XLMRModel:
    """A TP-1 XLMRModel in eval mode holding the full (unsharded) state dict `full`, whose logits
    are over the real vocabulary (padding ids stripped), with the fused paths of `device` applied
    (xlmr_mp.kernels.apply)."""
    model = XLMRModel(cfg, init_seed=0)
    model.load_state_dict(local_state_for(model, full), strict=True)
    model.strip_vocab_padding = True
    model = model.to(device=device, dtype=dtype).eval()
    kernels.apply(model, device)
    return model


def load_model(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> XLMRModel:
    """XLMRModel (TP 1, all layers, embeddings and head) in eval mode on `device`, whose
    `model(input_ids, attention_mask=None)` returns masked-LM logits over the real vocabulary
    (padding ids stripped) for every position. `path`: a step directory or a checkpoint root."""
    cfg, full = load_full_model_state(path)
    if not any(k.startswith("lm_head.") for k in full) or "embeddings.word_embeddings.weight" not in full:
        raise CheckpointError(f"{path}: the checkpoint lacks the embeddings or the MLM head (a partial "
                              f"pipeline checkpoint?); every stage's model file is needed")
    return model_from_full_state(cfg, full, device, dtype)


def run_tokenizer_path(step_dir: str, meta: dict) -> Optional[str]:
    """The SentencePiece model of the run that wrote a checkpoint (its config's data.tokenizer),
    found as given (absolute, or relative to the working directory) or relative to the run
    directory above the checkpoint; None when the run had none. A path that is nowhere is
    returned as given, for the caller's error message."""
    given = ((meta.get("config") or {}).get("data") or {}).get("tokenizer") or ""
    if not given:
        return None
    if os.path.isabs(given) or os.path.isfile(given):
        return given
    here = os.path.abspath(step_dir)
    for _ in range(3):            # step_N/ -> checkpoints/ -> run_dir/ -> its parent
        here = os.path.dirname(here)
        if os.path.isfile(os.path.join(here, given)):
            return os.path.join(here, given)
    return given
