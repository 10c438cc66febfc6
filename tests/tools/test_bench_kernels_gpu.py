"""bench/kernels_gpu.py: every call its GPU run makes runs on CPU tensors (the registered ops'
CPU keys, tiny shapes), so a renamed or removed op fails here and not on the day a GPU is lent; and
it keeps every figure a time limit would otherwise lose: its JSON is rewritten after each
measurement (complete: false until the end), with the bandwidth and speed-up rows computed from what
was measured so far (the writer, fed made-up timings)."""
import json
import os
import sys

import pytest
import torch

from xlmr_mp.kernels import dispatch

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_case_runs_on_cpu_through_the_registered_ops(tmp_path, dtype):
    """The bench's cases on CPU tensors: every op dispatch knows is measured, fused and eager, with
    nothing failing (a failing call is only printed and listed under `skipped` by measure); the fused
    side of each op runs its registered op (torch.ops.xlmr_mp.*) and computes what its eager peer
    computes (the same dropout draws from the same seed)."""
    import kernels_gpu
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    cases = kernels_gpu.build_cases(cpu, dtype, tokens=32, seq=8, hidden=16, heads=2, vocab_shard=50, iters=1)
    assert [c["op"] for c in cases] == list(dispatch.OPS)
    r = kernels_gpu.Results(str(tmp_path / "k.json"), {"device": "cpu"}, copy_bw=1e9)
    for c in cases:
        for impl in ("fused", "eager"):
            kernels_gpu.measure(r, c, impl, 1, kernels_gpu.timer(cpu))
    assert r.skipped == []
    assert [(x["op"], x["impl"]) for x in r.rows()] == [(c["op"], i) for c in cases for i in ("fused", "eager")]
    tol = {} if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)     # the AVX2 kernels round on their own
    for c in cases:
        fused, eager = c["impls"]["fused"], c["impls"]["eager"]
        if c.get("pair"):                      # (forward, backward) closures: the forward's logsumexp
            torch.testing.assert_close(fused[0]()[0], eager[0]()[0], **tol)
            continue
        torch.manual_seed(1)
        got = fused(*c["inputs"])
        torch.manual_seed(1)
        want = eager(*c["inputs"])
        assert f"xlmr_mp_{c['op']}" in got.grad_fn.name(), (c["op"], got.grad_fn.name())
        torch.testing.assert_close(got, want, **tol)


def test_cli_on_cpu_writes_a_complete_json(tmp_path):
    """`--device cpu` (the suite's dry run): the whole script at a tiny shape, exit 0, every row written."""
    import kernels_gpu
    out = tmp_path / "k.json"
    rc = kernels_gpu.main(["--device", "cpu", "--dtype", "fp32", "--tokens", "32", "--seq", "8", "--hidden", "16",
                           "--heads", "2", "--vocab-shard", "50", "--iters", "1", "--copy-mib", "1", "--no-compile",
                           "--out", str(out)])
    got = json.loads(out.read_text())
    assert rc == 0 and got["complete"] and got["skipped"] == [] and got["arch"] == "cpu"
    assert sorted({x["op"] for x in got["rows"]}) == sorted(dispatch.OPS) and len(got["rows"]) == 2 * len(dispatch.OPS)
