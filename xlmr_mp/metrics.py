"""Training metrics: timers, FLOPs per token, peak FLOP/s table, MFU, memory, JSONL/TensorBoard sinks.

FLOPs count model FLOPs (no recomputation), as the MFU definition of PaLM / Megatron-LM:
per token and layer the forward costs 8h^2 (QKV + output projections) + 4hf (FFN) + 4sh (scores
and weighted values); the masked-LM head runs on the gathered masked positions only:
mask_prob * (2h^2 + 2hV) per token. Training = 3x forward (backward is twice the forward).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Dict, Optional

import torch

from xlmr_mp.atomic import atomic_write

# Dense peak FLOP/s per device model, by precision (vendor datasheets, no sparsity; fp16/bf16 are
# the tensor-core peaks, fp32 the CUDA-core one). The form factor matters: an H100 PCIe card has
# 114 SMs at a lower clock (756 TFLOP/s bf16), the NVL card 835, the SXM module 989.
PEAK_FLOPS = {
    "V100-SXM": {"fp32": 15.7e12, "fp16": 125e12, "bf16": 15.7e12},   # V100 has no bf16 tensor cores
    "V100-PCIe": {"fp32": 14e12, "fp16": 112e12, "bf16": 14e12},
    "V100S-PCIe": {"fp32": 16.4e12, "fp16": 130e12, "bf16": 16.4e12},
    "A100-SXM": {"fp32": 19.5e12, "fp16": 312e12, "bf16": 312e12},     # 40 and 80 GB alike
    "A100-PCIe": {"fp32": 19.5e12, "fp16": 312e12, "bf16": 312e12},
    "H100-SXM": {"fp32": 67e12, "fp16": 989e12, "bf16": 989e12},
    "H100-PCIe": {"fp32": 51e12, "fp16": 756e12, "bf16": 756e12},
    "H100-NVL": {"fp32": 60e12, "fp16": 835e12, "bf16": 835e12},
    "H200-SXM": {"fp32": 67e12, "fp16": 989e12, "bf16": 989e12},
    "H200-NVL": {"fp32": 60e12, "fp16": 835e12, "bf16": 835e12},
    "GH200": {"fp32": 67e12, "fp16": 989e12, "bf16": 989e12},
    # Nominal CPU peak for one process: cores it may use x 2.5 GHz x 32 fp32 FLOP/cycle (AVX2, 2 FMA units).
    "CPU": {"fp32": 2.5e9 * 32, "fp16": 2.5e9 * 32, "bf16": 2.5e9 * 32},
}

# torch.cuda.get_device_name() -> PEAK_FLOPS key: the first entry whose words all occur in the
# upper-cased name. Names as the driver reports them: "NVIDIA H100 80GB HBM3" (SXM5), "NVIDIA H100
# PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA GH200 480GB",
# "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe", "Tesla V100-SXM2-32GB",
# "Tesla V100-PCIE-16GB", "Tesla V100S-PCIE-32GB". A name no entry matches (an H800, an L40S, a
# bare "H100" whose form factor it does not say) has no peak: MFU is not reported rather than wrong.
GPU_MODELS = (
    (("GH200",), "GH200"),               # before H200: "GH200" contains it
    (("H200", "NVL"), "H200-NVL"),
    (("H200",), "H200-SXM"),
    (("H100", "NVL"), "H100-NVL"),
    (("H100", "PCIE"), "H100-PCIe"),
    (("H100", "HBM3"), "H100-SXM"),      # the SXM5 module reports its memory: "H100 80GB HBM3"
    (("H100", "SXM"), "H100-SXM"),
    (("A100", "SXM"), "A100-SXM"),
    (("A100", "PCIE"), "A100-PCIe"),
    (("V100S",), "V100S-PCIe"),
    (("V100", "SXM"), "V100-SXM"),
    (("V100", "PCIE"), "V100-PCIe"),
)


def gpu_model(name: str) -> Optional[str]:
    """The PEAK_FLOPS key of a GPU from its device name (torch.cuda.get_device_name), None when unknown."""
    upper = name.upper()
    for words, model in GPU_MODELS:
        if all(w in upper for w in words):
            return model
    return None


def device_kind(device: torch.device) -> Optional[str]:
    """'CPU', the GPU's PEAK_FLOPS key (e.g. 'H100-SXM'), or None for a GPU not in GPU_MODELS."""
    if device.type != "cuda":
        return "CPU"
    return gpu_model(torch.cuda.get_device_name(device))


def peak_flops(device: torch.device, dtype: str) -> Optional[float]:
    """Peak FLOP/s of one device (CPU: per process, times the torch threads it runs); None for a
    GPU whose model is not known (then MFU is not reported)."""
    kind = device_kind(device)
    if kind is None:
        return None
    peak = PEAK_FLOPS[kind][dtype]
    if kind == "CPU":
        peak *= torch.get_num_threads()
    return peak


def sync_for_timing(device: torch.device) -> None:
    """Wait until `device` has run the work queued so far, before a clock read that ends a timing.
    CUDA kernels run asynchronously: without this a step's time stops when the host has queued the
    optimizer's kernels, not when they have run. A no-op on the CPU (its work is done on return)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(mcfg, seq_length: int, mask_prob: float = 0.15) -> float:
    """Training FLOPs (forward + backward) per input token for the whole model."""
    h, f, s, L, V = mcfg.hidden_size, mcfg.ffn_size, seq_length, mcfg.num_layers, mcfg.vocab_size
    fwd = L * (8 * h * h + 4 * h * f + 4 * s * h) + mask_prob * (2 * h * h + 2 * h * V)
    return 3.0 * fwd


_STATUS_FD = [0, -1]     # (pid, fd of /proc/<pid>/status): the trainer reads it every step


def _proc_status() -> bytes:
    """/proc/<this pid>/status, read from a descriptor kept open (read every step: no open + close
    per read); reopened in a forked child, whose pid differs."""
    pid = os.getpid()
    if _STATUS_FD[0] != pid:
        _STATUS_FD[:] = [pid, os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)]
    return os.pread(_STATUS_FD[1], 1 << 16, 0)


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes since it started (or since reset_peak_rss).

    Linux: VmHWM of /proc/self/status, the high-water mark of this process's own address space.
    Not getrusage's ru_maxrss: the kernel carries that across fork + exec, so a process spawned by a
    large parent (a rank started by the multiprocessing 'spawn' method from a pytest session holding
    gigabytes, a torchrun worker) reports at least the parent's RSS at the fork. Elsewhere
    ru_maxrss is the only measure there is."""
    try:
        status = _proc_status()
        at = status.find(b"\nVmHWM:")
        if at >= 0:
            return int(status[at + 7:status.index(b"kB", at)]) * 1024
    except (OSError, ValueError):
        pass
    scale = 1 if os.uname().sysname == "Darwin" else 1024       # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux: '5' to /proc/self/clear_refs); False where the
    kernel does not allow it (the peak then counts from the process start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory measurement on `device` (what `memory_stats` reports): on a GPU, after
    returning the cached blocks of freed tensors (a model measured before and dropped), the peak
    allocated from now on; on the CPU the peak RSS from now on, where the kernel allows it."""
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def memory_stats(device: torch.device) -> Dict[str, float]:
    """Peak memory in GiB: allocated on the GPU, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return {"mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30,
                "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2 ** 30}
    return {"mem_gib": peak_rss_bytes() / 2 ** 30}


class Timer:
    """Wall time between start() and stop(), synchronising CUDA when present."""

    def __init__(self, device: Optional[torch.device] = None):
        self.device = device
        self.elapsed = 0.0
        self._t0 = None

    def _sync(self):
        if self.device is not None:
            sync_for_timing(self.device)

    def start(self) -> "Timer":
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> float:
        self._sync()
        self.elapsed = time.perf_counter() - self._t0
        return self.elapsed


def throughput(tokens: int, seconds: float, n_devices: int, fpt: float,
               peak: Optional[float]) -> Dict[str, Optional[float]]:
    """tokens/s (all devices), model TFLOP/s per device and MFU (None without a known peak)."""
    tps = tokens / max(seconds, 1e-12)
    tflops = tps * fpt / n_devices / 1e12
    return {"tokens_per_s": tps, "tflops": tflops, "mfu": None if peak is None else tflops * 1e12 / peak}


class MetricsLogger:
    """JSONL and TensorBoard (<run_dir>/tb) sinks; silent off rank 0.

    Training steps go to <run_dir>/metrics.jsonl (one object per logged step); other prefixes
    (e.g. 'valid') to <run_dir>/<prefix>.jsonl, so metrics.jsonl holds training steps only.
    """

    def __init__(self, run_dir: str, rank: int, jsonl: bool = True, tensorboard: bool = False):
        self.active = rank == 0
        self.run_dir, self.jsonl = run_dir, jsonl
        self._files = {}
        self._tb = None
        if not self.active:
            return
        os.makedirs(run_dir, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:      # a viewer only: the numbers still go to the JSONL files
                print("note: tensorboard is not installed: logging.tensorboard skipped, metrics in "
                      f"{run_dir}/*.jsonl (pip install tensorboard, or set logging.tensorboard=false)",
                      file=sys.stderr, flush=True)
            else:
                self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def truncate_after(self, step: int) -> None:
        """Drop records of steps > `step` from the JSONL files (a resumed run redoes those steps;
        a fresh run, step 0, starts empty), so each file tells one trajectory. Atomic rewrite."""
        if not self.active or not self.jsonl:
            return
        for name in os.listdir(self.run_dir):
            if not name.endswith(".jsonl") or name in {os.path.basename(f.name) for f in self._files.values()}:
                continue
            path = os.path.join(self.run_dir, name)
            keep = []
            with open(path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= step:
                            keep.append(line if line.endswith("\n") else line + "\n")
                    except json.JSONDecodeError:
                        pass        # a line cut by a crash
            with atomic_write(path) as f:
                f.writelines(keep)

    def log(self, step: int, values: Dict[str, float], prefix: str = "train") -> None:
        if not self.active:
            return
        if self.jsonl:
            if prefix not in self._files:
                name = "metrics.jsonl" if prefix == "train" else f"{prefix}.jsonl"
                self._files[prefix] = open(os.path.join(self.run_dir, name), "a")
            f = self._files[prefix]
            f.write(json.dumps({"step": step, **values}) + "\n")
            f.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
        if self._tb is not None:
            self._tb.close()
            self._tb = None
