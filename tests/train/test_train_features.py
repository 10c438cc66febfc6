"""Trainer features on one process: activation recomputation (full, selective) leaves the losses
unchanged, with dropout on (the recompute replays the same masks); bf16 autocast trains close to
fp32; metrics (FLOPs per token, peak table, MFU, JSONL sink on rank 0 only)."""
import json
import math
import os

import pytest
import torch

from tests.support.harness import run_distributed
from tests.support import train_bodies as b
from xlmr_mp.metrics import PEAK_FLOPS, MetricsLogger, flops_per_token, peak_flops, throughput


def test_recompute_modes_and_bf16(tmp_path):
    none, full, sel, bf16 = run_distributed(
        b.variants_body, 1, args=([["train.recompute=none"], ["train.recompute=full"], ["train.recompute=selective"],
                                   ["precision.dtype=bf16"]], 5, str(tmp_path)), timeout=300)[0]
    assert none[-1] < none[0]
    for other in (full, sel):
        for a, e in zip(other, none):
            assert abs(a - e) <= 1e-6 * e, (other, none)
    for a, e in zip(bf16, none):
        assert abs(a - e) <= 2e-2 * e, (bf16, none)
    assert bf16 != none           # it really ran in bf16


def test_flops_per_token_formula():
    from xlmr_mp.model.config import ModelConfig
    m = ModelConfig(vocab_size=250002, hidden_size=1024, num_layers=24, num_heads=16, ffn_size=4096)
    f = flops_per_token(m, 512, 0.15)
    h, ff, s, L, V = 1024, 4096, 512, 24, 250002
    assert f == pytest.approx(3 * (L * (8 * h * h + 4 * h * ff + 4 * s * h) + 0.15 * (2 * h * h + 2 * h * V)))
    # close to 6 x non-embedding params + attention: the well-known ~6N rule
    n_params = L * (4 * h * h + 2 * h * ff)
    assert 6 * n_params < f < 6 * n_params * 1.5


def test_peak_table_and_mfu():
    for kind in PEAK_FLOPS:
        assert set(PEAK_FLOPS[kind]) == {"fp32", "fp16", "bf16"}
    assert PEAK_FLOPS["H100-SXM"]["bf16"] == 989e12 and PEAK_FLOPS["V100-SXM"]["fp16"] == 125e12
    assert peak_flops(torch.device("cpu"), "fp32") == PEAK_FLOPS["CPU"]["fp32"] * torch.get_num_threads()
    t = throughput(tokens=1000, seconds=2.0, n_devices=4, fpt=1e9, peak=1e12)
    assert t["tokens_per_s"] == 500 and t["tflops"] == pytest.approx(500 * 1e9 / 4 / 1e12)
    assert t["mfu"] == pytest.approx(t["tflops"] * 1e12 / 1e12)


def test_metrics_logger_rank0_only_and_truncate(tmp_path):
    quiet = MetricsLogger(str(tmp_path / "r1"), rank=1)
    quiet.log(1, {"loss": 1.0})
    assert not os.path.exists(tmp_path / "r1" / "metrics.jsonl")
    lg = MetricsLogger(str(tmp_path), rank=0)
    for s in (1, 2, 3):
        lg.log(s, {"loss": float(s)})
    lg.log(2, {"loss_en": 0.5}, prefix="valid")
    lg.close()
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["loss"] == 1.0
    assert json.loads(open(tmp_path / "valid.jsonl").read())["loss_en"] == 0.5
    lg2 = MetricsLogger(str(tmp_path), rank=0)
    lg2.truncate_after(1)
    assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [1]
    assert open(tmp_path / "valid.jsonl").read() == ""


@pytest.mark.slow          # 1 + 2 + 2 trainer ranks
def test_validation_same_at_every_layout(tmp_path):
    """Per-language validation loss after 3 steps on real (tiny, preprocessed-format) data: DP=2
    and interleaved PP=2 x 2 (the stage-by-stage forward) report the single process's values."""
    data = b.make_indexed_data(str(tmp_path / "data"))
    ref = run_distributed(b.eval_body, 1, args=([], data, 3, str(tmp_path / "r")), timeout=300)[0]
    assert {"loss_en", "loss_fr", "loss_sw", "loss"} <= set(ref["eval"])
    for layout, world in (([], 2),
                          (["parallel.pipeline=2", "parallel.virtual_stages=2", "parallel.schedule=interleaved"], 2)):
        res = run_distributed(b.eval_body, world, args=(layout, data, 3, str(tmp_path / "r")), timeout=300)
        for r in res:
            assert r["eval"].keys() == ref["eval"].keys()
            for k, v in ref["eval"].items():
                assert abs(r["eval"][k] - v) <= 1e-5 * v, (layout, k, r["eval"][k], v)


@pytest.mark.parametrize("overrides,world,match", [
    (["train.global_batch=10", "train.micro_batch=4"], 1, "train.global_batch=10 is not divisible by train.micro_batch=4"),
    (["train.global_batch=8", "train.micro_batch=4"], 4, r"x data-parallel size 4"),
    (["parallel.tensor=4"], 6, "world size 6 is not divisible by parallel.tensor x parallel.pipeline"),
    (["parallel.tensor=3"], 3, "model.num_heads=4 is not divisible by parallel.tensor=3"),
    (["parallel.data=3"], 2, "parallel.data=3 but world size 2"),
    (["precision.dtype=fp8"], 1, "precision.dtype='fp8'"),
    (["parallel.ddp_bucket_mb=0"], 1, "parallel.ddp_bucket_mb"),
])
def test_layout_errors_name_the_option(overrides, world, match):
    from xlmr_mp.config import ConfigError
    with pytest.raises(ConfigError, match=match):
        b.tiny_cfg(overrides, world)


def test_cli_config_error_exit_code(tmp_path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "xlmr_mp.train", "--config", b.TINY, "train.global_batch=10"],
                       cwd=b.ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "train.global_batch=10" in p.stderr


def test_tensorboard_sink_writes_events(tmp_path):
    lg = MetricsLogger(str(tmp_path), rank=0, jsonl=False, tensorboard=True)
    lg.log(1, {"loss": 2.0, "mfu": 0.1})
    lg.close()
    events = [f for f in os.listdir(tmp_path / "tb") if f.startswith("events.out.tfevents")]
    assert events and os.path.getsize(tmp_path / "tb" / events[0]) > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [2.0]
