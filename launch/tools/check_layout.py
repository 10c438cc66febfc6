#!/usr/bin/env python
"""Validate a run's config and parallel layout before any training process starts; record the run.

    python launch/tools/check_layout.py --preset base --world-size 16 \
        [--tasks-per-node 8] [--record JOB_TAG] key=value ...

Runs once, on the first node of the allocation, before `srun`/`torchrun` start the training
processes, so a bad layout (world size not divisible by parallel.tensor x parallel.pipeline,
train.micro_batch x DP not dividing train.global_batch, ...) fails in seconds with a message
naming the options, and no process allocates memory (one CPU process; the layout rules of
xlmr_mp/parallel/layout.py, the trainer's own, need no torch).

On success prints shell assignments the launcher evals: RUN_DIR, CKPT_DIR, TP, PP, DP, ACCUM.
With --record TAG it also writes, atomically, RUN_DIR/launch/TAG/{config.yaml, commit.txt,
diff.patch, command.txt}: the resolved config, the code commit (+ `git status`), uncommitted
changes, and the command line with the SLURM variables.
Exit codes: 0 ok, 2 config/layout error.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

from xlmr_mp.atomic import atomic_dir
from xlmr_mp.config import ConfigError, dump_config, grad_accumulation_steps, load_config
from xlmr_mp.presets import preset_names

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _git(*args: str) -> str:
    try:
        p = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"(git {' '.join(args)} failed: {e})\n"
    return p.stdout if p.returncode == 0 else f"(git {' '.join(args)} failed: {p.stderr.strip()})\n"


def record(cfg, tag: str, argv: list) -> str:
    """Write config, commit, diff and command into RUN_DIR/launch/TAG (tmp dir, then rename)."""
    dest = os.path.join(cfg.run_dir, "launch", tag)
    with atomic_dir(dest) as tmp:
        _record_into(tmp, cfg, argv)
    return dest


def _record_into(tmp: str, cfg, argv: list) -> None:
    dump_config(cfg, os.path.join(tmp, "config.yaml"))
    with open(os.path.join(tmp, "commit.txt"), "w") as f:
        f.write(f"commit: {_git('rev-parse', 'HEAD').strip()}\n")
        f.write(f"describe: {_git('describe', '--always', '--dirty').strip()}\n")
        f.write("status:\n" + _git("status", "--porcelain"))
    with open(os.path.join(tmp, "diff.patch"), "w") as f:
        f.write(_git("diff", "HEAD"))
    with open(os.path.join(tmp, "command.txt"), "w") as f:
        f.write(f"time: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
        f.write("argv: " + " ".join(shlex.quote(a) for a in argv) + "\n")
        for k in sorted(os.environ):
            if k.startswith(("SLURM_JOB", "SLURM_NNODES", "SLURM_NTASKS", "SLURM_RESTART", "SLURM_ARRAY",
                             "SLURM_SUBMIT", "MASTER_", "NCCL_", "XLMR_")):
                f.write(f"{k}={os.environ[k]}\n")


def plan_memory_check(cfg, gpu: str, world: int, per_node: int) -> None:
    """Print the planner's memory per rank (xlmr-plan, memory only: no torch); a warning on
    stderr when it does not fit the GPU."""
    from xlmr_mp.cli import plan as planner
    if gpu not in planner.GPUS:
        print(f"warning: --gpu {gpu!r} is not one of {', '.join(sorted(planner.GPUS))}; no memory plan", file=sys.stderr)
        return
    res = planner.plan(cfg, planner.GPUS[gpu], max(1, world // per_node), min(per_node, world), step_time=False)
    need, have = res["memory"]["total"] / planner.GiB, res["usable_bytes"] / planner.GiB
    print(f"# plan: {need:.1f} GiB per rank of {have:.1f} GiB usable on {gpu} (xlmr-plan)")
    if not res["fits"]:
        print(f"warning: xlmr-plan predicts {need:.1f} GiB per rank but a {gpu} has {have:.1f} GiB usable: "
              f"the run will likely run out of memory; lower train.micro_batch, set train.recompute=full or "
              f"parallel.distributed_optimizer=true, or raise parallel.tensor / parallel.pipeline "
              f"(details: xlmr-plan --gpu {gpu} ...)", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=None, choices=preset_names(), help="a shipped preset (xlmr_mp/presets/)")
    ap.add_argument("--config", default=None, help="a YAML config file (or preset:NAME), applied over --preset")
    ap.add_argument("--world-size", type=int, required=True, help="number of training processes (SLURM_NTASKS)")
    ap.add_argument("--tasks-per-node", type=int, default=0, help="processes per node (warns when TP spans nodes)")
    ap.add_argument("--record", default="", metavar="TAG", help="write config/commit/command into RUN_DIR/launch/TAG")
    ap.add_argument("--gpu", default=os.environ.get("XLMR_GPU_TYPE", ""),
                    help="GPU type for the memory plan (xlmr-plan: V100-16, V100-32, A100-40, A100-80, H100, "
                         "H200; default $XLMR_GPU_TYPE); warns when the plan does not fit")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = ap.parse_args(argv)
    if args.world_size < 1:
        print(f"layout error: --world-size {args.world_size} must be >= 1 (is SLURM_NTASKS set?)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides, world_size=args.world_size, preset=args.preset)  # layout.py
    except ConfigError as e:
        src = "".join(f" ({k} {v})" for k, v in (("preset", args.preset), ("config", args.config)) if v)
        print(f"layout error{src}: {e}", file=sys.stderr)
        print(f"  world size {args.world_size} = nodes x tasks per node; every option can be changed with "
              f"key=value after the script name, e.g. `sbatch launch/xlmr_base.slurm parallel.tensor=2`",
              file=sys.stderr)
        return 2
    p, t = cfg.parallel, cfg.train
    tp_pp = p.tensor * p.pipeline
    if args.tasks_per_node and (p.tensor > args.tasks_per_node or args.tasks_per_node % p.tensor):
        print(f"warning: parallel.tensor={p.tensor} does not fit within one node's {args.tasks_per_node} tasks; "
              f"tensor-parallel all-reduces will cross the network", file=sys.stderr)
    if args.gpu:
        plan_memory_check(cfg, args.gpu, args.world_size, args.tasks_per_node or 8)
    ckpt = cfg.checkpoint.dir or os.path.join(cfg.run_dir, "checkpoints")
    accum = grad_accumulation_steps(cfg)
    print(f"# layout ok: world {args.world_size} = TP {p.tensor} x PP {p.pipeline} x DP {p.data} "
          f"(model-parallel group {tp_pp}); global batch {t.global_batch} = micro {t.micro_batch} x accum {accum} "
          f"x DP {p.data}")
    for k, v in (("RUN_DIR", cfg.run_dir), ("CKPT_DIR", ckpt), ("TP", p.tensor), ("PP", p.pipeline),
                 ("DP", p.data), ("ACCUM", accum)):
        print(f"{k}={shlex.quote(str(v))}")
    if args.record:
        dest = record(cfg, args.record, [sys.executable, *sys.argv])
        print(f"# recorded config and commit in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
