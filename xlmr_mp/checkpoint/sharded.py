"""Sharded, atomic training checkpoints that reload at any TP/PP/DP layout.

A checkpoint root holds step directories and a `latest` file:

    ROOT/step_00000100/meta.json                  {"format": "xlmr_mp-v1", "model": {...}, "tp", "pp", "dp",
                                                   "virtual_stages", "zero", "step", "config": {...}}
    ROOT/step_00000100/model_tp00_pp00.pt         {global param name: TP-local tensor} (DP rank 0 of each (tp, pp))
    ROOT/step_00000100/optim_tp00_pp00_dp00.pt    {param name: {"exp_avg", "exp_avg_sq", "step"}} this rank's
                                                   Adam state (all of it on DP rank 0 without ZeRO; its
                                                   shard on every DP rank with ZeRO-1)
    ROOT/step_00000100/rank00000.pt               RNG states, loss scaler, data-loader position, step
    ROOT/latest                                   "step_00000100"

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

Every file is read with `torch.load(..., weights_only=True)`: a checkpoint holds only tensors and
plain Python values (numpy arrays in the rank state, e.g. numpy's RNG state, are stored as
{"__ndarray__": uint8 tensor, "dtype", "shape"} and decoded on load), so loading a checkpoint
someone handed you cannot run code; a file carrying anything else is refused (UnsafeCheckpointError).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
from typing import Dict, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist

from xlmr_mp.model.sharding import full_to_local, local_to_full

FORMAT = "xlmr_mp-v1"
TIED_COPY = "lm_head.decoder_weight"
WORD_EMB = "embeddings.word_embeddings.weight"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(root: str) -> Optional[str]:
    """Path of the step directory named by ROOT/latest, or None when there is none."""
    p = os.path.join(root, "latest")
    if not os.path.exists(p):
        return None
    name = open(p).read().strip()
    path = os.path.join(root, name)
    if not os.path.exists(os.path.join(path, "meta.json")) and os.path.exists(os.path.join(path + ".old", "meta.json")):
        return path + ".old"        # a crash between the two renames of a re-save
    if not os.path.exists(os.path.join(path, "meta.json")):
        raise FileNotFoundError(f"{p} names {name!r} but {path}/meta.json does not exist; the checkpoint root "
                                f"was edited by hand: point {p} at a complete step directory")
    return path


def save_checkpoint(root: str, step: int, groups, *, model_state: Dict[str, torch.Tensor],
                    optim_state: Dict[str, dict], rank_state: dict, meta: dict, keep_last: int = 3,
                    write_optim: bool = True) -> str:
    """Collective: every rank calls it. Returns the final step directory path."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = os.path.join(root, step_dir_name(step))
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    _barrier()
    t, p, d = groups.tp_rank, groups.pp_rank, groups.dp_rank
    if d == 0:
        _atomic_save({k: v.detach().cpu().clone() for k, v in model_state.items()},
                     os.path.join(tmp, f"model_tp{t:02d}_pp{p:02d}.pt"))
    if write_optim:
        _atomic_save(optim_state, os.path.join(tmp, f"optim_tp{t:02d}_pp{p:02d}_dp{d:02d}.pt"))
    _atomic_save(to_plain(rank_state), os.path.join(tmp, f"rank{rank:05d}.pt"))
    _barrier()   # every rank's files are complete
    if rank == 0:
        full_meta = {"format": FORMAT, "step": step, **meta}
        _atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps(full_meta, indent=1))
        old = final + ".old"            # re-saving a step (e.g. at a new layout): keep it until replaced
        if os.path.exists(final):
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        _atomic_write_text(os.path.join(root, "latest"), step_dir_name(step) + "\n")
        prune_checkpoints(root, keep_last)
    _barrier()
    return final


def prune_checkpoints(root: str, keep_last: int) -> None:
    """Delete complete step directories beyond the newest `keep_last` (never the one `latest` names)."""
    latest = open(os.path.join(root, "latest")).read().strip() if os.path.exists(os.path.join(root, "latest")) else None
    steps = sorted(d for d in os.listdir(root) if re.fullmatch(r"step_\d{8}", d))
    for d in steps[:-keep_last] if keep_last > 0 else []:
        if d != latest:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def read_meta(path: str) -> dict:
    p = os.path.join(path, "meta.json")
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p} not found: {path} is not a complete xlmr_mp checkpoint "
                                f"(an interrupted save leaves only a .tmp directory)")
    meta = json.load(open(p))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{p}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def same_layout(meta: dict, groups, virtual_stages: int, zero: bool) -> bool:
    return (meta["tp"], meta["pp"], meta.get("dp"), meta.get("virtual_stages", 1), bool(meta.get("zero", False))) == \
        (groups.tp_size, groups.pp_size, groups.dp_size, virtual_stages, bool(zero))


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds objects other than tensors and plain Python values."""


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


def _load(path: str) -> dict:
    """torch.load(path, weights_only=True); a file with pickled objects is refused, naming it."""
    import pickle
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain Python values, which "
            f"could run code when unpickled (torch: {str(e).splitlines()[0]}). xlmr_mp never writes such "
            f"files; only use checkpoints from a source you trust, re-saved by xlmr_mp") from None


def full_model_state(path: str, model_cfg, meta: Optional[dict] = None) -> Dict[str, torch.Tensor]:
    """Full (unsharded, real-vocabulary) model state of a checkpoint, all stages merged."""
    meta = meta or read_meta(path)
    full = {}
    for p in range(meta["pp"]):
        locals_ = [_load(os.path.join(path, f"model_tp{t:02d}_pp{p:02d}.pt")) for t in range(meta["tp"])]
        full.update(local_to_full(locals_, model_cfg))
    return full


def full_optim_state(path: str, model_cfg, meta: Optional[dict] = None) -> Dict[str, dict]:
    """Full Adam state per parameter name, merged over DP shards, TP ranks and stages."""
    meta = meta or read_meta(path)
    out: Dict[str, dict] = {}
    for p in range(meta["pp"]):
        per_tp = []
        for t in range(meta["tp"]):
            merged: Dict[str, dict] = {}
            for f in sorted(glob.glob(os.path.join(path, f"optim_tp{t:02d}_pp{p:02d}_dp*.pt"))):
                merged.update(_load(f))
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
        if n not in full and n == TIED_COPY and WORD_EMB in full:
            src = WORD_EMB  # saved without pipeline parallelism: the tied decoder is the embedding
        if src not in full:
            raise KeyError(f"checkpoint has no {what} for parameter {n!r}; it was saved from a different model "
                           f"(check model.* options against the checkpoint's meta.json)")
        sel[n] = full[src]
    return full_to_local(sel, model_cfg, groups.tp_size, groups.tp_rank)


def load_model_state(path: str, names: Iterable[str], model_cfg, groups, same: bool) -> Dict[str, torch.Tensor]:
    """This rank's local model tensors for parameter `names`."""
    if same:
        return _load(os.path.join(path, f"model_tp{groups.tp_rank:02d}_pp{groups.pp_rank:02d}.pt"))
    return _localise(full_model_state(path, model_cfg), names, model_cfg, groups, "weights")


def load_optim_state(path: str, names: Iterable[str], model_cfg, groups, same: bool) -> Dict[str, dict]:
    """Adam state (by parameter name, TP-local shapes) for parameter `names`; missing names are absent."""
    names = list(names)
    if same:
        merged = {}
        for f in sorted(glob.glob(os.path.join(path, f"optim_tp{groups.tp_rank:02d}_pp{groups.pp_rank:02d}_dp*.pt"))):
            merged.update(_load(f))
        return {n: merged[n] for n in names if n in merged}
    full = full_optim_state(path, model_cfg)
    out = {}
    for key in ("exp_avg", "exp_avg_sq"):
        flat = {n: v[key] for n, v in full.items()}
        have = [n for n in names if n in flat or (n == TIED_COPY and WORD_EMB in flat)]
        for n, v in _localise(flat, have, model_cfg, groups, "optimizer state").items():
            out.setdefault(n, {})[key] = v
    for n in out:
        src = n if n in full else WORD_EMB
        out[n]["step"] = full[src]["step"].clone()
    return out


def load_rank_state(path: str, rank: int) -> Optional[dict]:
    """The rank state saved by `rank` (numpy arrays decoded), or None when it has no rank file."""
    p = os.path.join(path, f"rank{rank:05d}.pt")
    return from_plain(_load(p)) if os.path.exists(p) else None
