"""bench/step_overhead.py: the least-squares split of a step into fixed + per-sample cost, and one
real (short) run of the benchmark with its plot."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def test_fit_recovers_a_line():
    import step_overhead
    fixed, per = step_overhead._fit([1, 2, 4, 8], [3.0 + 2.5 * x for x in (1, 2, 4, 8)])
    assert fixed == pytest.approx(3.0) and per == pytest.approx(2.5)
    fixed, per = step_overhead._fit([1, 3], [10.0, 10.0])
    assert fixed == pytest.approx(10.0) and per == pytest.approx(0.0)


@pytest.mark.slow          # four trainer + HF steps at two sizes, one process (~15 s)
def test_runs_and_plots(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    png = tmp_path / "overhead.png"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "step_overhead.py"), "--micro", "1", "2",
                        "--accum", "1", "--rounds", "1", "--threads", "1", "--plot", str(png)],
                       capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ours: fixed" in r.stdout and "HF: fixed" in r.stdout, r.stdout
    rows = [l.split() for l in r.stdout.splitlines() if l.strip()[:1].isdigit()]
    assert [int(x[0]) for x in rows] == [1, 2] and all(float(x[1]) > 0 and float(x[2]) > 0 for x in rows)
    assert png.stat().st_size > 10_000


def test_needs_two_sizes():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "step_overhead.py"), "--micro", "4", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "at least two different micro-batch sizes" in r.stderr
