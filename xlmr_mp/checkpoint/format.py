"""The checkpoint format in one place: file names, meta.json, the `latest` pointer, safe reading,
and the merge of model shards into one full state dict. The training checkpoints
(checkpoint/sharded.py) and the model-only ones (checkpoint/model_io.py, the converter) share it.

    ROOT/latest                                  "step_00000100" (the newest complete step directory)
    ROOT/step_00000100/meta.json                 {"format": "xlmr_mp-v1", "model": {ModelConfig fields},
                                                  "tp": T, "pp": P, "step": N, ...}
    ROOT/step_00000100/model_tp00_pp00.pt        {global parameter name: TP-local tensor}
    ROOT/step_00000100/optim_tp00_pp00_dp00.pt   {parameter name: {"exp_avg", "exp_avg_sq", "step"}}
    ROOT/step_00000100/rank00000.pt              one rank's RNG states, loss scaler, loader position

A step directory alone is a checkpoint too (`resolve_checkpoint_dir` takes either). With PP > 1 the
last stage's model file also holds `lm_head.decoder_weight`, its copy of the tied word embedding.
Every file is read with `torch.load(..., weights_only=True)`: a checkpoint holds only tensors and
plain Python values, so loading one someone handed you cannot run code (UnsafeCheckpointError).
"""
from __future__ import annotations

import glob
import json
import os
import pickle
from typing import Optional

import torch

from xlmr_mp.atomic import atomic_write_text
from xlmr_mp.errors import CheckpointError, CheckpointNotFoundError, UnsafeCheckpointError
from xlmr_mp.model.sharding import local_to_full

FORMAT = "xlmr_mp-v1"
META = "meta.json"
LATEST = "latest"
STEP_DIR_PATTERN = r"step_\d{8}"
WORD_EMB = "embeddings.word_embeddings.weight"
DECODER_COPY = "lm_head.decoder_weight"      # the last pipeline stage's copy of WORD_EMB

__all__ = ["FORMAT", "META", "LATEST", "WORD_EMB", "DECODER_COPY", "CheckpointError", "CheckpointNotFoundError",
           "UnsafeCheckpointError", "step_dir_name", "model_file", "optim_file", "optim_files", "rank_file",
           "latest_checkpoint", "resolve_checkpoint_dir", "write_latest", "read_meta", "write_meta",
           "load_file", "merge_model_shards"]


# ----------------------------------------------------------------------------- names

def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def model_file(tp_rank: int, pp_rank: int) -> str:
    return f"model_tp{tp_rank:02d}_pp{pp_rank:02d}.pt"


def optim_file(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    return f"optim_tp{tp_rank:02d}_pp{pp_rank:02d}_dp{dp_rank:02d}.pt"


def optim_files(step_dir: str, tp_rank: int, pp_rank: int) -> list:
    """The optimizer files of one (TP, PP) rank pair, every DP shard, in DP order."""
    return sorted(glob.glob(os.path.join(glob.escape(step_dir), f"optim_tp{tp_rank:02d}_pp{pp_rank:02d}_dp*.pt")))


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


# ----------------------------------------------------------------------------- finding a checkpoint

def _follow_latest(root: str) -> str:
    latest = os.path.join(root, LATEST)
    with open(latest) as f:
        name = f.read().strip()
    step_dir = name if os.path.isabs(name) else os.path.join(root, name)
    if os.path.isfile(os.path.join(step_dir, META)):
        return step_dir
    if os.path.isfile(os.path.join(step_dir + ".old", META)):
        return step_dir + ".old"          # a crash between the two renames of a re-save
    raise CheckpointNotFoundError(f"{latest} names {name!r} but {step_dir}/{META} does not exist; the checkpoint "
                                  f"root was edited by hand: point {latest} at a complete step directory")


def latest_checkpoint(root: str) -> Optional[str]:
    """The step directory ROOT/latest names, or None when ROOT has no `latest` file."""
    if not os.path.isfile(os.path.join(root, LATEST)):
        return None
    return _follow_latest(root)


def resolve_checkpoint_dir(path: str) -> str:
    """`path` when it is a step directory (has meta.json), else the one its `latest` file names."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    if os.path.isfile(os.path.join(path, LATEST)):
        return _follow_latest(path)
    raise CheckpointNotFoundError(f"{path} is not a complete xlmr_mp checkpoint: no {META} and no `{LATEST}` "
                                  f"file (give a step directory or a checkpoint root; an interrupted save "
                                  f"leaves only a temporary directory)")


def write_latest(root: str, step_dir: str) -> None:
    """Point ROOT/latest at the step directory named `step_dir` (atomically)."""
    atomic_write_text(os.path.join(root, LATEST), os.path.basename(step_dir) + "\n")


# ----------------------------------------------------------------------------- meta.json

def read_meta(path: str) -> dict:
    """meta.json of a checkpoint (a step directory or a root with `latest`), format checked."""
    meta_path = os.path.join(resolve_checkpoint_dir(path), META)
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


def write_meta(step_dir: str, meta: dict) -> None:
    """Write `meta` (the format tag added) as STEP_DIR/meta.json, atomically."""
    atomic_write_text(os.path.join(step_dir, META), json.dumps({"format": FORMAT, **meta}, indent=1))


# ----------------------------------------------------------------------------- reading files

def load_file(path: str) -> dict:
    """One checkpoint file as a dict, read with torch.load(weights_only=True); a file with pickled
    objects is refused, a damaged or missing one named."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain Python values, which "
            f"could run code when unpickled (torch: {str(e).splitlines()[0]}). xlmr_mp never writes such "
            f"files; only use checkpoints from a source you trust, re-saved by xlmr_mp") from None
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path} is missing; the checkpoint is incomplete") from None
    except Exception as e:  # truncated file, not a torch file
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); the checkpoint is damaged") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict")
    return obj


def merge_model_shards(step_dir: str, model_cfg, meta: Optional[dict] = None) -> dict:
    """The full (unsharded, real-vocabulary) model state of a step directory: the TP shards of every
    stage merged, the union over stages (the last stage's tied decoder copy included as saved)."""
    meta = meta or read_meta(step_dir)
    full = {}
    for p in range(meta["pp"]):
        files = [os.path.join(step_dir, model_file(t, p)) for t in range(meta["tp"])]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise CheckpointNotFoundError(f"{missing[0]} is missing (meta.json says tp={meta['tp']}, pp={meta['pp']})")
        shards = [load_file(f) for f in files]
        try:
            full.update(local_to_full(shards, model_cfg))
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{step_dir}: the TP shards of stage {p} do not fit together or the model "
                                  f"config in meta.json ({e})") from None
    return full
