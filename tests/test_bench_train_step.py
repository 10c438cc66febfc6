"""bench/train_step.py --paired: our step and the peer's alternated in one process, the paired ratio
printed beside the sequential one."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow          # our trainer and HF, a few steps each (~20 s)
def test_paired_ratio_line(tmp_path):
    pytest.importorskip("transformers")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_step.py"), "--preset", "tiny",
                        "--micro-batch", "2", "--steps", "2", "--warmup", "1", "--paired", "2"],
                       capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"paired ours/peer \(2 alternating blocks of 5 steps, one process\): ours ([\d.]+) ms/step, "
                  r"peer ([\d.]+) ms/step, ratio median ([\d.]+)", r.stdout)
    assert m, r.stdout
    ours, peer, ratio = (float(x) for x in m.groups())
    assert ours > 0 and peer > 0 and ratio == pytest.approx(peer / ours, rel=0.5)
