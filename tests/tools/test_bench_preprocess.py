"""bench/preprocess.py runs end to end (small size) and prints the figures it is read for."""
import os
import re
import subprocess
import sys

import pytest

from tests.support.prep import ROOT, train_tiny_spm
from xlmr_mp.fixtures.demo_corpus import make_tiny_corpus


def test_bench_preprocess_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    make_tiny_corpus(tmp_path / "c")
    model = train_tiny_spm(tmp_path / "c", tmp_path / "spm", vocab_size=1000)
    png = tmp_path / "p.png"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "preprocess.py"), "--mb", "0.4", "--repeats", "1",
                        "--workers", "1,2", "--tokenizer", model, "--list-path", "--plot", str(png)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [l.split() for l in r.stdout.splitlines() if re.match(r"\s+[12]\s+\d", l)]
    assert [row[0] for row in rows] == ["1", "2"], r.stdout
    for row in rows:                       # MB/s and ratios are positive numbers
        assert all(float(x.replace(",", "")) > 0 for x in row[1:]), row
    assert "list path" in r.stdout and "scaling 1->2" in r.stdout
    assert png.stat().st_size > 10_000
