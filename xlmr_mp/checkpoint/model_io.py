"""Model-only checkpoints (the converter's, and the model part of the trainer's): write a full
state dict at any TP x PP, read any checkpoint back as a full state dict. The directory format
(file names, meta.json, `latest`) is checkpoint/format.py's; here meta.json also carries
"stage_layers": [[ids], ...].

Stage p holds the layers `stage_layers[p]`, plus `embeddings.*` on the first stage and `lm_head.*`
on the last; with PP > 1 the last stage also holds `lm_head.decoder_weight` (its copy of the tied
word embedding). Writes go to a temporary directory renamed into place when complete.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import torch

from xlmr_mp.atomic import atomic_dir
from xlmr_mp.checkpoint.format import (DECODER_COPY, FORMAT, WORD_EMB, merge_model_shards, model_file,  # noqa: F401
                                       read_meta, resolve_checkpoint_dir, write_meta)
from xlmr_mp.errors import CheckpointError  # noqa: F401 (re-exported)
from xlmr_mp.model.config import ModelConfig
from xlmr_mp.model.sharding import full_to_local

# Buffers of the model that are constant and never trained: the trainer saves parameters only, so
# its checkpoints lack them; readers rebuild them from the model config.
TOKEN_TYPE = "embeddings.token_type_embeddings"


def constant_buffers(cfg: ModelConfig) -> dict:
    """{name: value} of the constant, untrained buffers a saved checkpoint may omit."""
    return {TOKEN_TYPE: torch.zeros(1, cfg.hidden_size)}


def even_stage_layers(num_layers: int, pp: int) -> list:
    """Default layer split: contiguous, as even as possible, earlier stages take the remainder
    (e.g. 10 layers on 4 stages -> [0,1,2] [3,4,5] [6,7] [8,9])."""
    if pp > num_layers:
        raise ValueError(f"{pp} pipeline stages for {num_layers} layers: each stage needs a layer")
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for p in range(pp):
        n = base + (1 if p < extra else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


def stage_of(name: str, stage_layers: Sequence[Sequence[int]]) -> int:
    """Pipeline stage that holds parameter `name`."""
    if name.startswith("embeddings."):
        return 0
    if name.startswith("lm_head."):
        return len(stage_layers) - 1
    if name.startswith("layers."):
        layer = int(name.split(".")[1])
        for p, ids in enumerate(stage_layers):
            if layer in ids:
                return p
        raise ValueError(f"{name}: layer {layer} is in no stage of {stage_layers}")
    raise ValueError(f"{name}: not a model parameter name (embeddings.*, layers.N.*, lm_head.*)")


def save_model_checkpoint(path: str, full_state_dict: dict, cfg: ModelConfig, tp: int = 1, pp: int = 1,
                          step: int = 0, stage_layers: Optional[Sequence[Sequence[int]]] = None,
                          extra_meta: Optional[dict] = None) -> str:
    """Write a full (unsharded, real-vocabulary) state dict as a TP x PP checkpoint at `path`.
    `stage_layers` (default `even_stage_layers`) gives the global layer ids of each stage."""
    stage_layers = [list(s) for s in (stage_layers or even_stage_layers(cfg.num_layers, pp))]
    if len(stage_layers) != pp:
        raise ValueError(f"stage_layers has {len(stage_layers)} stages, pp={pp}")
    per_stage = [dict() for _ in range(pp)]
    for name, t in full_state_dict.items():
        if name == DECODER_COPY:
            continue
        per_stage[stage_of(name, stage_layers)][name] = t
    if pp > 1 and WORD_EMB in full_state_dict and any(k.startswith("lm_head.") for k in full_state_dict):
        per_stage[-1][DECODER_COPY] = full_state_dict[WORD_EMB]
    meta = {"model": dataclasses.asdict(cfg), "tp": tp, "pp": pp, "step": int(step), "stage_layers": stage_layers}
    meta.update(extra_meta or {})
    with atomic_dir(path) as tmp:
        for p in range(pp):
            for t in range(tp):
                torch.save(full_to_local(per_stage[p], cfg, tp, t), os.path.join(tmp, model_file(t, p)))
        write_meta(tmp, meta)
    return path


def config_from_meta(meta: dict) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        cfg = ModelConfig.resolved(**{k: v for k, v in meta["model"].items() if k in names})
        cfg.validate()
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"meta.json: field 'model' is not a valid model config ({e})") from None
    return cfg


def load_full_model_state(path: str) -> tuple:
    """(ModelConfig, full state dict) of a checkpoint, merging its TP and PP shards."""
    step_dir = resolve_checkpoint_dir(path)
    meta = read_meta(step_dir)
    cfg = config_from_meta(meta)
    full = merge_model_shards(step_dir, cfg, meta)
    if WORD_EMB in full:
        full.pop(DECODER_COPY, None)
    elif DECODER_COPY in full:
        full[WORD_EMB] = full.pop(DECODER_COPY)
    if WORD_EMB in full:            # the trainer saves parameters only: rebuild the constant buffers
        for name, value in constant_buffers(cfg).items():
            full.setdefault(name, value)
    return cfg, full


def local_state_for(model, full_state_dict: dict) -> dict:
    """The state dict `model` (an XLMRModel stage at any TP) loads from a full state dict."""
    full = dict(full_state_dict)
    if WORD_EMB in full:
        full.setdefault(DECODER_COPY, full[WORD_EMB])
        for name, value in constant_buffers(model.cfg).items():
            full.setdefault(name, value)
    wanted = model.state_dict().keys()
    missing = [k for k in wanted if k not in full]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors this model needs, e.g. {missing[:3]}; "
                              f"it was saved from a different model")
    return full_to_local({k: full[k] for k in wanted}, model.cfg, model.tp_size, model.tp_rank)
