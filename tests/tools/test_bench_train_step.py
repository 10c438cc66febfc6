"""bench/train_step.py --paired: our step and the peer's alternated in one process, the paired ratio
printed beside the sequential one."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def test_alternating_blocks_settles_except_in_single_step_alternation():
    """Blocks of K > 1 run one untimed settling step after each switch, then K timed ones; K = 1
    alternates single timed steps with no settling step (the order of calls shows both)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import train_step
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    for block, per_round in ((3, ["a"] * 4 + ["b"] * 4), (1, ["a", "b"])):
        calls = []
        times = train_step.alternating_blocks({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                              rounds=2, block=block)
        assert calls == per_round * 2
        assert [len(v) for v in times.values()] == [2, 2]
