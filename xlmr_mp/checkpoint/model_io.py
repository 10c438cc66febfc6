"""Model checkpoint directories (the layout shared by the trainer, the converter and load_model).

    CKPT/meta.json                    {"format": "xlmr_mp-v1", "model": {ModelConfig fields},
                                       "tp": T, "pp": P, "step": N, "stage_layers": [[ids], ...]}
    CKPT/model_tp{t:02d}_pp{p:02d}.pt {param name with GLOBAL layer index: local tensor shard}

Stage p holds the layers `stage_layers[p]`, plus `embeddings.*` on the first stage and `lm_head.*`
on the last; with PP > 1 the last stage also holds `lm_head.decoder_weight` (its copy of the tied
word embedding). A checkpoint root may hold step directories and a `latest` file naming the newest
complete one. Writes go to a temporary directory renamed into place when complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Optional, Sequence

import torch

from xlmr_mp.model.config import ModelConfig
from xlmr_mp.model.sharding import full_to_local, local_to_full

FORMAT = "xlmr_mp-v1"
WORD_EMB = "embeddings.word_embeddings.weight"
DECODER_COPY = "lm_head.decoder_weight"
# Buffers of the model that are constant and never trained: the trainer saves parameters only, so
# its checkpoints lack them; readers rebuild them from the model config.
TOKEN_TYPE = "embeddings.token_type_embeddings"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the file and what is wrong with it."""


def constant_buffers(cfg: ModelConfig) -> dict:
    """{name: value} of the constant, untrained buffers a saved checkpoint may omit."""
    return {TOKEN_TYPE: torch.zeros(1, cfg.hidden_size)}


def shard_file_name(tp_rank: int, pp_rank: int) -> str:
    return f"model_tp{tp_rank:02d}_pp{pp_rank:02d}.pt"


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



def fresh_temp_dir_beside(path: str) -> str:
    """An empty temporary directory next to `path` (same filesystem), to be renamed onto `path`
    once complete, so a crash never leaves a half-written checkpoint under the final name."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(path))}.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp

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
    tmp = fresh_temp_dir_beside(path)
    for p in range(pp):
        for t in range(tp):
            local = full_to_local(per_stage[p], cfg, tp, t)
            torch.save(local, os.path.join(tmp, shard_file_name(t, p)))
    meta = {"format": FORMAT, "model": dataclasses.asdict(cfg), "tp": tp, "pp": pp, "step": int(step),
            "stage_layers": stage_layers}
    meta.update(extra_meta or {})
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    if os.path.exists(path):
        old = tmp + ".old"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


def resolve_checkpoint_dir(path: str) -> str:
    """A step directory (has meta.json), or the one a root's `latest` file names."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            name = f.read().strip()
        step_dir = name if os.path.isabs(name) else os.path.join(path, name)
        if os.path.isfile(os.path.join(step_dir, "meta.json")):
            return step_dir
        raise CheckpointError(f"{latest} names {name!r} but {step_dir}/meta.json does not exist; point "
                              f"{latest} at a complete step directory")
    raise CheckpointError(f"{path} is not a model checkpoint: no meta.json and no `latest` file "
                          f"(give a step directory or a checkpoint root)")


def read_meta(path: str) -> dict:
    """meta.json of a checkpoint (step dir or root with `latest`), format checked."""
    step_dir = resolve_checkpoint_dir(path)
    meta_path = os.path.join(step_dir, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}:{e.lineno}: not valid JSON ({e.msg}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{meta_path}: format {got!r}, expected {FORMAT!r}")
    for key in ("model", "tp", "pp"):
        if key not in meta:
            raise CheckpointError(f"{meta_path}: missing field {key!r}; the checkpoint is damaged")
    return meta


def config_from_meta(meta: dict) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        cfg = ModelConfig.resolved(**{k: v for k, v in meta["model"].items() if k in names})
        cfg.validate()
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"meta.json: field 'model' is not a valid model config ({e})") from None
    return cfg


def _load_shard(f: str) -> dict:
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, not a torch file
        raise CheckpointError(f"{f}: cannot be read as model weights ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); the checkpoint is damaged") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{f}: holds a {type(sd).__name__}, expected a dict of tensors")
    return sd


def load_full_model_state(path: str) -> tuple:
    """(ModelConfig, full state dict) of a checkpoint, merging its TP and PP shards."""
    step_dir = resolve_checkpoint_dir(path)
    meta = read_meta(step_dir)
    cfg = config_from_meta(meta)
    full = {}
    for p in range(meta["pp"]):
        locals_ = []
        for t in range(meta["tp"]):
            f = os.path.join(step_dir, shard_file_name(t, p))
            if not os.path.isfile(f):
                raise CheckpointError(f"{f} is missing (meta.json says tp={meta['tp']}, pp={meta['pp']})")
            locals_.append(_load_shard(f))
        try:
            full.update(local_to_full(locals_, cfg))
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{step_dir}: the TP shards of stage {p} do not fit together or the model "
                                  f"config in meta.json ({e})") from None
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
