"""Decisions that only a GPU run takes, made functions of the device type / name / capability so
that their CUDA branches run here on a CPU (issue 26): the collective's tensor device under NCCL,
the CUDA generator a checkpoint saves and restores, precision.dtype=auto, the MFU peak by device
name, the device synchronisation that ends a step's timing."""
import os
import subprocess
import sys
import types

import pytest
import torch
import yaml

from xlmr_mp import metrics
from xlmr_mp.checkpoint.state import cuda_rng_state, set_cuda_rng_state
from xlmr_mp.precision import resolve_dtype

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))


# ----------------------------------------------------------------------------- defect 2: NCCL tensors

def test_reduction_tensor_lives_on_the_gpu_under_nccl():
    import train_step
    assert train_step.reduction_device("nccl", torch.device("cuda", 3)) == torch.device("cuda", 3)
    assert train_step.reduction_device("gloo", torch.device("cuda", 3)) == torch.device("cpu")
    assert train_step.reduction_device(None, torch.device("cpu")) == torch.device("cpu")


def test_max_over_ranks_hands_nccl_a_tensor_on_the_device(monkeypatch):
    """Under a (simulated) NCCL process group the all-reduced tensor is made on the rank's device
    (the meta device stands in for cuda:N here); a CPU tensor is what NCCL rejects."""
    import torch.distributed as dist
    import train_step
    seen = []

    class Reduced(Exception):
        pass

    def all_reduce(t, op=None, group=None):
        seen.append(t.device)
        raise Reduced

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(Reduced):
        train_step.max_over_ranks(1.5, torch.device("meta"))
    assert seen == [torch.device("meta")]


# ----------------------------------------------------------------------------- defect 6: CUDA generator

class FakeCuda:
    """torch.cuda's generator calls for `count` visible devices, this process on `current`."""

    def __init__(self, count, current):
        self.count, self.current = count, current
        self.states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(count)}
        self.sets = []

    def is_available(self):
        return self.count > 0

    def device_count(self):
        return self.count

    def current_device(self):
        return self.current

    def get_rng_state(self, device="cuda"):
        return self.states[self.current if device == "cuda" else device].clone()

    def set_rng_state(self, state, device="cuda"):
        index = self.current if device == "cuda" else device
        if index >= self.count:
            raise IndexError(index)
        self.sets.append(index)
        self.states[index] = state.clone()


@pytest.mark.parametrize("restore_count, restore_current", [(1, 0), (8, 5), (16, 3), (2, 1)])
def test_cuda_generator_of_the_current_device_goes_to_the_current_device(restore_count, restore_current):
    """Saved by a rank on device 3 of 8 visible (torchrun); restored with 1 visible (SLURM binding a
    GPU per task), with 8 on another device, with more devices: always into the current device,
    always the saver's own device's state."""
    saver = FakeCuda(8, 3)
    saver.states[3] = torch.tensor([42, 7], dtype=torch.uint8)
    saved = cuda_rng_state(saver)
    assert torch.equal(saved, torch.tensor([42, 7], dtype=torch.uint8))
    loader = FakeCuda(restore_count, restore_current)
    set_cuda_rng_state(saved, loader)
    assert loader.sets == [restore_current]
    assert torch.equal(loader.states[restore_current], saved)


def test_cuda_generator_without_cuda_and_old_lists():
    assert cuda_rng_state(FakeCuda(0, 0)) is None
    set_cuda_rng_state(None, FakeCuda(2, 0))                  # nothing saved: nothing set
    legacy = [torch.tensor([i], dtype=torch.uint8) for i in range(8)]   # get_rng_state_all() of 8
    one = FakeCuda(1, 0)
    set_cuda_rng_state(legacy, one)
    assert one.sets == [0] and torch.equal(one.states[0], legacy[0])
    few = FakeCuda(4, 3)
    set_cuda_rng_state(legacy[:2], few)                        # no entry for device 3: left as seeded
    assert few.sets == []


# ----------------------------------------------------------------------------- defect 8: dtype=auto

@pytest.mark.parametrize("device_type, capability, want", [
    ("cuda", (7, 0), "fp16"), ("cuda", (7, 5), "fp16"), ("cuda", (8, 0), "bf16"), ("cuda", (8, 6), "bf16"),
    ("cuda", (9, 0), "bf16"), ("cuda", (10, 0), "bf16"), ("cpu", None, "fp32")])
def test_auto_dtype_by_device(device_type, capability, want):
    assert resolve_dtype("auto", device_type, capability) == want


def test_auto_dtype_reads_the_gpus_capability(monkeypatch):
    from xlmr_mp.precision import device_dtype
    for cap, want in (((7, 0), "fp16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        assert device_dtype("auto", torch.device("cuda", 0)) == want
        assert device_dtype("fp32", torch.device("cuda", 0)) == "fp32"
    assert device_dtype("auto", torch.device("cpu")) == "fp32"


def test_explicit_dtype_is_kept():
    for d in ("fp32", "bf16", "fp16"):
        assert resolve_dtype(d, "cuda", (7, 0)) == d and resolve_dtype(d, "cpu", None) == d


def test_auto_is_a_valid_option():
    from xlmr_mp.config import load_config
    assert load_config(None, ["precision.dtype=auto"]).precision.dtype == "auto"


@pytest.mark.slow          # one trainer CLI start (~8 s)
def test_resolved_dtype_is_logged_and_written_to_the_run_config(tmp_path):
    """`python -m xlmr_mp.train ... precision.dtype=auto` on the CPU: the log names the resolution and
    RUN_DIR/config.yaml holds fp32, not auto (the run stops at the missing data afterwards)."""
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "xlmr_mp.train", "--config", "preset:tiny", f"run_dir={run}",
                        "train.device=cpu", "precision.dtype=auto", "logging.tensorboard=false"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert "precision.dtype=auto -> fp32 on cpu" in p.stdout, p.stdout + p.stderr[-3000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["precision"]["dtype"] == "fp32"


# ----------------------------------------------------------------------------- defect 9: MFU peak by name

@pytest.mark.parametrize("name, model, bf16", [
    ("NVIDIA H100 80GB HBM3", "H100-SXM", 989e12),
    ("NVIDIA H100 PCIe", "H100-PCIe", 756e12),
    ("NVIDIA H100 NVL", "H100-NVL", 835e12),
    ("NVIDIA H200", "H200-SXM", 989e12),
    ("NVIDIA H200 NVL", "H200-NVL", 835e12),
    ("NVIDIA GH200 480GB", "GH200", 989e12),
    ("NVIDIA A100-SXM4-80GB", "A100-SXM", 312e12),
    ("NVIDIA A100-SXM4-40GB", "A100-SXM", 312e12),
    ("NVIDIA A100-PCIE-40GB", "A100-PCIe", 312e12),
    ("NVIDIA A100 80GB PCIe", "A100-PCIe", 312e12),
    ("Tesla V100-SXM2-32GB", "V100-SXM", 15.7e12),
    ("Tesla V100-PCIE-16GB", "V100-PCIe", 14e12),
    ("Tesla V100S-PCIE-32GB", "V100S-PCIe", 16.4e12),
])
def test_gpu_model_and_peak_by_device_name(name, model, bf16):
    assert metrics.gpu_model(name) == model
    assert metrics.PEAK_FLOPS[model]["bf16"] == bf16


def test_v100_fp16_peaks_and_unknown_gpus(monkeypatch):
    assert metrics.PEAK_FLOPS["V100-SXM"]["fp16"] == 125e12 and metrics.PEAK_FLOPS["V100-PCIe"]["fp16"] == 112e12
    for name in ("NVIDIA H800", "NVIDIA L40S", "NVIDIA H100", "NVIDIA GeForce RTX 4090", "AMD Instinct MI300X"):
        assert metrics.gpu_model(name) is None, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    assert metrics.peak_flops(torch.device("cuda", 0), "bf16") is None
    assert metrics.throughput(1000, 1.0, 1, 1e9, None)["mfu"] is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert metrics.peak_flops(torch.device("cuda", 0), "bf16") == 756e12


# ----------------------------------------------------------------------------- defect 10: step timing

def test_timing_synchronises_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    metrics.sync_for_timing(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]
    metrics.sync_for_timing(torch.device("cpu"))
    assert len(calls) == 1


def test_train_step_time_ends_after_a_device_sync(monkeypatch, tmp_path):
    """Trainer.train_step synchronises its device once per step, after the optimizer step and before
    the clock read that gives step_time_s."""
    import time

    import torch.distributed as dist
    import xlmr_mp.train as T
    from tests.support.train_bodies import make_trainer, tiny_cfg
    from xlmr_mp.parallel.state import destroy_parallel
    events = []
    real_clock = time.perf_counter
    monkeypatch.setattr(T, "sync_for_timing", lambda device: events.append(("sync", device)))
    monkeypatch.setattr(T.time, "perf_counter", lambda: events.append(("clock",)) or real_clock())
    ours = not dist.is_initialized()
    if ours:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        tr, _ = make_trainer(tiny_cfg(["train.global_batch=2", "train.micro_batch=2", "logging.tensorboard=false"]))
        stepped = []
        step = tr.optimizer.step
        monkeypatch.setattr(tr.optimizer, "step", lambda *a, **k: stepped.append(len(events)) or step(*a, **k))
        events.clear()
        tr.train_step()
        syncs = [i for i, e in enumerate(events) if e[0] == "sync"]
        assert [events[i][1] for i in syncs] == [torch.device("cpu")]
        assert stepped and stepped[0] <= syncs[0]                  # after the optimizer step
        assert events[syncs[0] + 1] == ("clock",) and events[-1] == ("clock",)    # then the clock stops
    finally:
        destroy_parallel()
        if ours:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- bench/train_step.py on a GPU

def test_peak_memory_reset_on_the_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(("reset", device)))
    metrics.reset_peak_memory(torch.device("cuda", 2))
    assert calls == ["empty_cache", ("reset", torch.device("cuda", 2))]


def test_peer_peak_is_its_own_and_our_figures_come_first(monkeypatch, tmp_path):
    """The peer's peak memory is measured from a reset made after our run (on a GPU the allocator's
    peak would otherwise be ours), and our figures are written before the peer runs: a peer cut
    short leaves them in --out."""
    import argparse

    import train_step
    events = []
    monkeypatch.setattr(metrics, "reset_peak_memory", lambda device: events.append("reset"))
    monkeypatch.setattr(train_step, "peer_step", lambda a, cfg, device: lambda: events.append("peer step"))
    train_step.measure_peer(argparse.Namespace(warmup=1, steps=2, accum=1, micro_batch=2), types.SimpleNamespace(
        data=types.SimpleNamespace(seq_length=8)), torch.device("cpu"))
    assert events == ["reset", "peer step", "peer step", "peer step"]

    out = tmp_path / "r.txt"
    a = argparse.Namespace(preset="tiny", tp=1, pp=1, virtual_stages=1, micro_batch=2, accum=1, recompute="none",
                           zero=False, plan="", note="", out=str(out), no_peer=False)
    ours = {"tokens_per_s": 10.0, "tflops": 1e-3, "step_s": 0.1, "mem_gib": 0.3, "peak_tflops": 1.0, "mfu": 1e-3,
            "loss": 7.0, "params_rank0": 1, "global_batch": 2, "seq": 8, "fpt": 1.0, "dtype": "fp32",
            "device": "cpu", "cfg": None, "opt_bytes": [1.0]}
    monkeypatch.setattr(train_step, "measure_ours", lambda a, world: ours)

    def peer_dies(*args):
        raise MemoryError("the peer ran out of memory")

    monkeypatch.setattr(train_step, "measure_peer", peer_dies)
    with pytest.raises(MemoryError):
        train_step.rank_main(0, 1, a, 0)
    assert "ours: 10.0 tokens/s total" in out.read_text()
