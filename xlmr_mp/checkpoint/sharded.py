"""Sharded, atomic training checkpoints that reload at any TP/PP/DP layout (file names, meta.json
and `latest`: checkpoint/format.py).

    meta.json                 {"format", "model", "tp", "pp", "dp", "virtual_stages", "zero", "step", "config"}
    model_tp00_pp00.pt        written by DP rank 0 of each (tp, pp)
    optim_tp00_pp00_dp00.pt   this rank's Adam state (all of it on DP rank 0 without ZeRO; its shard on
                              every DP rank with ZeRO-1)
    rank00000.pt              RNG states, loss scaler, data-loader position, step

Atomicity: every rank writes into `step_N.tmp/` (each file under a temporary name, then renamed);
after a barrier, rank 0 writes meta.json, renames the directory to `step_N`, then rewrites
`latest` (temporary name + rename) and deletes the oldest step directories beyond `keep_last`.
A crash at any point leaves the previous `latest` and its directory intact.

Loading at the saved layout restores everything bit for bit. At a different layout the model and
optimizer tensors are rebuilt as full tensors (`model.sharding.local_to_full` over the saved TP
ranks and the union over pipeline stages) and cut again for this rank (`full_to_local`); the tied
decoder copy of a last stage is taken from the word embedding when the saved layout had none.
RNG states cannot map across layouts: the trainer reseeds from (seed, step) in that case.
The model files follow the model-checkpoint contract, so `load_model` reads a step directory.

Every file is read with `torch.load(..., weights_only=True)` (`format.load_file`): numpy arrays in
the rank state, e.g. numpy's RNG state, are stored as {"__ndarray__": uint8 tensor, "dtype",
"shape"} and decoded on load; a file carrying anything else is refused (UnsafeCheckpointError).
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Dict, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist

from xlmr_mp.atomic import atomic_write, fresh_dir, replace_dir
from xlmr_mp.checkpoint.format import (DECODER_COPY, LATEST, STEP_DIR_PATTERN, WORD_EMB, latest_checkpoint,  # noqa: F401
                                       load_file, merge_model_shards, model_file, optim_file, optim_files,
                                       rank_file, read_meta, step_dir_name, write_latest, write_meta)
from xlmr_mp.errors import UnsafeCheckpointError  # noqa: F401 (re-exported)
from xlmr_mp.model.sharding import full_to_local, local_to_full


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _save(obj, path: str) -> None:
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def save_checkpoint(root: str, step: int, groups, *, model_state: Dict[str, torch.Tensor],
                    optim_state: Dict[str, dict], rank_state: dict, meta: dict, keep_last: int = 3,
                    write_optim: bool = True) -> str:
    """Collective: every rank calls it. Returns the final step directory path."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = os.path.join(root, step_dir_name(step))
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        fresh_dir(tmp)
    _barrier()
    t, p, d = groups.tp_rank, groups.pp_rank, groups.dp_rank
    if d == 0:
        _save({k: v.detach().cpu().clone() for k, v in model_state.items()}, os.path.join(tmp, model_file(t, p)))
    if write_optim:
        _save(optim_state, os.path.join(tmp, optim_file(t, p, d)))
    _save(to_plain(rank_state), os.path.join(tmp, rank_file(rank)))
    _barrier()   # every rank's files are complete
    if rank == 0:
        write_meta(tmp, {"step": step, **meta})
        replace_dir(tmp, final)         # re-saving a step (e.g. at a new layout) keeps the old one until replaced
        write_latest(root, final)
        prune_checkpoints(root, keep_last)
    _barrier()
    return final


def prune_checkpoints(root: str, keep_last: int) -> None:
    """Delete complete step directories beyond the newest `keep_last` (never the one `latest` names)."""
    latest = open(os.path.join(root, LATEST)).read().strip() if os.path.exists(os.path.join(root, LATEST)) else None
    steps = sorted(d for d in os.listdir(root) if re.fullmatch(STEP_DIR_PATTERN, d))
    for d in steps[:-keep_last] if keep_last > 0 else []:
        if d != latest:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def same_layout(meta: dict, groups, virtual_stages: int, zero: bool) -> bool:
    return (meta["tp"], meta["pp"], meta.get("dp"), meta.get("virtual_stages", 1), bool(meta.get("zero", False))) == \
        (groups.tp_size, groups.pp_size, groups.dp_size, virtual_stages, bool(zero))


def to_plain(obj):
    """`obj` with numpy arrays and numpy scalars replaced by tensors / Python numbers, so that
    torch.load(weights_only=True) reads it back (inverse: from_plain)."""
    if isinstance(obj, np.ndarray):
        raw = torch.frombuffer(bytearray(np.ascontiguousarray(obj).tobytes()), dtype=torch.uint8) if obj.nbytes \
            else torch.zeros(0, dtype=torch.uint8)
        return {"__ndarray__": raw, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    return obj


def from_plain(obj):
    """Inverse of to_plain: {"__ndarray__": ...} entries become numpy arrays again."""
    if isinstance(obj, dict):
        if "__ndarray__" in obj and set(obj) == {"__ndarray__", "dtype", "shape"}:
            return np.frombuffer(obj["__ndarray__"].numpy().tobytes(), dtype=np.dtype(obj["dtype"])) \
                .reshape(obj["shape"]).copy()
        return {k: from_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_plain(v) for v in obj)
    return obj


def full_model_state(path: str, model_cfg, meta: Optional[dict] = None) -> Dict[str, torch.Tensor]:
    """Full (unsharded, real-vocabulary) model state of a checkpoint, all stages merged."""
    return merge_model_shards(path, model_cfg, meta)


def full_optim_state(path: str, model_cfg, meta: Optional[dict] = None) -> Dict[str, dict]:
    """Full Adam state per parameter name, merged over DP shards, TP ranks and stages."""
    meta = meta or read_meta(path)
    out: Dict[str, dict] = {}
    for p in range(meta["pp"]):
        per_tp = []
        for t in range(meta["tp"]):
            merged: Dict[str, dict] = {}
            for f in optim_files(path, t, p):
                merged.update(load_file(f))
            per_tp.append(merged)
        names = per_tp[0].keys()
        for key in ("exp_avg", "exp_avg_sq"):
            full = local_to_full([{n: sd[n][key] for n in names} for sd in per_tp], model_cfg)
            for n, v in full.items():
                out.setdefault(n, {})[key] = v
        for n in names:
            out[n]["step"] = per_tp[0][n]["step"].clone()
    return out


def _localise(full: Dict[str, torch.Tensor], names: Iterable[str], model_cfg, groups, what: str) -> Dict[str, torch.Tensor]:
    sel = {}
    for n in names:
        src = n
        if n not in full and n == DECODER_COPY and WORD_EMB in full:
            src = WORD_EMB  # saved without pipeline parallelism: the tied decoder is the embedding
        if src not in full:
            raise KeyError(f"checkpoint has no {what} for parameter {n!r}; it was saved from a different model "
                           f"(check model.* options against the checkpoint's meta.json)")
        sel[n] = full[src]
    return full_to_local(sel, model_cfg, groups.tp_size, groups.tp_rank)


def load_model_state(path: str, names: Iterable[str], model_cfg, groups, same: bool) -> Dict[str, torch.Tensor]:
    """This rank's local model tensors for parameter `names`."""
    if same:
        return load_file(os.path.join(path, model_file(groups.tp_rank, groups.pp_rank)))
    return _localise(full_model_state(path, model_cfg), names, model_cfg, groups, "weights")


def load_optim_state(path: str, names: Iterable[str], model_cfg, groups, same: bool) -> Dict[str, dict]:
    """Adam state (by parameter name, TP-local shapes) for parameter `names`; missing names are absent."""
    names = list(names)
    if same:
        merged = {}
        for f in optim_files(path, groups.tp_rank, groups.pp_rank):
            merged.update(load_file(f))
        return {n: merged[n] for n in names if n in merged}
    full = full_optim_state(path, model_cfg)
    out = {}
    for key in ("exp_avg", "exp_avg_sq"):
        flat = {n: v[key] for n, v in full.items()}
        have = [n for n in names if n in flat or (n == DECODER_COPY and WORD_EMB in flat)]
        for n, v in _localise(flat, have, model_cfg, groups, "optimizer state").items():
            out.setdefault(n, {})[key] = v
    for n in out:
        src = n if n in full else WORD_EMB
        out[n]["step"] = full[src]["step"].clone()
    return out


def load_rank_state(path: str, rank: int) -> Optional[dict]:
    """The rank state saved by `rank` (numpy arrays decoded), or None when it has no rank file."""
    p = os.path.join(path, rank_file(rank))
    return from_plain(load_file(p)) if os.path.exists(p) else None
