"""train.compile: the trainer with torch.compile'd encoder layers and head gives the eager run's
losses, gradient norms and parameters (tiny preset with dropout, fp32, TP=1; the layout equality tests run
compiled with XLMR_MP_TEST_COMPILE=1). Slow: compilation takes minutes on a small CPU."""
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
