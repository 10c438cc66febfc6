"""Train XLM-R at any TP x PP x DP layout: `xlmr-train --preset NAME [--config FILE] key=value ...`.

Works under torchrun, srun and mpirun (see xlmr_mp/distributed.py) and as a single process.
One optimizer step:

    micro-batches  = accumulation x next(loader)                  (this DP rank's slice of the global batch)
    global_masked  = all-reduce_DP(sum of labels != IGNORE_INDEX) (before any forward: the loss contract)
    loss           = schedule.step(micro-batches, global_masked / loss_scale)
                     every micro-batch backpropagates loss_sum_mb * scale / global_masked
                     (PP=1: a plain loop; PP>1: 1F1B / interleaved on torch.distributed.pipelining)
    DP all-reduce  = SUM, bucketed, overlapped with the last backward (parallel/data_parallel.py)
    tied grads     = all-reduce of word-embedding / decoder-copy grads over first + last stage
    fp16           = overflow anywhere -> skip the step, lower the scale (abort at the minimum)
    clip, AdamW    = global norm over TP/PP (each element counted once); ZeRO-1 optional

Everything needed to resume exactly (step, RNG states, loss scaler, data position, Adam state)
is in the sharded checkpoint (checkpoint/manager.py). SIGTERM / SIGUSR1: finish the step, save,
exit with code 75 (EXIT_REQUEUE), which the SLURM launcher requeues on; one arriving at or after the
last step (final save, teardown) changes nothing: the run finishes and exits 0.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import yaml

from xlmr_mp import kernels
from xlmr_mp.atomic import atomic_write
from xlmr_mp.checkpoint.format import resolve_checkpoint_dir
from xlmr_mp.checkpoint.manager import CheckpointManager
from xlmr_mp.checkpoint.state import TrainState, rng_state, set_rng_state  # noqa: F401 (re-exported)
from xlmr_mp.config import ConfigError, RunConfig, dump_config, grad_accumulation_steps, load_config
from xlmr_mp.presets import preset_names
from xlmr_mp.data import loader as L
from xlmr_mp.distributed import (all_reduce_floats, destroy_distributed, exit_with_launcher, init_distributed,
                                 pick_device)
from xlmr_mp.ids import IGNORE_INDEX
from xlmr_mp.metrics import MetricsLogger, flops_per_token, memory_stats, peak_flops, sync_for_timing, throughput
from xlmr_mp.model.sharding import partition_dim
from xlmr_mp.model.xlmr import XLMRModel
from xlmr_mp.optim import LRSchedule, clip_grads, global_grad_norm, norm_counted
from xlmr_mp.parallel.data_parallel import DistributedAdamW, FlatBuffers, GradReducer, backend_has_reduce_scatter
from xlmr_mp.parallel.grads import finalize_grads, sync_tied_embedding_weight
from xlmr_mp.parallel.schedule import PipelineSchedule, step_loss
from xlmr_mp.parallel.stages import build_pipeline_stages, masked_lm_loss_sum
from xlmr_mp.parallel.state import destroy_parallel, init_parallel, seed_parallel_rng
from xlmr_mp.precision import (LossScaleAtMinimum, autocast, build_scaler, device_dtype, grads_have_inf,
                                unscale_grads)
from xlmr_mp.run_lock import RunDirLocked, lock_run_dir

EXIT_REQUEUE = 75          # SIGTERM / SIGUSR1: checkpoint written, requeue me
EXIT_LOSS_SCALE = 3        # fp16 loss scale hit its minimum: checkpoint written, run diverged
EXIT_LOCKED = 4            # another trainer holds the run directory (xlmr_mp/run_lock.py)


def log0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[xlmr_mp.train] {msg}", flush=True)


# ----------------------------------------------------------------------------- signals

class StopFlag:
    """Set by SIGTERM / SIGUSR1; the loop checks it (agreed over all ranks) after each step."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def install(self) -> "StopFlag":
        for s in (signal.SIGTERM, signal.SIGUSR1):
            self._old[s] = signal.signal(s, self._handler)
        return self

    def _handler(self, signum, frame):
        self.signum = signum

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def finish(self) -> None:
        """The run is over (last step done, or exiting with a code of its own): from now on SIGTERM /
        SIGUSR1 are ignored, so one landing during teardown cannot kill the process by the signal and
        turn a finished run into a failed job (exit 138 / 143 under SLURM). SIG_IGN rather than a Python
        handler: the interpreter resets Python handlers to the default (fatal) one while it shuts down.
        The previous handlers are not restored: the process is ending."""
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, signal.SIG_IGN)
        self._old = {}

    def any_rank(self) -> bool:
        return all_reduce_floats([1.0 if self.signum is not None else 0.0], op="max")[0] > 0


# ----------------------------------------------------------------------------- data

def build_loaders(cfg: RunConfig, groups):
    """(train MLMLoader, ValidationLoader or None) for this DP rank (xlmr_mp/data/loader.py)."""
    train = L.build_train_loader(cfg, dp_rank=groups.dp_rank, dp_size=groups.dp_size)
    valid = None
    if cfg.train.eval_interval:
        try:
            valid = L.build_validation_loader(cfg, groups.dp_rank, groups.dp_size)
        except FileNotFoundError as e:
            log0(f"no validation split ({e}); validation disabled")
    if valid is not None:
        warn_validation_gaps(list(train.languages), list(valid.languages), cfg.data.tokenizer)
    return train, valid


def warn_validation_gaps(train_languages: List[str], valid_languages: List[str], tokenizer: str) -> List[str]:
    """Log (rank 0) what validation will not report: languages without validation documents, and bits
    per character when no tokenizer is given; returns the warnings."""
    out = []
    missing = [lang for lang in train_languages if lang not in valid_languages]
    if missing:
        out.append(f"WARNING: no validation documents for {', '.join(missing)} ({len(missing)} of "
                   f"{len(train_languages)} languages): they are not validated; re-run tools/preprocess_data.py "
                   f"with a larger validation share (--split), or add documents")
    if not tokenizer:
        out.append("WARNING: no data.tokenizer: validation reports loss only, no bits per character; set "
                   "data.tokenizer=P.model (the SentencePiece model the data was preprocessed with)")
    for msg in out:
        log0(msg)
    return out


# ----------------------------------------------------------------------------- trainer

class Trainer:
    """One rank's training: it builds the model chunks, optimizer, scaler and loader, holds them in
    `state` (a TrainState, checkpoint/state.py: what a checkpoint saves and restores), and has the
    step / evaluate / save / load operations `train()` strings together."""

    def __init__(self, cfg: RunConfig, groups, device: torch.device, loader=None, valid=None):
        self.cfg, self.groups, self.device = cfg, groups, device
        cfg.precision.dtype = device_dtype(cfg.precision.dtype, device)     # "auto" -> this device's dtype
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.n_accum = grad_accumulation_steps(cfg)
        self.chunks = [c.to(device) for c in build_pipeline_stages(cfg.model, groups, cfg.parallel,
                                                                  init_seed=cfg.train.seed, model_cls=XLMRModel)]
        for c in self.chunks:
            c.set_recompute(cfg.train.recompute)
            c.train()
        # the fused paths, then torch.compile where configured (kernels/fast_paths.py, parallel/compile.py)
        self.kernels = kernels.apply(self.chunks, device, compile=cfg.train.compile)
        sync_tied_embedding_weight(self.chunks, groups)
        seed_parallel_rng(cfg.train.seed, groups)      # dropout streams (differ per PP / DP / TP rank)
        self.named = [(n, p) for c in self.chunks for n, p in c.named_parameters()]
        self.params = [p for _, p in self.named]
        tied = [n for n, _ in self.named if n == "lm_head.decoder_weight"]
        self.norm_names = [n for n, p in self.named
                           if norm_counted(n, p, groups.tp_rank, lambda n_, p_: partition_dim(n_) is not None, tied)]
        # parameters and gradients in contiguous DP buckets (param.grad a view); ZeRO-1 reduce-scatters
        # where the backend can and no later sum needs full gradients (tied embedding across stages)
        zero = cfg.parallel.distributed_optimizer
        self.buffers = FlatBuffers(self.named, groups.dp_group, cfg.parallel.ddp_bucket_mb)
        self.optimizer = DistributedAdamW(self.buffers, cfg.optim, groups.dp_group, zero)
        self.reducer = GradReducer(self.buffers, groups.dp_group, reduce_scatter=zero and groups.pp_size == 1
                                   and backend_has_reduce_scatter(groups.dp_group))
        self.schedule = PipelineSchedule(self.chunks, groups, cfg.parallel, self.n_accum, masked_lm_loss_sum,
                                         device=device, autocast=lambda: autocast(cfg.precision.dtype, device),
                                         variable_micro_batches=bool(cfg.train.batch_warmup),
                                         micro_batch=self.kernels.micro_batch)
        self.lr_schedule = LRSchedule.from_config(cfg.optim, cfg.train.train_steps)
        self.scaler = build_scaler(cfg.precision)
        self.loader, self.valid = loader, valid
        self.state = TrainState(self.chunks, self.optimizer, self.scaler, loader)
        self.checkpoints = CheckpointManager(cfg, groups)
        self.logger = MetricsLogger(cfg.run_dir, self.rank, cfg.logging.jsonl, cfg.logging.tensorboard)
        self.fpt = flops_per_token(cfg.model, cfg.data.seq_length, cfg.data.mask_prob)
        self.peak = peak_flops(device, cfg.precision.dtype)

    @property
    def step(self) -> int:
        """Optimizer steps taken: the TrainState's."""
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    # ------------------------------------------------------------------ one step
    def micro_batches_at(self, step: int) -> int:
        """This rank's micro-batches for optimizer step `step` (varies under train.batch_warmup)."""
        at = getattr(self.loader, "micro_batches_at", None)
        return self.n_accum if at is None else at(step)

    def _next_micro_batches(self) -> List[Dict[str, torch.Tensor]]:
        return [next(self.loader) for _ in range(self.micro_batches_at(self.step))]

    def train_step(self, micro_batches: Optional[List[dict]] = None) -> Dict[str, float]:
        """One optimizer step over the global batch; returns its metrics (same on every rank)."""
        g = self.groups
        t0 = time.perf_counter()
        mbs = micro_batches if micro_batches is not None else self._next_micro_batches()
        global_masked, global_tokens = all_reduce_floats(
            [sum(float((mb["labels"] != IGNORE_INDEX).sum()) for mb in mbs),
             sum(float(mb["attention_mask"].sum()) for mb in mbs)], g.dp_group)
        if global_masked <= 0:
            raise RuntimeError(f"step {self.step}: the global batch has no masked token; check data.mask_prob")
        lr = self.lr_schedule.apply(self.optimizer, self.step)
        scale = self.scaler.scale
        self.reducer.start_step(len(mbs))
        part = self.schedule.step(mbs, global_masked, loss_scale=scale)   # autocast inside, forward only
        finalize_grads(self.chunks, g, self.reducer)    # SP, DP, tied embedding
        loss = step_loss(part, g)        # last stage's partial sums, summed over DP, sent to every stage
        opt = self.optimizer            # gradients: flat buffers (this rank's ranges under ZeRO-1)
        found_inf = grads_have_inf(opt.grad_tensors()) if self.cfg.precision.dtype == "fp16" else False
        skipped = self.scaler.update(found_inf)     # may raise LossScaleAtMinimum
        grad_norm = float("nan")
        if not skipped:
            unscale_grads(opt.grad_tensors(), scale)
            grad_norm = global_grad_norm(opt.norm_grads(self.norm_names), g.tp_group, g.pp_group, opt.norm_group)
            clip_grads(opt.grad_tensors(), grad_norm, self.cfg.optim.clip_grad)
            opt.step()
        self.optimizer.zero_grad()
        self.step += 1
        sync_for_timing(self.device)    # the step ends when the device has run the optimizer's kernels
        dt = time.perf_counter() - t0
        out = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "loss_scale": scale,
               "skipped": int(skipped), "step_time_s": dt, "tokens": global_tokens}
        out.update(throughput(global_tokens, dt, self.world, self.fpt, self.peak))
        out.update(memory_stats(self.device))
        values = getattr(self.loader, "schedule_values", None)   # alpha, mask_prob, global_batch, active_languages
        if values is not None:
            out.update(values(self.step - 1))
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Per-language validation loss (nats per masked token) and bits per character (masked-token
        NLL / ln 2 / characters of the masked pieces), over train.eval_batches batches per language,
        summed over DP. At any layout: `PipelineSchedule.evaluate` runs the forward-only pipeline
        (every rank of a pipeline group passes the same batches) and returns the sums on every rank."""
        if self.valid is None:
            return {}
        out = {}
        for lang in self.valid.languages:
            mbs = list(self.valid.batches(lang, max_batches=self.cfg.train.eval_batches))
            ls, n = self.schedule.evaluate(mbs) if mbs else (0.0, 0)
            chars = sum(float(mb["masked_chars"].sum()) for mb in mbs if "masked_chars" in mb)
            ls, n, chars = all_reduce_floats([ls, n, chars], self.groups.dp_group)   # loss sum, masked, chars
            if n > 0:
                out[f"loss_{lang}"] = ls / n
                if chars > 0:
                    out[f"bpc_{lang}"] = ls / math.log(2) / chars
        if out:
            losses = [v for k, v in out.items() if k.startswith("loss_")]
            out["loss"] = sum(losses) / len(losses)
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """Checkpoint this TrainState (collective; checkpoint/manager.py)."""
        return self.checkpoints.save(self.state)

    def load(self, path: str, load_optim: bool = True, branch: bool = False) -> None:
        """Restore from a step directory saved at any layout (`CheckpointManager.load`)."""
        self.checkpoints.load(self.state, path, load_optim, branch)

    def resume_path(self) -> Optional[str]:
        return self.checkpoints.resume_path()


def _write_schedules(schedules, path: str) -> None:
    """The run's step-keyed schedules (tokens resolved, branch history included), atomically."""
    with atomic_write(path) as f:
        yaml.safe_dump(schedules.resolved(), f, sort_keys=False)


def _format(m: dict) -> str:
    return (f"step {m['step']:>6d} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | gnorm {m['grad_norm']:.3f} | "
            f"scale {m['loss_scale']:g} | {m['tokens_per_s']:.0f} tok/s | {m['tflops']:.3f} TFLOP/s/dev | "
            f"MFU {'n/a' if m['mfu'] is None else format(100 * m['mfu'], '.2f') + '%'} | mem {m['mem_gib']:.2f} GiB")


def train(cfg: RunConfig) -> List[float]:
    """Train from `cfg` (torch.distributed must not be initialised yet, or already be for this run);
    returns the step losses of this process's run. Exits 75 on SIGTERM/SIGUSR1 after saving."""
    env = init_distributed(cfg.parallel.backend, cfg.train.device)
    cfg.validate(env.world_size)                     # every layout rule (parallel/layout.py)
    device = pick_device(cfg.train.device)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and env.world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(env.world_size, 1)))
    run_lock = _lock_run_dir(cfg.run_dir, env.rank)
    groups = init_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.data or None)
    requested, cfg.precision.dtype = cfg.precision.dtype, device_dtype(cfg.precision.dtype, device)
    log0(f"precision.dtype={requested} -> {cfg.precision.dtype} on {_device_name(device)}"
         if requested != cfg.precision.dtype else f"precision.dtype={requested} on {_device_name(device)}")
    if env.rank == 0:           # the resolved config: precision.dtype as run, never "auto"
        dump_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    loader, valid = build_loaders(cfg, groups)
    tr = Trainer(cfg, groups, device, loader, valid)
    path = tr.resume_path()
    if path:
        tr.load(path)
    elif cfg.checkpoint.branch_from:       # a new branch: the parent's state, this run's schedules
        tr.load(resolve_checkpoint_dir(cfg.checkpoint.branch_from), branch=True)
        log0(f"branched from {cfg.checkpoint.branch_from} at step {tr.step}")
    if env.rank == 0 and hasattr(loader, "phases"):
        _write_schedules(loader.phases, os.path.join(cfg.run_dir, "schedules.yaml"))
    start_step = tr.step
    tr.logger.truncate_after(tr.step)
    log0(f"world {env.world_size} ({env.source}) = TP {groups.tp_size} x PP {groups.pp_size} x DP {groups.dp_size}; "
         f"global batch {cfg.train.global_batch} = micro {cfg.train.micro_batch} x accum {tr.n_accum} x DP "
         f"{groups.dp_size}; {sum(p.numel() for p in tr.params)} params on rank 0; precision {cfg.precision.dtype}")
    stop = StopFlag().install()
    losses: List[float] = []
    try:
        while tr.step < cfg.train.train_steps:
            try:
                m = tr.train_step()
            except LossScaleAtMinimum as e:
                log0(f"ABORT: {e}")
                tr.save()
                sys.exit(EXIT_LOSS_SCALE)
            losses.append(m["loss"])
            if tr.step % cfg.logging.interval == 0 or tr.step == cfg.train.train_steps:
                tr.logger.log(tr.step, {k: v for k, v in m.items() if k != "step"})
                log0(_format(m))
            if cfg.train.eval_interval and tr.step % cfg.train.eval_interval == 0:
                ev = tr.evaluate()
                if ev:
                    tr.logger.log(tr.step, ev, prefix="valid")
                    log0("valid " + " ".join(f"{k} {v:.4f}" for k, v in sorted(ev.items())))
            if stop.any_rank() and tr.step < cfg.train.train_steps:   # after the last step: save, exit 0
                log0(f"signal {stop.signum or 'on another rank'}: saving at step {tr.step} and exiting {EXIT_REQUEUE}")
                tr.save()
                sys.exit(EXIT_REQUEUE)
            if cfg.checkpoint.interval and tr.step % cfg.checkpoint.interval == 0 and tr.step < cfg.train.train_steps:
                tr.save()
        if tr.step > start_step:           # a run that resumed at its last step has nothing new to save
            tr.save()
    finally:
        stop.finish()
        tr.logger.close()
        if run_lock is not None:
            run_lock.release()
    destroy_parallel()
    return losses


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)}, sm_{''.join(map(str, torch.cuda.get_device_capability(device)))})"


def _lock_run_dir(run_dir: str, rank: int):
    """Rank 0 takes the run directory's OS lock (xlmr_mp/run_lock.py); every rank fails at once,
    naming the holder, when another trainer has it."""
    lock, err = None, None
    if rank == 0:
        try:
            lock = lock_run_dir(run_dir)
        except RunDirLocked as e:
            err = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        if all_reduce_floats([0.0 if err is None else 1.0], op="max")[0] > 0 and err is None:
            err = RunDirLocked(f"{run_dir} is in use by another trainer (see rank 0's message)")
    if err is not None:
        if lock is not None:
            lock.release()
        raise err
    return lock


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, choices=preset_names(),
                    help="a shipped preset (xlmr_mp/presets/NAME.yaml); --config and key=value apply on top")
    ap.add_argument("--config", default=None, help="a YAML config file (or preset:NAME); may start with `preset: NAME`")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.micro_batch=8")
    dry = ap.add_argument_group("dry run (xlmr_mp/dry_run.py): build ranks of a full-size layout on the CPU, "
                                "fake process groups, meta-device model; nothing trains")
    dry.add_argument("--dry-run", action="store_true", help="one JSON line per rank of --ranks, then a summary")
    dry.add_argument("--world-size", type=int, default=None, help="the job's task count (nodes x tasks per node)")
    dry.add_argument("--ranks", default="0", help="R[,R...] (-1 = the last) or all (default 0)")
    dry.add_argument("--gpu", default="", help="GPU type of the memory plan (xlmr-plan --gpu; default "
                                                "$XLMR_GPU_TYPE, else A100-80)")
    dry.add_argument("--tasks-per-node", type=int, default=8, help="tasks per node (the plan's node count)")
    args = ap.parse_args(argv)
    if args.dry_run:
        from xlmr_mp import dry_run
        sys.exit(dry_run.main(args.config, args.overrides, args.world_size, args.ranks, args.gpu,
                              args.tasks_per_node, preset=args.preset))
    exit_with_launcher()               # under torchrun: die with the launcher, not train on alone
    try:
        cfg = load_config(args.config, args.overrides, validate=False, preset=args.preset)
        cfg.validate(None)
        train(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunDirLocked as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_LOCKED)
    destroy_distributed()


if __name__ == "__main__":
    main()
