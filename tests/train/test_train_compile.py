"""train.compile: the trainer applies the fused paths and compilation in one call,
kernels.apply(chunks, device, compile=cfg.train.compile), compiling only when configured; with
torch.compile'd encoder layers and head it gives the eager run's losses, gradient norms and
parameters (tiny preset with dropout, fp32, TP=1; the layout equality tests run compiled with
XLMR_MP_TEST_COMPILE=1). The latter is slow: compilation takes minutes on a small CPU."""
import pytest
import torch

from tests.support.harness import run_distributed
from tests.support import train_bodies as b
# dropout on: the compiled graphs must draw eager's masks (parallel/compile.py: fallback_random)
BASE = ["train.global_batch=8", "train.micro_batch=4", "optim.warmup_steps=2", "model.dropout=0.1",
        "model.attention_dropout=0.1"]


def _body(rank, world_size, run_dir):
    from xlmr_mp.parallel.state import destroy_parallel
    out = {}
    for mode in ("eager", "compiled"):
        cfg = b.tiny_cfg(BASE + [f"run_dir={run_dir}/{mode}", "logging.jsonl=false",
                                 f"train.compile={'true' if mode == 'compiled' else 'false'}"], world_size)
        tr, _ = b.make_trainer(cfg)
        ms = [tr.train_step() for _ in range(3)]
        layers = [l for c in tr.chunks for l in c.layers.values()]
        out[mode] = {"losses": [m["loss"] for m in ms], "grad_norms": [m["grad_norm"] for m in ms],
                     "params": b.local_params(tr),
                     "compiled": all(getattr(l, "_compiled_call_impl", None) is not None for l in layers)}
        destroy_parallel()
    return out


def _one_call_body(rank, world_size, run_dir):
    """Per train.compile value: the trainer's kernels.apply calls, compile_chunks calls and result."""
    from xlmr_mp import kernels
    from xlmr_mp.parallel import compile as parallel_compile
    from xlmr_mp.parallel.state import destroy_parallel
    calls = []
    real_apply, real_compile = kernels.apply, parallel_compile.compile_chunks
    kernels.apply = lambda *a, **k: calls.append(("apply", k.get("compile"))) or real_apply(*a, **k)
    parallel_compile.compile_chunks = lambda chunks: calls.append(("compile_chunks", None)) or real_compile(chunks)
    out = {}
    for flag in ("false", "true"):
        cfg = b.tiny_cfg(BASE + [f"run_dir={run_dir}/{flag}", "logging.jsonl=false", f"train.compile={flag}"],
                         world_size)
        tr, _ = b.make_trainer(cfg)
        layers = [l for c in tr.chunks for l in c.layers.values()]
        out[flag] = {"calls": list(calls), "applied": tr.kernels.applied, "compiled": tr.kernels.compiled,
                     "text": str(tr.kernels),
                     "layers": [getattr(l, "_compiled_call_impl", None) is not None for l in layers]}
        calls.clear()
        destroy_parallel()
    return out


def test_the_trainer_applies_kernels_and_compile_in_one_call(tmp_path):
    """No step is run (no compilation happens: it starts at the first forward)."""
    r = run_distributed(_one_call_body, 1, args=(str(tmp_path),), timeout=600)[0]
    assert r["false"]["calls"] == [("apply", False)]
    assert r["false"]["compiled"] == 0 and "compile" not in r["false"]["applied"]
    assert not any(r["false"]["layers"])
    assert r["true"]["calls"] == [("apply", True), ("compile_chunks", None)]
    n = len(r["true"]["layers"]) + 1                 # every encoder layer and the head's transform
    assert r["true"]["compiled"] == n and all(r["true"]["layers"]) and "compile" in r["true"]["applied"]
    assert f"torch.compile on {n} modules" in r["true"]["text"]


@pytest.mark.slow
def test_compiled_trainer_equals_eager(tmp_path):
    r = run_distributed(_body, 1, args=(str(tmp_path),), timeout=1800)[0]
    assert r["compiled"]["compiled"] and not r["eager"]["compiled"]
    for a, e in zip(r["compiled"]["losses"], r["eager"]["losses"]):
        assert abs(a - e) <= 1e-4 * abs(e), (r["compiled"]["losses"], r["eager"]["losses"])
    for a, e in zip(r["compiled"]["grad_norms"], r["eager"]["grad_norms"]):
        assert abs(a - e) <= 1e-4 * e
    for n, t in r["eager"]["params"].items():      # fused elementwise ops reorder float math: rtol 1e-4
        torch.testing.assert_close(r["compiled"]["params"][n], t, rtol=1e-4, atol=1e-5)
