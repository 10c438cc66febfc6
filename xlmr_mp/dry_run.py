"""Dry run of a launch layout at its full world size, on one CPU machine, without the hardware:

    xlmr-train --preset large --dry-run --world-size 512 \
        --ranks 0,1,511 [--gpu V100-32] [--tasks-per-node 8] [key=value ...]

the way torchtitan (`COMM_MODE=fake_backend`) and Megatron (`--fake-process-group`) check a large
layout. Each requested rank is built in a CPU process of its own (forked from this one, a few at a
time) that joins torch's fake process-group backend (`FakeStore`, backend "fake": every collective
returns at once, no peer exists) as that rank of a world of `--world-size`, and then runs the
trainer's own code for it:

  groups    parallel/state.py `init_parallel` (Megatron's rank order): tp/pp/dp rank and the members
            of its tensor- and pipeline-parallel groups
  stages    parallel/stages.py `build_pipeline_stages` on the meta device (no memory, no init): the
            global stage index of each of its chunks (`vp_stages`, interleaved included), their
            encoder layers, the parameters it holds (`params`), and `params_owned`, the ones it
            counts once for the whole model (each TP-replicated tensor on TP rank 0 only, the last
            stage's tied decoder copy not at all, vocabulary padding rows not at all), so that the
            `params_owned` of one rank per (tp, pp) add up to the single-process model
  vocab     the padded vocabulary (`padded_vocab`) and this rank's row range of it
  samples   the data loader's (data/loader.py `MLMLoader`) micro-batches of the first two global
            batches, read through the loader's own iteration: per batch the stream positions
            (`samples`) and their (language, block, pass) (`blocks`). From `data.path` when it is
            set, else from a synthetic corpus (`SyntheticCorpus`: sizes only); no token is read
  memory    the planner's (xlmr_mp/cli/plan.py) GiB for this rank's pipeline stage on `--gpu`

One JSON line per rank (in rank order), then a summary line {"summary": {...}}. Exit codes: 0 every
rank built; 2 an impossible layout or bad option (the message names the options and the fix),
before any process starts; 1 a rank failed to build (its error is printed).
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
import time
import traceback
from typing import Dict, List, Optional, Sequence

from xlmr_mp.errors import ConfigError

DEFAULT_GPU = "A100-80"        # the planner's default (`tools/plan.py --gpu`)
STEPS = 2                      # global batches whose samples are listed


# ----------------------------------------------------------------------------- options

def parse_ranks(spec: str, world_size: int) -> List[int]:
    """'all' or 'R[,R...]' (R may be negative: -1 is the last rank) -> sorted distinct ranks."""
    if world_size < 1:
        raise ConfigError(f"--world-size {world_size} must be >= 1")
    if spec.strip() == "all":
        return list(range(world_size))
    out = set()
    for part in spec.split(","):
        try:
            r = int(part)
        except ValueError:
            raise ConfigError(f"--ranks {spec!r}: give 'all' or comma-separated integers, e.g. --ranks 0,1,-1") from None
        if not -world_size <= r < world_size:
            raise ConfigError(f"--ranks {spec!r}: rank {r} is outside the world of --world-size {world_size} "
                              f"(0..{world_size - 1}, or -1 for the last)")
        out.add(r % world_size)
    if not out:
        raise ConfigError("--ranks is empty: give 'all' or comma-separated ranks")
    return sorted(out)


class SyntheticCorpus:
    """What the loader's sampler reads of a corpus (languages, per-language sizes, blocks), with no
    file behind it: the languages of `data.languages` (default the built-in tiny corpus's seven),
    `blocks_per_language[lang]` blocks each (default the tiny corpus's ~10x spread of sizes, x 1000),
    every block full (seq_length - 1 tokens). Sizes only: a batch read from it raises."""

    def __init__(self, seq_length: int, languages: Optional[Sequence[str]] = None,
                 blocks_per_language: Optional[Dict[str, int]] = None):
        from xlmr_mp.fixtures.demo_corpus import DEFAULT_SIZES
        self.languages = list(languages) if languages else list(DEFAULT_SIZES)
        sizes = blocks_per_language or {lang: 1000 * DEFAULT_SIZES.get(lang, 100) for lang in self.languages}
        self.blocks = [int(sizes[lang]) for lang in self.languages]
        self.block_tokens = seq_length - 1

    def sizes(self, unit: str = "tokens"):
        import numpy as np
        if unit not in ("tokens", "sentences"):
            raise ValueError(f"data.share_unit={unit!r}: choose tokens or sentences")
        per = self.block_tokens if unit == "tokens" else 1
        return np.array([n * per for n in self.blocks], dtype=np.float64)

    def num_blocks(self):
        import numpy as np
        return np.array(self.blocks, dtype=np.uint64)


class _IndexRecorder:
    """Stands in for the loader's `BlendedSamples` (`loader.dataset.samples`): each micro-batch the
    loader asks for is recorded as its stream positions and their (language, block, pass), from the
    real sampler's `indices`; no token is read."""

    def __init__(self, samples):
        self.samples = samples
        self.reads = []

    def batch(self, start: int, count: int, mask_prob: Optional[float] = None) -> dict:
        lang, block, epoch = self.samples.indices(start, count)
        self.reads.append((int(start), int(count), lang.tolist(), block.tolist(), [int(e) for e in epoch]))
        return {}


# ----------------------------------------------------------------------------- one rank

def _meta_model_cls():
    """XLMRModel without its parameter initialisation: on the meta device there is nothing to draw,
    and torch's meta `normal_` would be most of a rank's build."""
    from xlmr_mp.model.xlmr import XLMRModel

    class MetaXLMRModel(XLMRModel):
        def reset_parameters(self, seed: int) -> None:
            return None

    return MetaXLMRModel


def owned_params(named_params, tp_rank: int, vocab_size: int, vocab_start: int) -> int:
    """Elements of `named_params` this rank counts for the whole model: sharded tensors on every
    TP rank, replicated ones on TP rank 0, never the tied decoder copy, vocabulary rows without
    their padding (the rule the trainer's gradient norm counts by, optim.norm_counted)."""
    from xlmr_mp.model.sharding import is_vocab_param, partition_dim
    from xlmr_mp.optim import norm_counted
    from xlmr_mp.parallel.vocab import real_rows
    n = 0
    for name, p in named_params:
        if not norm_counted(name, p, tp_rank, lambda n_, p_: partition_dim(n_) is not None,
                            ("lm_head.decoder_weight",)):
            continue
        if is_vocab_param(name):
            rows = real_rows(p.shape[0], vocab_size, vocab_start)
            n += rows * (p.numel() // max(1, p.shape[0]))
        else:
            n += p.numel()
    return n


def _planned_gib(cfg, gpu: str, world: int, per_node: int, pp_rank: int) -> float:
    from xlmr_mp.cli.plan import GPUS, GiB, plan
    res = plan(cfg, GPUS[gpu], max(1, world // per_node), min(per_node, world), step_time=False,
               pipeline_rank=pp_rank)
    return res["memory"]["total"] / GiB


def _loader(cfg, dp_rank: int, dp_size: int, corpus=None):
    """The trainer's training loader (train.build_loaders -> loader.build_train_loader) of this DP
    rank, with no worker processes (the samples are the same for any data.num_workers)."""
    from xlmr_mp.data import loader as L
    run_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0))
    return L.build_train_loader(run_cfg, dp_rank, dp_size, corpus=corpus)


def _open_corpus(cfg):
    """The corpus every rank samples from: data.path's training split, opened once here (as the
    loader opens it) and shared by the forked ranks, or a SyntheticCorpus when data.path is empty."""
    if not cfg.data.path:
        return SyntheticCorpus(cfg.data.seq_length, cfg.data.languages)
    return _loader(cfg, 0, max(1, cfg.parallel.data)).corpus


def _samples(cfg, dp_rank: int, dp_size: int, corpus) -> tuple:
    """(positions per batch, [language, block, pass] per batch) of this DP rank's first STEPS
    global batches, read through MLMLoader's own iteration (num_workers 0: same samples)."""
    ld = _loader(cfg, dp_rank, dp_size, corpus)
    rec = _IndexRecorder(ld.dataset.samples)
    ld.dataset.samples = rec
    positions, blocks = [], []
    for step in range(STEPS):           # what Trainer._next_micro_batches asks for, step by step
        rec.reads = []
        for _ in range(ld.micro_batches_at(step)):
            next(ld)
        positions.append([s + i for s, c, *_ in rec.reads for i in range(c)])
        blocks.append([[ld.languages[a], b, e] for *_, la, bl, ep in rec.reads for a, b, e in zip(la, bl, ep)])
    return positions, blocks


def build_rank(cfg, world_size: int, rank: int, gpu: str, per_node: int, corpus) -> dict:
    """The dry-run record of `rank` (see the module docstring). Joins the fake backend as `rank`:
    call it in a process of its own (it leaves torch.distributed initialised)."""
    t0 = time.perf_counter()
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from xlmr_mp.parallel.stages import build_pipeline_stages
    from xlmr_mp.parallel.state import init_parallel
    from xlmr_mp.parallel.vocab import vocab_range
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    p = cfg.parallel
    g = init_parallel(p.tensor, p.pipeline, p.data or None)
    with torch.device("meta"):
        chunks = build_pipeline_stages(cfg.model, g, p, init_seed=cfg.train.seed, model_cls=_meta_model_cls())
    padded = chunks[0].padded_vocab
    v0, v1 = vocab_range(padded, g.tp_rank, g.tp_size)
    named = [(n, q) for c in chunks for n, q in c.named_parameters()]
    positions, blocks = _samples(cfg, g.dp_rank, g.dp_size, corpus)
    rec = {"rank": rank, "tp_rank": g.tp_rank, "pp_rank": g.pp_rank, "dp_rank": g.dp_rank,
           "vp_stages": [c.pipeline_stage_index for c in chunks], "layers": [c.layer_ids for c in chunks],
           "params": sum(q.numel() for _, q in named),
           "params_owned": owned_params(named, g.tp_rank, cfg.model.vocab_size, v0),
           "padded_vocab": padded, "vocab_rows": [v0, v1], "samples": positions, "blocks": blocks,
           "planned_gib": round(_planned_gib(cfg, gpu, world_size, per_node, g.pp_rank), 3),
           "tp_ranks": dist.get_process_group_ranks(g.tp_group), "pp_ranks": list(g.pp_ranks),
           "dp_size": g.dp_size, "embedding": chunks[0].has_embeddings, "head": chunks[-1].has_head}
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


# ----------------------------------------------------------------------------- the run

_JOB: dict = {}


def _child(rank: int) -> dict:
    """Pool worker (a fresh forked process per rank): the record, or {"rank", "error"}."""
    j = _JOB
    try:
        return build_rank(j["cfg"], j["world"], rank, j["gpu"], j["per_node"], j["corpus"])
    except ConfigError as e:
        return {"rank": rank, "error": str(e), "layout_error": True}
    except Exception as e:      # noqa: BLE001 (reported with its traceback, the run exits 1)
        return {"rank": rank, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"}


def _warm_imports() -> None:
    """Import what every rank needs once, before forking (each child then starts in milliseconds)."""
    import warnings
    import torch  # noqa: F401
    from torch.testing._internal.distributed import fake_pg  # noqa: F401
    import xlmr_mp.data.loader  # noqa: F401
    import xlmr_mp.parallel.stages  # noqa: F401
    import xlmr_mp.optim  # noqa: F401
    import xlmr_mp.parallel.state  # noqa: F401
    import xlmr_mp.cli.plan  # noqa: F401
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from megatron.core import parallel_state  # noqa: F401 (init_parallel's, when it uses it)
        except ImportError:
            pass


def run(cfg, world_size: int, ranks: Sequence[int], gpu: str = DEFAULT_GPU, per_node: int = 8,
        workers: int = 0, out=None) -> int:
    """Build every rank of `ranks` in its own forked process (`workers` at a time; 0 = the CPU
    count, at most 4), print its JSON line as it comes (rank order) and the summary to `out`;
    return the exit code."""
    out = out or sys.stdout
    t0 = time.perf_counter()
    _warm_imports()
    try:
        corpus = _open_corpus(cfg)
    except (OSError, ValueError) as e:
        print(f"dry run: data error: data.path={cfg.data.path!r}: {e}", file=sys.stderr)
        return 2
    _JOB.update(cfg=cfg, world=world_size, gpu=gpu, per_node=per_node, corpus=corpus)
    workers = workers or min(4, os.cpu_count() or 1)
    ctx = multiprocessing.get_context("fork")
    recs, failed = [], []
    with ctx.Pool(min(workers, len(ranks)), maxtasksperchild=1) as pool:
        for rec in pool.imap(_child, ranks):
            if "error" in rec:
                failed.append(rec)
                print(f"dry run: rank {rec['rank']}: {rec['error']}", file=sys.stderr)
                continue
            recs.append(rec)
            print(json.dumps(rec, separators=(",", ":")), file=out, flush=True)
    p = cfg.parallel
    from xlmr_mp.parallel.layout import stage_layout
    summary = {"world_size": world_size, "tp": p.tensor, "pp": p.pipeline, "dp": p.data,
               "virtual_stages": p.virtual_stages, "stage_layers": stage_layout(cfg.model, p),
               "global_batch": cfg.train.global_batch, "micro_batch": cfg.train.micro_batch,
               "ranks_built": len(recs), "ranks_failed": [r["rank"] for r in failed],
               "corpus": cfg.data.path or "synthetic", "gpu": gpu,
               "padded_vocab": sorted({r["padded_vocab"] for r in recs}),
               "max_planned_gib": max((r["planned_gib"] for r in recs), default=None),
               "max_rank_seconds": max((r["seconds"] for r in recs), default=None),
               "seconds": round(time.perf_counter() - t0, 3)}
    print(json.dumps({"summary": summary}, separators=(",", ":")), file=out, flush=True)
    if any(r.get("layout_error") for r in failed):
        return 2
    return 1 if failed else 0


def main(config: Optional[str], overrides: List[str], world_size: Optional[int], ranks: str,
         gpu: str = "", per_node: int = 8, workers: int = 0, preset: Optional[str] = None) -> int:
    """`python -m xlmr_mp.train --dry-run ...` (xlmr_mp/train.py parses the flags)."""
    from xlmr_mp.config import load_config
    src = config or (f"preset:{preset}" if preset else "")
    where = f" (config {src})" if src else ""
    try:
        if world_size is None:
            raise ConfigError("--dry-run needs --world-size N (the job's task count, e.g. 512 for 64 nodes x 8)")
        picked = parse_ranks(ranks, world_size)
        if per_node < 1:
            raise ConfigError(f"--tasks-per-node {per_node} must be >= 1")
        from xlmr_mp.cli.plan import GPUS
        gpu = gpu or os.environ.get("XLMR_GPU_TYPE", "") or DEFAULT_GPU
        if gpu not in GPUS:
            raise ConfigError(f"--gpu {gpu!r}: choose one of {', '.join(sorted(GPUS))}")
        cfg = load_config(config, overrides, world_size=world_size, preset=preset)
    except (ConfigError, FileNotFoundError) as e:
        print(f"dry run: layout error{where}: {e}", file=sys.stderr)
        print(f"  options: --world-size {world_size}, parallel.tensor x parallel.pipeline x parallel.data, "
              f"parallel.virtual_stages / stage_layers, train.global_batch / micro_batch; change them with "
              f"key=value after the command", file=sys.stderr)
        return 2
    return run(cfg, world_size, picked, gpu, per_node, workers)
