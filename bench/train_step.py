"""Benchmark one training step: tokens/s, TFLOP/s per device, MFU and peak memory.

    python bench/train_step.py --preset tiny --micro-batch 8 --precision fp32            # CPU, 1 process
    python bench/train_step.py --preset tiny --nproc 4 --tp 2 --pp 2 --accum 4           # CPU, gloo, 4 processes
    torchrun --nproc-per-node 8 bench/train_step.py --preset large --micro-batch 16 --precision bf16 --tp 2
    python bench/train_step.py ... --out bench/results/train_step_cpu.txt                # append the result
    python bench/train_step.py --preset tiny --micro-batch 8 --accum 2 --paired 10         # + the paired ratio
    python bench/train_step.py --preset tiny --micro-batch 8 --accum 2 --paired 150 --paired-block 1   # single steps

The step is the real trainer step (xlmr_mp.train.Trainer.train_step: micro-batches, DP all-reduce,
clipping, AdamW, loss scaler) on random masked-LM batches (no data on disk needed). FLOPs are model
FLOPs (xlmr_mp.metrics.flops_per_token: no recompute, MLM head on masked positions).

Peer, measured in the same run on rank 0: Hugging Face `XLMRobertaForMaskedLM` of the same shape
with torch AdamW, same micro-batch, sequence length and precision, one device; the ratio printed is
our tokens/s per device over the peer's (HF computes the LM head on every position, we on the masked
15%: part of the ratio is that design choice). Timings are wall clock; the first `--warmup` steps are
not timed. The two are timed one after the other; `--paired N` also alternates them in N blocks of 5
steps in the same process and prints the paired ratio, which machine drift between the phases cannot
bias (one process only).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import bench_log  # noqa: E402  (bench/, beside this script)

from xlmr_mp.ids import IGNORE_INDEX  # noqa: E402


class RandomBatches:
    """Endless random masked-LM micro-batches [micro, seq] (15% masked, <s> first, full length)."""

    def __init__(self, vocab: int, seq: int, micro: int, seed: int = 0):
        self.v, self.s, self.m = vocab, seq, micro
        self.g = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self):
        ids = torch.randint(4, self.v - 1, (self.m, self.s), generator=self.g)
        ids[:, 0] = 0
        ids[:, -1] = 2
        mask = torch.rand(self.m, self.s, generator=self.g) < 0.15
        mask[:, 0] = False
        mask[:, 1] = True
        labels = torch.where(mask, ids, torch.full_like(ids, IGNORE_INDEX))
        return {"input_ids": torch.where(mask, torch.full_like(ids, self.v - 1), ids),
                "attention_mask": torch.ones_like(ids), "labels": labels,
                "lang": torch.zeros(self.m, dtype=torch.long)}


def build_config(a, world: int):
    from xlmr_mp.config import load_config
    dp = world // (a.tp * a.pp)
    ov = [f"train.micro_batch={a.micro_batch}", f"train.global_batch={a.micro_batch * a.accum * dp}",
          f"precision.dtype={a.precision}", f"parallel.tensor={a.tp}", f"parallel.pipeline={a.pp}",
          f"parallel.virtual_stages={a.virtual_stages}", f"train.recompute={a.recompute}",
          f"train.device={a.device}", "logging.jsonl=false", "logging.tensorboard=false",
          "checkpoint.interval=0", f"optim.warmup_steps={a.steps + a.warmup + 1}",
          # never the preset's relative runs/<preset> under the caller's directory (--set run_dir=... wins)
          f"run_dir={os.path.join(tempfile.gettempdir(), 'xlmr_mp_bench_train_step')}"]
    if a.virtual_stages > 1:
        ov.append("parallel.schedule=interleaved")
    if a.seq:
        ov.append(f"data.seq_length={a.seq}")
    if a.zero:
        ov.append("parallel.distributed_optimizer=true")
    if a.compile:
        ov.append("train.compile=true")
    cfg = load_config(None, ov + list(a.set), world_size=world, preset=a.preset)
    if cfg.data.seq_length > cfg.model.max_positions - 2:
        raise SystemExit(f"--seq {cfg.data.seq_length} > model.max_positions - 2 = {cfg.model.max_positions - 2}")
    return cfg


def measure_ours(a, world: int) -> dict:
    import torch.distributed as dist
    from xlmr_mp.distributed import init_distributed, pick_device
    from xlmr_mp.parallel.state import destroy_parallel, init_parallel
    from xlmr_mp.train import Trainer
    init_distributed("auto", a.device)
    cfg = build_config(a, world)
    device = pick_device(cfg.train.device)
    groups = init_parallel(a.tp, a.pp)
    tr = Trainer(cfg, groups, device, RandomBatches(cfg.model.vocab_size, cfg.data.seq_length, a.micro_batch,
                                                   seed=groups.dp_rank))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(a.warmup):
        tr.train_step()
    ab = kernels_ab(tr, a.ab_kernels) if a.ab_kernels else None
    ms = [tr.train_step() for _ in range(a.steps)]
    secs = sum(m["step_time_s"] for m in ms)
    tokens = sum(cfg.train.global_batch * cfg.data.seq_length for _ in ms)
    mem = max_over_ranks(ms[-1]["mem_gib"], device)
    opt_bytes = [float(tr.optimizer.state_bytes())]
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, opt_bytes[0])
        opt_bytes = gathered
    out = {"tokens_per_s": tokens / secs, "tflops": tokens / secs * tr.fpt / world / 1e12,
           "step_s": secs / len(ms), "mem_gib": mem, "peak_tflops": None if tr.peak is None else tr.peak / 1e12,
           "loss": ms[-1]["loss"], "params_rank0": sum(p.numel() for p in tr.params),
           "global_batch": cfg.train.global_batch, "seq": cfg.data.seq_length, "fpt": tr.fpt,
           "dtype": cfg.precision.dtype, "device": str(device), "cfg": cfg, "opt_bytes": opt_bytes}
    out["mfu"] = None if tr.peak is None else out["tflops"] * 1e12 / tr.peak
    out["kernels_ab"] = ab
    # after our measurement, so that its peak memory does not include the peer's model
    out["paired_peer"] = paired_peer(tr, a, cfg, device, a.paired) if a.paired and world == 1 else None
    destroy_parallel()
    return out


def reduction_device(backend: Optional[str], device: torch.device) -> torch.device:
    """Where a tensor handed to a collective must live: this rank's GPU under nccl (NCCL is
    registered for CUDA tensors only), the CPU under gloo / mpi or without torch.distributed."""
    return torch.device(device) if backend == "nccl" else torch.device("cpu")


def max_over_ranks(value: float, device: torch.device) -> float:
    """`value`'s maximum over every rank (itself without torch.distributed)."""
    import torch.distributed as dist
    backend = dist.get_backend() if dist.is_initialized() else None
    t = torch.tensor([float(value)], dtype=torch.float64, device=reduction_device(backend, device))
    if backend is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def alternating_blocks(steps: dict, rounds: int, block: int = 5, sync=None, on_progress=None) -> dict:
    """Seconds per step of each callable in `steps` ({name: step}), timed in `rounds` rounds that run
    every step in turn for one untimed step (settling after the switch) and `block` timed ones, so
    machine drift cancels pair by pair: {name: [seconds per step, one per round]}. block=1 times
    single steps in strict alternation, with no settling step: the finest pairing (on a noisy shared
    machine the tightest spread), each step timed right after the other's. `sync` (e.g.
    torch.cuda.synchronize) runs before each clock read."""
    times = {k: [] for k in steps}
    for r in range(rounds):
        for k, step in steps.items():
            if block > 1:
                step()
            if sync:
                sync()
            t0 = time.perf_counter()
            for _ in range(block):
                step()
            if sync:
                sync()
            times[k].append((time.perf_counter() - t0) / block)
        if on_progress:
            on_progress(r)
    return times


def _paired_summary(times: dict, num: str, den: str) -> str:
    import statistics
    ratios = [n / d for n, d in zip(times[num], times[den])]
    return f"median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"


def kernels_ab(tr, rounds: int) -> str:
    """Our step with XLMR_MP_KERNELS=reference and =auto in alternating blocks of 5 steps in this one
    process (the switch is read at every call), so machine drift cancels pair by pair."""
    import statistics
    before = os.environ.get("XLMR_MP_KERNELS")

    def under(mode):
        def step():
            os.environ["XLMR_MP_KERNELS"] = mode
            tr.train_step()
        return step

    try:
        times = alternating_blocks({"reference": under("reference"), "auto": under("auto")}, rounds)
    finally:
        if before is None:
            os.environ.pop("XLMR_MP_KERNELS", None)
        else:
            os.environ["XLMR_MP_KERNELS"] = before
    return (f"kernels A/B ({rounds} alternating blocks of 5 steps, one process): XLMR_MP_KERNELS=reference "
            f"{statistics.median(times['reference']) * 1e3:.1f} ms/step, auto {statistics.median(times['auto']) * 1e3:.1f} "
            f"ms/step, paired ratio reference/auto {_paired_summary(times, 'reference', 'auto')}")


def paired_peer(tr, a, cfg, device, rounds: int) -> str:
    """Our step and the peer's in alternating blocks of 5 steps in this one process (one device), so
    that the machine's drift cancels pair by pair; the sequential figures above can drift between the
    two phases (how far, on a shared machine: bench/results/README.md)."""
    import gc
    import statistics
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    times = alternating_blocks({"ours": tr.train_step, "peer": peer_step(a, cfg, device)}, rounds,
                               block=a.paired_block, sync=sync)
    gc.collect()                                          # the peer's model is garbage now: free it
    what = "single steps alternated" if a.paired_block == 1 else f"alternating blocks of {a.paired_block} steps"
    return (f"paired ours/peer ({rounds} {what}, one process): ours "
            f"{statistics.median(times['ours']) * 1e3:.1f} ms/step, peer {statistics.median(times['peer']) * 1e3:.1f} "
            f"ms/step, ratio {_paired_summary(times, 'peer', 'ours')}")


def peer_step(a, cfg, device):
    """One optimizer step of the peer as a closure: HF XLMRobertaForMaskedLM of cfg's shape, torch
    AdamW, micro-batches of a.micro_batch x a.accum at a.precision, clipping at 1.0."""
    import warnings
    warnings.simplefilter("ignore")
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM
    from xlmr_mp.precision import autocast
    m = cfg.model
    hf = XLMRobertaForMaskedLM(XLMRobertaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, intermediate_size=m.ffn_size, max_position_embeddings=m.max_positions,
        pad_token_id=1, hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.attention_dropout,
        type_vocab_size=1)).to(device)
    if a.recompute != "none":
        hf.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    batches = RandomBatches(m.vocab_size, cfg.data.seq_length, a.micro_batch, seed=1)

    def step():
        for _ in range(a.accum):
            b = {k: v.to(device) for k, v in next(batches).items() if k != "lang"}
            with autocast(a.precision, device):
                loss = hf(**b).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return step


def measure_peer(a, cfg, device) -> dict:
    """HF XLMRobertaForMaskedLM, same shape / micro-batch / precision, torch AdamW, one device."""
    from xlmr_mp.metrics import memory_stats, reset_peak_memory
    reset_peak_memory(device)       # the peer's own peak, not ours (measured before it, in this process)
    step = peer_step(a, cfg, device)
    for _ in range(a.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    tokens = a.steps * a.accum * a.micro_batch * cfg.data.seq_length
    return {"tokens_per_s": tokens / secs, "step_s": secs / a.steps, **memory_stats(device)}


def rank_main(rank, world, a, port):
    if world > 1 and "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        torch.set_num_threads(1)
    ours = measure_ours(a, world)
    import torch.distributed as dist
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:           # our figures first: a peer cut short (a time limit, out of memory) leaves them written
        report(a, world, ours)
    if rank0 and not a.no_peer:
        report_peer(a, world, ours, measure_peer(a, ours["cfg"], torch.device(ours["device"])))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _mfu_text(ours) -> str:
    if ours["mfu"] is None:
        return "MFU n/a (no peak for this device in xlmr_mp/metrics.py GPU_MODELS)"
    return f"MFU {100 * ours['mfu']:.2f}% (peak {ours['peak_tflops']:.3f} TFLOP/s/device)"


def report(a, world, ours):
    lines = [
        f"# {bench_log.utc_stamp()}  commit {bench_log.commit()}  "
        f"cpus {os.cpu_count()}  torch {torch.__version__}",
        f"# command: python bench/train_step.py {' '.join(sys.argv[1:])}",
        f"preset={a.preset} layout=TP{a.tp}xPP{a.pp}xDP{world // (a.tp * a.pp)} (V={a.virtual_stages}) "
        f"micro={a.micro_batch} accum={a.accum} global={ours['global_batch']} seq={ours['seq']} "
        f"dtype={ours['dtype']} recompute={a.recompute} zero={a.zero} device={ours['device']} "
        f"params(rank0)={ours['params_rank0']:,}",
        f"ours: {ours['tokens_per_s']:.1f} tokens/s total, {ours['tokens_per_s'] / world:.1f} tokens/s/device, "
        f"{ours['step_s'] * 1e3:.1f} ms/step, {ours['tflops']:.4f} TFLOP/s/device, {_mfu_text(ours)}, "
        f"peak mem {ours['mem_gib']:.2f} GiB, loss {ours['loss']:.3f}",
        f"optimizer-state bytes per rank: max {max(ours['opt_bytes']) / 2 ** 20:.1f} MiB, min "
        f"{min(ours['opt_bytes']) / 2 ** 20:.1f} MiB, max/min {max(ours['opt_bytes']) / max(min(ours['opt_bytes']), 1):.3f}",
    ]
    if ours.get("kernels_ab"):
        lines.append(ours["kernels_ab"])
    if ours.get("paired_peer"):
        lines.append(ours["paired_peer"])
    if a.plan:
        from xlmr_mp.cli import plan as planner
        pr = planner.plan(ours["cfg"], planner.GPUS[a.plan], nodes=1, gpus_per_node=world)
        lines.append(f"planner (xlmr-plan --gpu {a.plan}): predicted peak {pr['memory']['total'] / 2 ** 30:.2f} GiB/rank, "
                     f"measured {ours['mem_gib']:.2f} GiB, predicted/measured {pr['memory']['total'] / 2 ** 30 / ours['mem_gib']:.3f}")
    if a.note:
        lines.append(f"note: {a.note}")
    bench_log.emit("\n".join(lines), a.out)


def report_peer(a, world, ours, peer):
    bench_log.emit("\n".join([
        f"peer (HF XLMRobertaForMaskedLM + torch AdamW, 1 device, micro={a.micro_batch} accum={a.accum}): "
        f"{peer['tokens_per_s']:.1f} tokens/s, {peer['step_s'] * 1e3:.1f} ms/step, peak mem {peer['mem_gib']:.2f} GiB",
        f"ratio ours/peer (tokens/s per device): {ours['tokens_per_s'] / world / peer['tokens_per_s']:.3f}"]), a.out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", help="a shipped preset (xlmr_mp/presets/<preset>.yaml)")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step and DP rank")
    ap.add_argument("--seq", type=int, default=0, help="sequence length (default: the preset's)")
    ap.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"],
                    help="auto: bf16 on sm_80+, fp16 on V100, fp32 on CPU (xlmr_mp.precision.resolve_dtype)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--virtual-stages", type=int, default=1)
    ap.add_argument("--zero", action="store_true", help="ZeRO-1 distributed optimizer")
    ap.add_argument("--compile", action="store_true", help="train.compile=true (torch.compile of layers and loss)")
    ap.add_argument("--plan", default="", help="also print tools/plan.py's predicted peak memory per rank for this "
                    "GPU type (e.g. H100; CPU: peak RSS includes the process baseline, about 0.4 GiB)")
    ap.add_argument("--recompute", default="none", choices=["none", "full", "selective"])
    ap.add_argument("--nproc", type=int, default=1, help="CPU: spawn this many gloo processes (GPU: use torchrun)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--ab-kernels", type=int, default=0, metavar="ROUNDS",
                    help="also time our step with XLMR_MP_KERNELS=reference against auto, alternating ROUNDS "
                    "blocks of 5 steps in this process (CPU: the AVX2 attention and bias-GELU kernels)")
    ap.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                    help="one process only: also time our step and the peer's in ROUNDS alternating blocks of 5 "
                    "steps and print the paired ratio (robust to machine drift between the two phases)")
    ap.add_argument("--paired-block", type=int, default=5, metavar="K",
                    help="timed steps per block of --paired (default 5, after one settling step); 1: single "
                    "steps in strict alternation, the finest pairing")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value config overrides")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default="", help="append the result to this file")
    a = ap.parse_args()
    if a.paired_block < 1:
        ap.error(f"--paired-block {a.paired_block}: give at least 1 timed step per block")
    if "RANK" in os.environ:           # torchrun / srun with env set
        rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), a, 0)
    elif a.nproc > 1:
        import socket
        import torch.multiprocessing as mp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(rank_main, args=(a.nproc, a, port), nprocs=a.nproc, start_method="spawn")
    else:
        rank_main(0, 1, a, 0)


if __name__ == "__main__":
    main()
