"""bench/gpu_suite.sh --dry-run: every step of the GPU validation suite runs at a tiny CPU shape
(same scripts, same options as on the GPU), so the prepared command cannot rot."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow               # seven suite steps, two with the HF peer
@pytest.mark.timeout(1500)      # seven steps, two with the HF peer: ~2 min quiet, 10+ min on a busy machine
def test_gpu_suite_dry_run(tmp_path):
    out = tmp_path / "suite"
    p = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_suite.sh"), "--dry-run", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1500,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    env = (out / "env.txt").read_text()
    assert "commit:" in env and "device: CPU (dry run)" in env
    cmds = (out / "commands.txt").read_text().splitlines()
    assert [c.split()[0] for c in cmds] == ["build", "kernel_tests", "kernels", "train_large_bf16_fused",
                                           "train_large_bf16_reference", "train_base_fp16_fused", "mlm_head"]
    assert all(" rc=0 " in c for c in cmds), cmds
    summary = (out / "summary.txt").read_text()
    for needle in ("ours:", "ratio ours/peer", "optimizer-state bytes per rank", "planner (tools/plan.py --gpu CPU)",
                   "chunked (ours, model)", "steps failed: 0"):
        assert needle in summary, (needle, summary)
    bad = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_suite.sh"), "--bogus"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--dry-run" in bad.stderr
