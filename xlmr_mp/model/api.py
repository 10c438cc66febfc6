"""The small user API: load a checkpoint of any TP/PP layout as one single-process model.

    from xlmr_mp import load_model
    model = load_model("runs/x/checkpoints")          # step dir, or a root with a `latest` file
    logits = model(input_ids, attention_mask)          # [B, S, vocab_size], eval mode
"""
from __future__ import annotations

import torch

from xlmr_mp.checkpoint.model_io import load_full_model_state, local_state_for
from xlmr_mp.model.xlmr import XLMRModel


def load_model(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> XLMRModel:
    """XLMRModel (TP 1, all layers, embeddings and head) in eval mode on `device`, whose
    `model(input_ids, attention_mask=None)` returns masked-LM logits over the real vocabulary
    (padding ids stripped) for every position."""
    cfg, full = load_full_model_state(path)
    model = XLMRModel(cfg, init_seed=0)
    model.load_state_dict(local_state_for(model, full), strict=True)
    model.strip_vocab_padding = True
    return model.to(device=device, dtype=dtype).eval()
