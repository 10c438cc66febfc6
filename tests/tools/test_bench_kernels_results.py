"""bench/kernels_gpu.py keeps every figure a time limit would otherwise lose: its JSON is rewritten
after each measurement (complete: false until the end), with the bandwidth and speed-up rows computed
from what was measured so far (CPU: the writer, fed made-up timings)."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def test_json_after_every_measurement(tmp_path):
    import kernels_gpu
    path = tmp_path / "k.json"
    r = kernels_gpu.Results(str(path), {"device": "test", "dtype": "bf16"}, copy_bw=2e12)
    r.write()
    assert json.loads(path.read_text())["rows"] == []
    r.record("bias_gelu", "fused", 1e-3, 2e-3, 4e9, 6e9)
    got = json.loads(path.read_text())          # on disk before any further measurement
    assert not got["complete"] and got["device"] == "test"
    assert [(x["op"], x["impl"]) for x in got["rows"]] == [("bias_gelu", "fused")]
    assert got["rows"][0]["fwd_GBps"] == pytest.approx(4000.0) and got["rows"][0]["fwd_of_copy"] == pytest.approx(2.0)
    r.record("bias_gelu", "eager", 2e-3, 4e-3, 4e9, 6e9)
    got = json.loads(path.read_text())
    fused = [x for x in got["rows"] if x["impl"] == "fused"][0]
    assert fused["speedup_vs_eager_fwd_bwd"] == pytest.approx(2.0) and got["faster_on"] == ["bias_gelu"]
    r.record("mlm_xent", "fused", 1e-3, 1e-3, 1e9, 2e9)
    r.record("mlm_xent", "eager", 0.5e-3, 0.5e-3, 1e9, 2e9)       # the fused one is slower here
    r.skip("mlm_xent/compile: budget")
    got = json.loads(path.read_text())
    assert len(got["rows"]) == 4 and got["faster_on"] == ["bias_gelu"]
    assert got["skipped"] == ["mlm_xent/compile: budget"] and not got["complete"]
    r.finish()
    assert json.loads(path.read_text())["complete"]
